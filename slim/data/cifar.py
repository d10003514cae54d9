"""CIFAR-10 and CIFAR-100, read from the folders their authors distribute, in either format.

* Python format (cifar-10-batches-py: data_batch_1..5, test_batch; cifar-100-python: train, test). Each file is a
  pickled dict with b'data' (uint8, N x 3072) and b'labels' (CIFAR-10) or b'fine_labels' (CIFAR-100). Pickles can
  run code when loaded, so they are read by `load_array_pickle`, an unpickler that resolves no global except the
  few numpy callables that rebuild an array (and a latin-1-only ``_codecs.encode`` that protocol-2 pickles written
  by Python 3 use for bytes); anything else is refused before it is created.
* Binary format (cifar-10-batches-bin: data_batch_1..5.bin, test_batch.bin; cifar-100-binary: train.bin,
  test.bin): fixed records of a label byte (CIFAR-100: coarse then fine label byte) and 3,072 pixel bytes.

A row of 3,072 bytes is the red, green then blue 32x32 plane, each row-major, so images come out (N, 3, 32, 32) in
RGB order (the datasets' own order; Caffe's BGR convention applies to images Caffe decodes itself). CIFAR-100 uses
its 100 fine labels.

``source`` may name the folder holding the files or its parent (where the archive was extracted).
"""

import codecs
import importlib
import io
import math
import os
import pickle
import pickletools
import warnings
from pathlib import Path

import numpy as np

from slim.data.source import ArraySamples
from slim.errors import DataError
from slim.io.limits import check_allocation

__all__ = ["CIFAR_SHAPE", "load_cifar", "load_array_pickle"]

CIFAR_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32

# (classes) -> folder names of the extracted archives, python-format files, binary files, label key.
_LAYOUT = {
    10: dict(folders=("cifar-10-batches-py", "cifar-10-batches-bin"),
             train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key="labels", label_bytes=1),
    100: dict(folders=("cifar-100-python", "cifar-100-binary"),
              train=["train"], test=["test"], label_key="fine_labels", label_bytes=2),
}


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, 'latin1'); no other codec is allowed.
    if encoding.lower().replace("-", "").replace("_", "") != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _empty_bytes(*args):
    # Protocol-2 pickles written by Python 3 spell an empty bytes object as bytes(); bytes(n) would allocate n.
    if args:
        raise pickle.UnpicklingError("bytes() with arguments is not allowed")
    return b""


