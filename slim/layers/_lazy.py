"""Lazy proxies for torch, so layer modules import (and graphs infer shapes) without loading torch.

Attributes are resolved on first use and cached on the proxy, so the per-call cost after that is a plain
attribute lookup.
"""

import importlib

__all__ = ["torch", "F"]


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value


torch = _LazyModule("torch")
F = _LazyModule("torch.nn.functional")
