"""Deprecated import path: ``tuneforge.pipeline`` moved to ``tuneforge.run.finetune`` in 0.2 (see CHANGELOG.md);
this re-export goes away in 0.3."""

from ._compat import forward as _forward

__getattr__ = _forward(__name__, ('tuneforge.run.finetune', 'tuneforge.run.build', 'tuneforge.run.finish', 'tuneforge.speed', 'tuneforge.speed.model', 'tuneforge'))