def _numpy_internal(submodule: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; old names still import there, with a deprecation warning.
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {submodule}.{name}")


# The only globals a pickle may name. Both numpy 1 (numpy.core) and numpy 2 (numpy._core) spellings are listed;
# each resolves to whichever module the installed numpy has. The two that allocate an array from a shape
# (ndarray itself, _reconstruct) are bounded by the unpickler: an array's data must come from the file.
_ALLOWED = {
    ("numpy", "ndarray"): lambda u: u.ndarray,
    ("numpy", "dtype"): lambda u: u.dtype,
    ("_codecs", "encode"): lambda u: _latin1_encode,
    ("__builtin__", "bytes"): lambda u: _empty_bytes,
    ("builtins", "bytes"): lambda u: _empty_bytes,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = lambda u: u.bounded_reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = lambda u: _numpy_internal("multiarray", "scalar")
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = lambda u: _numpy_internal("numeric", "_frombuffer")

# Nesting deeper than this is no dataset's: a CIFAR batch is a dict of arrays and lists (depth 2).
_MAX_DEPTH = 64


class _ArrayUnpickler(pickle._Unpickler):
    """Resolves only the globals of ``_ALLOWED``; an array it allocates from a shape may take at most ``limit``
    bytes (the file's size: a genuine array's data comes from the file).

    Python's own unpickler (``pickle._Unpickler``, slower than the C one only on many small objects) is used because
    its opcodes can be overridden: BUILD (``__setstate__``) is allowed on arrays and dtypes only, and a dtype's
    state only where it is the state numpy itself writes for that dtype. Otherwise a pickle could set arbitrary
    flags on a dtype (numpy's shared uint8 dtype included, when the copy flag is forged) or attributes on the
    functions it is given.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, limit: int, **kwargs):
        super().__init__(file, **kwargs)
        self.limit = limit
        self.ndarray = self.bounded_ndarray  # one bound method, so that _reconstruct can recognise it by identity

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif not isinstance(inst, np.ndarray):
            raise pickle.UnpicklingError(f"the pickle sets the state of a {type(inst).__name__}; only arrays and "
                                         "dtypes may have one")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def dtype(self, spec, align=False, copy=False):
        # Always a private copy (numpy's own pickles ask for one): a BUILD must never reach a shared dtype.
        made = np.dtype(spec, align=bool(align), copy=True)
        if made.hasobject:
            raise pickle.UnpicklingError(f"the dtype {made} is that of an array of Python objects; only numeric "
                                         "arrays are accepted")
        return made

    def find_class(self, module, name):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"the pickle names the global {module}.{name}, which is not a numpy array "
                                         "constructor; it was not loaded")
        return make(self)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("the pickle uses persistent ids, which are not allowed")

    def _check_size(self, shape, dtype) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"an array shape {shape!r} is not a tuple of sizes")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes > self.limit:
            raise pickle.UnpicklingError(f"an array of shape {shape} and dtype {np.dtype(dtype)} ({nbytes:,} bytes) "
                                         f"is larger than the file ({self.limit:,} bytes) it must come from")

    def bounded_ndarray(self, shape, dtype=float, *args, **kwargs):
        if not args and "buffer" not in kwargs:  # with a buffer the data exists already: nothing is allocated
            self._check_size(shape, dtype)
        return np.ndarray(shape, dtype, *args, **kwargs)

    def bounded_reconstruct(self, subtype, shape, dtype):
        if subtype is not self.ndarray and subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"_reconstruct of {subtype!r} is not allowed")
        self._check_size(shape, dtype)
        return _numpy_internal("multiarray", "_reconstruct")(np.ndarray, shape, dtype)


def _check_dtype_state(dtype: np.dtype, state) -> None:
    """Accept only the state numpy writes for ``dtype`` itself (any byte order where one applies)."""
    def plain(value):  # Python 2 pickles read with encoding='bytes' give byte strings
        return value.decode("latin1") if isinstance(value, bytes) else value

    expected = dtype.__reduce__()[2]
    if not isinstance(state, tuple) or len(state) != len(expected):
        raise pickle.UnpicklingError(f"the state given to dtype {dtype} is not a dtype's state")
    if len(state) > 4 and (state[2] is not None or state[3] is not None):  # (version, order, subarray, names, ...)
        raise pickle.UnpicklingError("the pickle holds a structured or sub-array dtype; only plain numeric arrays are "
                                     "accepted")
    for k, (got, want) in enumerate(zip(state, expected)):
        got, want = plain(got), plain(want)
        same = got in "<>=" and want in "<>=" if k == 1 and isinstance(got, str) and got else False
        if not same and not (type(got) is type(want) and got == want):
            raise pickle.UnpicklingError(f"the state given to dtype {dtype} differs from the one numpy writes for it "
                                         f"(item {k}: {got!r}, expected {want!r})")


def load_array_pickle(path) -> object:
    """Loads a pickle that may hold only builtins (dict, list, str, bytes, numbers) and numpy arrays.

    Python 2 strings are returned as bytes (``encoding='bytes'``, as the CIFAR pickles need). Object arrays are
    refused too. Nothing in the file can make the reader allocate more than the file holds: every length the
    pickle declares is checked against the bytes that follow before the unpickler sees it, arrays made from a
    shape are bounded by the file's size, and nesting is limited.

    Raises:
        DataError: the file is not such a pickle.
    """
    try:
        with open(path, "rb") as f:
            check_allocation(os.fstat(f.fileno()).st_size, f"'{path}' is a pickle of",
                             "Check that it is the dataset file meant.")
            data = f.read()
        with warnings.catch_warnings():  # text-protocol strings with odd escapes warn as they are decoded
            warnings.simplefilter("ignore", DeprecationWarning)
            _check_opcodes(data)
            value = _ArrayUnpickler(io.BytesIO(data), len(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, RecursionError) as e:
        raise DataError(f"'{path}' could not be read as a pickle of numpy arrays: {e}. Re-download the dataset "
                        "(slim loads only plain data from pickles and never runs code from them).") from None
    except OSError as e:
        raise DataError(f"'{path}' cannot be read: {e.strerror or e}.") from None
    _refuse_object_arrays(value, path)
    return value


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without building anything, before the unpickler allocates what they declare:
    every declared length must fit in the bytes that follow (pickletools raises ValueError otherwise), and memo
    indices must stay below the number of opcodes (the C unpickler grows its memo to the largest index given)."""
    ops = 0
    for op, arg, pos in pickletools.genops(io.BytesIO(data)):
        ops += 1
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > ops:
            raise pickle.UnpicklingError(f"memo index {arg} is beyond the {ops} opcodes read so far")
        if op.name == "FRAME" and arg > len(data) - pos:
            raise pickle.UnpicklingError(f"a frame of {arg:,} bytes starts {len(data) - pos:,} bytes before the end")


def _refuse_object_arrays(value, path) -> None:
    """Refuse object arrays anywhere in ``value``, and nesting deeper than _MAX_DEPTH (walked without recursion,
    so a hostile depth cannot exhaust the stack)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise DataError(f"'{path}' nests containers more than {_MAX_DEPTH} deep; a dataset file holds arrays, "
                            "lists and dicts a few levels deep. Re-download the dataset.")
        if isinstance(item, np.ndarray) and item.dtype.hasobject:
            raise DataError(f"'{path}' holds an array of Python objects; only numeric arrays are accepted.")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


def _find_folder(source: Path, classes: int, where: str) -> tuple[Path, str]:
    layout = _LAYOUT[classes]
    first_py, first_bin = layout["train"][0], layout["train"][0] + ".bin"
    for folder in [source] + [source / name for name in layout["folders"]]:
        if (folder / first_py).is_file() or (folder / layout["test"][0]).is_file():
            return folder, "python"
        if (folder / first_bin).is_file() or (folder / (layout["test"][0] + ".bin")).is_file():
            return folder, "binary"
    if not source.exists():
        raise DataError(f"{where}: the CIFAR-{classes} folder '{source}' does not exist. Download and extract "
                        f"the python or binary version from https://www.cs.toronto.edu/~kriz/cifar.html and set "
                        "slim_data_param.source to the extracted folder.")
    raise DataError(f"{where}: '{source}' holds no CIFAR-{classes} files: expected '{first_py}' (python format) or "
                    f"'{first_bin}' (binary format) in it or in one of its sub-folders {', '.join(layout['folders'])}. "
                    "Point slim_data_param.source at the extracted archive.")


def load_cifar(source: str, classes: int, train: bool, *, where: str) -> ArraySamples:
    """Reads the training (50,000 images) or test (10,000 images) split of CIFAR-10 or CIFAR-100.

    Args:
        source: the extracted folder (or its parent).
        classes: 10 or 100.
        train: the training split; otherwise the test split.
        where: names the layer in error messages.

    Returns:
        ArraySamples with uint8 images (N, 3, 32, 32), RGB, and int64 labels.

    Raises:
        DataError: the folder, a batch file or a field is missing, a file is malformed, or a label is out of range.
    """
    layout = _LAYOUT[classes]
    folder, fmt = _find_folder(Path(source), classes, where)
    names = layout["train" if train else "test"]
    if fmt == "binary":
        names = [n + ".bin" for n in names]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{where}: the CIFAR-{classes} folder '{folder}' lacks {', '.join(missing)} "
                        f"({'training' if train else 'test'} split, {fmt} format). Re-extract the complete archive.")
    parts = [(_read_binary if fmt == "binary" else _read_python)(folder / n, layout, where) for n in names]
    images = np.concatenate([p[0] for p in parts]).reshape((-1,) + CIFAR_SHAPE)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(bad):
        raise DataError(f"{where}: CIFAR-{classes} label {labels[bad[0]]} (sample {bad[0]} of the "
                        f"{'training' if train else 'test'} split in '{folder}') is outside 0..{classes - 1}. "
                        "The files are corrupt or belong to the other CIFAR; check slim_data_param.dataset.")
    return ArraySamples(images, labels)


def _read_python(path: Path, layout: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = load_array_pickle(path)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{where}: '{path}' holds a {type(batch).__name__}, not the dict of a CIFAR batch.")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    key = layout["label_key"]
    if "data" not in batch or key not in batch:
        raise DataError(f"{where}: '{path}' lacks the field '{'data' if 'data' not in batch else key}'; a CIFAR "
                        f"batch holds 'data' and '{key}'. Check slim_data_param.dataset (CIFAR10 or CIFAR100).")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{where}: '{path}' has 'data' of type {data.dtype} and shape {data.shape}; expected uint8 "
                        f"rows of {_PIXELS} pixels.")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: '{path}' has {len(data)} images but '{key}' holds {labels.shape} values of type "
                        f"{labels.dtype}; expected one integer label per image.")
    return data, labels


def _read_binary(path: Path, layout: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    record = layout["label_bytes"] + _PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{where}: '{path}' has {raw.size} bytes, not a positive multiple of the {record}-byte CIFAR "
                        "record; the file is truncated or of the other CIFAR. Re-extract the archive.")
    raw = raw.reshape(-1, record)
    # CIFAR-100 records start with the coarse label, then the fine one; the fine label is the class.
    return raw[:, layout["label_bytes"]:], raw[:, layout["label_bytes"] - 1]
