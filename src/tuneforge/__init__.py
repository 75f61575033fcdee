"""tuneforge: fine-tune pretrained text and image models from one recipe.

Public API (everything else may change)::

    import tuneforge
    run = tuneforge.finetune("recipes/sst2-minilm.yaml", overrides=["train.epochs=1"])
    run.metrics["validation"]["accuracy"]; run.predict(["a fine film"]); run.path
    predictor = tuneforge.load(run.path)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TuneforgeError
from .recipe import Recipe, load_recipe


class Run:
    """What :func:`finetune` returns: ``.path`` (the run directory), ``.metrics`` (eval.json),
    ``.recipe`` (the resolved recipe), ``.history`` (every evaluation) and ``.predict(inputs)``."""

    def __init__(self, result):
        self.path, self.metrics, self.recipe, self.history = result.path, result.metrics, result.recipe, result.history
        self._predictor = None

    def predict(self, inputs):
        """A list of inputs -> a list of ``{"label", "scores"}``; one input (a string) -> one dict."""
        if self._predictor is None:
            from .deploy.predictor import Predictor

            self._predictor = Predictor(self.path)
        return self._predictor.predict(inputs)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


def finetune(recipe=None, *, overrides=None, console=None, resume=None, init_from=None) -> Run:
    """Run a recipe (path, dict or Recipe) end to end; returns a Run (.metrics, .predict, .path).

    ``resume``: a run directory (or "auto") to continue exactly from its newest valid checkpoint
    (with a run directory the recipe may be left out: the run's own is used);
    ``init_from``: a run directory whose final weights start this new run (warm start).
    """
    from .run.finetune import finetune as _finetune

    return Run(_finetune(recipe, overrides=overrides, console=console, resume=resume, init_from=init_from))


def compare(recipe, strategies, *, overrides=None, output=None, isolate=True, console=None):
    """Run a recipe under each strategy (list or "full,lora,..."); returns a Comparison (.rows, .path,
    .table()) and writes compare.csv / compare.md in its directory."""
    from .workflows.compare import compare as _compare

    return _compare(recipe, strategies, overrides=overrides, output=output, isolate=isolate, console=console)


def load(path, device: str = "cpu"):
    """Load a run (or its model/ directory) as a Predictor with .predict(inputs) (a list of inputs
    -> a list of dicts; a single string -> one dict); a ``tuneforge cv`` directory loads as the
    average of its fold models."""
    from .deploy.predictor import open_predictor

    return open_predictor(path, device=device)


__all__ = ["Recipe", "Run", "TuneforgeError", "compare", "finetune", "load", "load_recipe", "__version__"]
