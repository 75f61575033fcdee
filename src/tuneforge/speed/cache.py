"""Speed-ups that compute a frozen part of the model once and reuse it every epoch.

Which part is frozen is the strategy's declared ``frozen_scope``: ``"backbone"`` (linear-probe:
the pooled features are cached, the head trains on them) or ``"prefix"`` (partial: the last
frozen layer group's activations are cached and replayed). Both need the task's model to have
a separate head on those features (the task's declared ``cacheable``) and inputs that are the
same every epoch (the modality's ``random_inputs``: image augmentation is random).
"""

from __future__ import annotations

from ..modalities import modality_of


def _why_not(job, scope: str) -> str | None:
    """None when the cache for ``scope`` applies; else why not ("" = nothing worth saying)."""
    if job.strategy.frozen_scope != scope:
        return ""  # nothing of the model is fixed in this way
    if job.cfg.cache_activations == "off":
        return "train.cache_activations is off"
    if not job.task.cacheable:
        return "this task's model does not cache its frozen part (the caches hold a head's pooled input)"
    return modality_of(job.task.modality).random_inputs(job.recipe) or None


def _settings(job) -> dict:
    # the preprocessing the inputs went through (counts of truncated texts are not inputs)
    return {"preprocessing": {k: v for k, v in job.task.settings().items() if k != "truncated"}}


def _batches(job):
    """Eval-order batches of a dataset through the task's own loader (index included)."""
    def batches(dataset, batch_size: int | None = None):
        return job.task.loader(dataset, batch_size or job.cfg.eval_batch_size, train=False, seed=0)
    return batches


def _precision(job) -> str:
    from ..engine.precision import precision_name

    return precision_name(job.amp_dtype)


class FeatureCache:
    """``train.cache_activations`` with a frozen backbone: pooled features computed once per example."""

    name, stage = "activation cache", "data"

    def applies(self, job) -> tuple[bool, str]:
        why = _why_not(job, "backbone")
        return why is None, why or ""

    def apply(self, job) -> None:
        from ..engine.activation_cache import build_cached_loaders

        modality = modality_of(job.task.modality)
        settings = {**_settings(job), "pooling": job.recipe.task.pooling,
                    "precision": _precision(job)}
        job.loaders = build_cached_loaders(job.model, job.datasets, batches=_batches(job), digest=modality.digest,
                                           inputs=modality.model_inputs, settings=settings, cfg=job.cfg,
                                           device=job.device, autocast=job.autocast, log=job.log)

    def remove(self) -> None:
        pass  # the loaders are the run's own


class PrefixCache:
    """``train.cache_activations`` with frozen lower layer groups: their output computed once per
    example and replayed (``engine/prefix_cache.py``), checked to give the same logits."""

    name, stage = "activation cache", "data"

    def __init__(self):
        self.replay = None

    def applies(self, job) -> tuple[bool, str]:
        why = _why_not(job, "prefix")
        if why is None:
            from ..engine.prefix_cache import loose_parameters

            loose = loose_parameters(job.model, job.strategy.frozen)
            if loose:
                why = f"the frozen groups hold bare parameters ({', '.join(loose[:3])}) used outside any module"
        return why is None, why or ""

    def apply(self, job) -> None:
        from ..engine.prefix_cache import build_prefix_loaders

        modality = modality_of(job.task.modality)
        loaders, self.replay = build_prefix_loaders(
            job.model, job.strategy.frozen, job.datasets, batches=_batches(job), collate=job.task.collate,
            digest=modality.digest, inputs=modality.model_inputs, ragged=modality.variable_length,
            settings=_settings(job), cfg=job.cfg, device=job.device, autocast=job.autocast,
            precision=_precision(job), log=job.log)
        if loaders is not None:  # None: this model cannot replay (the reason is logged); plain loaders stay
            job.loaders = loaders

    def remove(self) -> None:
        if self.replay is not None:
            self.replay.remove()  # the model's own forwards again, for whoever uses it next
            self.replay = None
