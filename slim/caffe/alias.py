"""Opt-in: make ``import caffe`` (and ``caffe.io``, ``caffe.proto.caffe_pb2``, ...) resolve to slim.caffe.

    import slim.caffe.alias
    slim.caffe.alias.install_alias()        # then an unmodified ``import caffe`` gets slim's
    python -m slim.caffe train_lenet.py     # the same for one script run

Nothing happens on import: only :func:`install_alias` changes what ``import caffe`` finds. It refuses to shadow a
real Caffe (an importable ``caffe`` module, or one already imported) unless called with ``shadow=True``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

from slim.errors import SlimError

__all__ = ["install_alias", "uninstall_alias", "real_caffe"]

_PREFIX = "caffe"
_TARGET = "slim.caffe"


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        """The module is slim's, already executed."""


class _Finder(importlib.abc.MetaPathFinder):
    """Maps ``caffe`` and ``caffe.x.y`` to ``slim.caffe`` and ``slim.caffe.x.y``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PREFIX and not fullname.startswith(_PREFIX + "."):
            return None
        real = _TARGET + fullname[len(_PREFIX):]
        if importlib.util.find_spec(real) is None:
            return None
        is_package = importlib.util.find_spec(real).submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, _Loader(real), is_package=is_package)


def real_caffe():
    """Where a real ``caffe`` module would be imported from (its path), or None."""
    existing = sys.modules.get(_PREFIX)
    if existing is not None:
        return None if existing.__name__ == _TARGET else getattr(existing, "__file__", _PREFIX)
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return None
    spec = importlib.util.find_spec(_PREFIX)
    return None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))


def install_alias(shadow: bool = False) -> None:
    """Make ``import caffe`` give slim.caffe.

    Args:
        shadow: take over even when a real Caffe is importable (it is then hidden for this process).

    Raises:
        SlimError: a real Caffe is importable or imported and ``shadow`` is False.
    """
    found = real_caffe()
    if found is not None and not shadow:
        raise SlimError(f"a real Caffe is importable from {found}; slim.caffe does not hide it unless asked. Call "
                        f"install_alias(shadow=True) (python -m slim.caffe --shadow script.py), or import slim.caffe "
                        f"as caffe in the script.")
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for name in [m for m in sys.modules if m == _PREFIX or m.startswith(_PREFIX + ".")]:
        del sys.modules[name]       # a real Caffe imported before, shadowed on request
    sys.meta_path.insert(0, _Finder())


def uninstall_alias() -> None:
    """Undo :func:`install_alias`: ``import caffe`` finds what it found before."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
    for name in [m for m in sys.modules if m == _PREFIX or m.startswith(_PREFIX + ".")]:
        if sys.modules[name].__name__.startswith(_TARGET):
            del sys.modules[name]
