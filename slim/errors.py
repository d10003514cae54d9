"""The exceptions slim raises for user errors.

Every message is a complete sentence that names the file, layer, blob or flag involved, says what was expected
and what was found, and says how to fix it. The command line prints the message alone (no traceback) and exits
with status 2. ``assert`` is kept for internal invariants.
"""

__all__ = ["SlimError", "ParseError", "NetError", "WeightsError", "SolverError", "DataError", "PruneError",
           "DecomposeError", "OutputError", "ResourceError", "InteropError"]


class SlimError(Exception):
    """Base class of every error slim reports to a user."""


class ParseError(SlimError):
    """A prototxt or binary file could not be read: syntax, unknown field, truncation or corruption."""


class NetError(SlimError):
    """A net definition is inconsistent: unknown layer type or bottom, duplicate top, impossible shape."""


class WeightsError(SlimError):
    """Weights do not fit the net: missing layer, blob count or shape mismatch."""


class SolverError(SlimError):
    """A solver definition or snapshot is invalid."""


class DataError(SlimError):
    """A dataset or data layer cannot be read."""


class PruneError(SlimError):
    """A pruning request cannot be carried out."""


class DecomposeError(SlimError):
    """A decomposition request cannot be carried out: a layer that cannot be split, a rank out of range."""


class OutputError(SlimError):
    """An output file cannot be written: the disk is full, the folder is read-only or not writable."""


class ResourceError(SlimError):
    """A file or net would need more memory than this process may allocate."""


class InteropError(SlimError):
    """A foreign model (ONNX) cannot be read or converted: not a model, an operator or shape slim cannot express, or
    an optional dependency (onnx, onnxruntime) that is not installed."""
