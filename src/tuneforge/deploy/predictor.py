"""Predicting with a finished run: :class:`Predictor` (one run), :class:`EnsemblePredictor`
(the fold models of a ``tuneforge cv`` directory), :func:`open_predictor` (either)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..run.artifact import load_model_dir


class Predictor:
    """Loads a run's model and predicts labels with probabilities."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 64):
        self.model, self.task, self.labels, self.meta = load_model_dir(Path(path))
        if self.task.generative:
            raise TuneforgeError(f"{path} is a {self.meta['task']['type']} run: it writes text rather than predicting "
                                 f"labels — use `tuneforge generate {path} --prompt ...` or `tuneforge chat {path}`")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def proba_from_encoded(self, batch: dict) -> torch.Tensor:
        logits = self.model(**{k: v.to(self.device) for k, v in batch.items()})  # (B, C)
        return self.task.probabilities(logits).cpu()

    def predict_proba(self, inputs) -> torch.Tensor:
        """(N, C) probabilities for a list of N inputs; a single input (see :meth:`predict`) is one row.
        A tagger's rows are (N, W, C), one per word, zero-padded to the input with the most words."""
        inputs = _as_list(inputs)[0]
        out = []
        for i in range(0, len(inputs), self.batch_size):
            out.append(self.proba_from_encoded(self.task.encode_inputs(inputs[i:i + self.batch_size])))
        if out and out[0].ndim == 3:
            longest = max(o.shape[1] for o in out)
            out = [torch.nn.functional.pad(o, (0, 0, 0, longest - o.shape[1])) for o in out]
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, inputs) -> list[dict] | dict:
        """Predict labels with their probabilities.

        ``inputs``: a list (or other iterable) of texts, or of images (paths, bytes, PIL images)
        -> a list with one ``{"label", "scores"}`` dict per input, in order. A single input —
        one string, path, ``bytes`` or PIL image — -> that one dict, not a list (as Hugging Face
        pipelines do), so ``predict("a fine film")["label"]`` works; a string is never split
        into its characters.
        """
        items, single = _as_list(inputs)
        results = []
        for i in range(0, len(items), self.batch_size):  # formatted per batch: a tagger's rows vary in length
            chunk = items[i:i + self.batch_size]
            results += self.format(self.proba_from_encoded(self.task.encode_inputs(chunk)), inputs=chunk)
        return results[0] if single else results

    def format(self, probs: torch.Tensor, labels=None, inputs: list | None = None) -> list[dict]:
        """Probabilities -> one dict per input, as the task writes them (classifiers: ``{"label",
        "scores"}`` with labels in the user's own type; taggers: entities with character offsets
        into ``inputs``)."""
        return self.task.format_predictions(probs, labels if labels is not None else self.labels, inputs or [])


class EnsemblePredictor(Predictor):
    """The fold models of a ``tuneforge cv`` directory, averaging their probabilities.

    Every fold saw a different 1/K of the data as validation, so the average of the K
    models is a common way to use all of it for prediction without another run."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 64):
        summary = json.loads((Path(path) / "cv.json").read_text())
        runs = [Path(f["run"]) for f in summary["per_fold"]]
        missing = [str(r) for r in runs if not r.exists()]
        if missing:
            raise TuneforgeError(f"the cross-validation in {path} lists fold runs that are gone ({', '.join(missing[:3])}); "
                                 "predict with a single run directory instead")
        self.members = [Predictor(r, device=device, batch_size=batch_size) for r in runs]
        first = self.members[0]
        for run, member in zip(runs, self.members):
            if member.labels.names != first.labels.names:
                raise TuneforgeError(f"fold run {run} has labels {member.labels.names}, the first fold "
                                     f"{first.labels.names}; the folds cannot be averaged — predict with one fold's run")
        self.model, self.task, self.labels, self.meta = first.model, first.task, first.labels, dict(first.meta)
        self.meta["ensemble_of"] = [str(r) for r in runs]
        self.device, self.batch_size = first.device, batch_size

    def proba_from_encoded(self, batch: dict) -> torch.Tensor:
        return torch.stack([m.proba_from_encoded(batch) for m in self.members]).mean(0)


def _as_list(inputs) -> tuple[list, bool]:
    """(the inputs as a list, whether one single input was given)."""
    if isinstance(inputs, (str, bytes, os.PathLike)) or _is_pil_image(inputs):
        return [inputs], True
    try:
        return list(inputs), False
    except TypeError:
        raise TuneforgeError(f"predict takes one input (a string, path, bytes or PIL image) or a list of them; "
                             f"got {type(inputs).__name__}") from None


def _is_pil_image(value) -> bool:
    image = sys.modules.get("PIL.Image")  # only when PIL is loaded can a value be one of its images
    return image is not None and isinstance(value, image.Image)


def open_predictor(path, device: str = "cpu", batch_size: int = 64) -> Predictor:
    """A run directory (or its model/), or a ``tuneforge cv`` directory (its folds' ensemble)."""
    if (Path(path) / "cv.json").exists():
        return EnsemblePredictor(path, device=device, batch_size=batch_size)
    return Predictor(path, device=device, batch_size=batch_size)
