"""Deprecated import path: ``tuneforge.cv`` moved to ``tuneforge.workflows.cv`` in 0.2 (see CHANGELOG.md);
this re-export goes away in 0.3."""

from ._compat import forward as _forward

__getattr__ = _forward(__name__, ('tuneforge.workflows.cv',))
