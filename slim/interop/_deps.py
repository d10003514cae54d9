"""The optional packages interop needs (the ``onnx`` extra), imported on use with one clear error when absent."""

import importlib
import importlib.util
from types import ModuleType

from slim.errors import InteropError

__all__ = ["require", "available"]

_WHY = {
    "onnx": "to read and write ONNX files",
    "onnxruntime": "to check an ONNX file against slim",
    "onnxscript": "for torch's default (dynamo) ONNX exporter",
}


def available(name: str) -> bool:
    """Whether the optional package ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


def require(name: str) -> ModuleType:
    """Import an optional package, or raise InteropError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InteropError(f"The Python package {name!r} is needed {_WHY.get(name, 'here')} but cannot be imported "
                           f"({e}). Install slim's ONNX extra: pip install 'slim[onnx]' (or pip install {name}).") \
            from None
