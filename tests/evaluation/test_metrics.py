"""Streaming metrics equal scikit-learn's on random predictions, whatever the batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from tuneforge.errors import TuneforgeError
from tuneforge.evaluation.metrics import ClassificationMetrics, check_metric_name, metric_names
from tuneforge.recipe import recipe_from_dict


def _stream(m, logits, labels, batch, loss=None):
    for i in range(0, len(labels), batch):
        m.update(logits[i:i + batch], labels[i:i + batch], loss_sum=loss, index=torch.arange(i, min(i + batch, len(labels))))
    return m.compute()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 5), n=st.integers(12, 80), batch=st.integers(1, 17))
def test_multiclass_matches_sklearn(seed, classes, n, batch):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 3
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,), generator=g)])
    out = _stream(ClassificationMetrics(classes, top_wrong=5), logits, labels, batch)
    y, probs = labels.numpy(), torch.softmax(logits, -1).numpy()
    pred = probs.argmax(-1)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert out[f"precision_{avg}"] == pytest.approx(p, abs=1e-5)
        assert out[f"recall_{avg}"] == pytest.approx(r, abs=1e-5)
        assert out[f"f1_{avg}"] == pytest.approx(f, abs=1e-5)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=list(range(classes)), zero_division=0)
    table = out["per_class"]
    assert [row["support"] for row in table] == s.tolist()
    assert np.allclose([row["f1"] for row in table], f, atol=1e-5)
    assert np.allclose([row["precision"] for row in table], p, atol=1e-5)
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(classes))).tolist()
    expected_auc = (skm.roc_auc_score(y, probs[:, 1]) if classes == 2
                    else skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert out["roc_auc"] == pytest.approx(expected_auc, abs=1e-5)
    # ECE from our bins equals torchmetrics' own computation on the whole set at once
    from torchmetrics.functional.classification import multiclass_calibration_error

    ece = float(multiclass_calibration_error(torch.softmax(logits, -1), labels, classes, n_bins=15))
    assert out["ece"] == pytest.approx(ece, abs=1e-5)
    assert sum(b["count"] for b in out["calibration"]) == n
    # the confidently wrong list: wrong ones only, most confident first, the true top of all errors
    wrong = [(float(probs[i].max()), i) for i in range(n) if pred[i] != y[i]]
    assert [w["index"] for w in out["confidently_wrong"]] == [i for _, i in sorted(wrong, reverse=True)[:5]]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), labels_n=st.integers(2, 5), n=st.integers(10, 60), batch=st.integers(1, 13))
def test_multilabel_matches_sklearn(seed, labels_n, n, batch):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, labels_n, generator=g) * 2
    target = torch.randint(0, 2, (n, labels_n), generator=g)
    target[0], target[1] = 1, 0  # every label has positives and negatives: AUC is defined
    out = _stream(ClassificationMetrics(labels_n, multi_label=True), logits, target.float(), batch)
    y, probs = target.numpy(), torch.sigmoid(logits).numpy()
    pred = (probs > 0.5).astype(int)
    assert out["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    assert out["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred), abs=1e-6)
    for avg in ("macro", "micro", "weighted"):
        assert out[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, pred, average=avg, zero_division=0), abs=1e-5)
    assert np.allclose(out["f1_per_label"], skm.f1_score(y, pred, average=None, zero_division=0), atol=1e-5)
    assert [row["support"] for row in out["per_class"]] == y.sum(0).tolist()
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"), abs=1e-5)


def test_roc_auc_is_none_when_a_class_is_missing():
    m = ClassificationMetrics(3)
    m.update(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert m.compute()["roc_auc"] is None


def test_loss_is_example_weighted():
    m = ClassificationMetrics(2)
    m.update(torch.zeros(3, 2), torch.tensor([0, 1, 0]), loss_sum=torch.tensor(3.0), count=3)  # mean 1.0
    m.update(torch.zeros(1, 2), torch.tensor([1]), loss_sum=torch.tensor(5.0), count=1)
    assert m.compute()["loss"] == pytest.approx((3 * 1.0 + 5.0) / 4)


def test_metric_for_best_names_and_did_you_mean(tmp_path):
    assert "f1_micro" in metric_names() and "subset_accuracy" not in metric_names()
    assert "subset_accuracy" in metric_names(multi_label=True)
    with pytest.raises(TuneforgeError, match="did you mean 'f1_macro'"):
        check_metric_name("f1_marco")
    with pytest.raises(TuneforgeError, match="train.metric_for_best 'acuracy'.*did you mean 'accuracy'"):
        recipe_from_dict({"train": {"metric_for_best": "acuracy"}})
    assert recipe_from_dict({"train": {"metric_for_best": "ece"}}).train.minimize
    assert not recipe_from_dict({"train": {"metric_for_best": "roc_auc"}}).train.minimize
