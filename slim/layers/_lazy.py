"""Lazy proxies for torch, so layer modules import (and graphs infer shapes) without loading torch.

Attributes are resolved on first use and cached on the proxy, so the per-call cost after that is a plain
attribute lookup. ``load()`` imports the modules behind the proxies up front: slim.Net calls it, because
torch.compile cannot trace an import and would otherwise fall back to eager for the whole forward.
"""

import importlib

__all__ = ["torch", "F", "load"]


class _LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attr):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)
        return value


torch = _LazyModule("torch")
F = _LazyModule("torch.nn.functional")


def load() -> None:
    """Import the modules behind the proxies now (once)."""
    for proxy in (torch, F):
        if proxy._module is None:
            proxy._module = importlib.import_module(proxy._name)
