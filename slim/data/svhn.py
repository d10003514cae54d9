"""SVHN (cropped digits, 32x32) from train_32x32.mat / test_32x32.mat, with a small MATLAB v5 reader.

The .mat files hold ``X`` (32 x 32 x 3 x N uint8, MATLAB's column-major order: X(row, col, channel, n)) and ``y``
(N x 1, labels 1..10 where 10 stands for the digit 0). Images come out (N, 3, 32, 32) in RGB order and label 10
is mapped to 0, as is customary (torchvision does the same), so labels are the digits 0..9. The "extra" split is
not used.

The reader (`read_mat`) understands the MAT-file level 5 format: a 128-byte header, then data elements, each a
numeric matrix (miMATRIX) stored plainly or zlib-compressed (miCOMPRESSED). Numeric, logical and real matrices
are returned as numpy arrays in their MATLAB class; other classes (cells, structs, strings, sparse, complex) are
skipped. Only the variables asked for are decompressed; the names of compressed variables are read by
decompressing the first bytes of each.
"""

import struct
import zlib
from pathlib import Path

import numpy as np

from slim.data.source import ArraySamples
from slim.errors import DataError

__all__ = ["SVHN_SHAPE", "load_svhn", "read_mat", "mat_variables"]

SVHN_SHAPE = (3, 32, 32)

# Data types of data elements (miINT8 ...) and classes of arrays (mxDOUBLE_CLASS ...), from the MAT-file spec.
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_COMPLEX_FLAG, _LOGICAL_FLAG = 0x0800, 0x0200


class _MatFormatError(Exception):
    pass


def _endian(header: bytes) -> str:
    if len(header) < 128:
        raise _MatFormatError("the file is shorter than the 128-byte MAT-file header")
    if header[:6] == b"MATLAB" and b"7.3" in header[:20]:
        raise _MatFormatError("it is a MATLAB 7.3 (HDF5) file; save it with -v7 or -v6 (level 5 format)")
    mark = header[126:128]
    if mark == b"IM":
        return "<"
    if mark == b"MI":
        return ">"
    raise _MatFormatError(f"the endian indicator is {mark!r}, not 'IM' or 'MI'; it is not a MAT-file level 5 file")


def _tag(buf: bytes, pos: int, e: str) -> tuple[int, int, int, int]:
    """(type, size, data offset, next element offset) of the data element at ``pos``."""
    if pos + 8 > len(buf):
        raise _MatFormatError("a data element is truncated")
    first, second = struct.unpack_from(e + "II", buf, pos)
    if first >> 16:  # small data element: size and type share one word, data in the next 4 bytes
        return first & 0xFFFF, first >> 16, pos + 4, pos + 8
    size = second
    if pos + 8 + size > len(buf):
        raise _MatFormatError("a data element runs past the end of the file")
    return first, size, pos + 8, pos + 8 + size + (-size % 8)


def _elements(buf: bytes, pos: int, e: str):
    while pos < len(buf):
        mi_type, size, data, nxt = _tag(buf, pos, e)
        if mi_type == _MI_COMPRESSED:
            nxt = data + size  # compressed elements are not padded to 8 bytes
        yield mi_type, buf, data, size
        pos = nxt


def _matrix_name(buf: bytes, data: int, e: str) -> str:
    pos = data
    for _ in range(2):  # array flags, dimensions
        _, _, _, pos = _tag(buf, pos, e)
    _, size, start, _ = _tag(buf, pos, e)
    return buf[start:start + size].decode("latin1")


def _parse_matrix(buf: bytes, data: int, end: int, e: str):
    """(name, array or None) of the miMATRIX whose data spans buf[data:end]."""
    mi_type, size, start, pos = _tag(buf, data, e)
    flags = struct.unpack_from(e + "I", buf, start)[0]
    mx_class = flags & 0xFF
    _, size, start, pos = _tag(buf, pos, e)
    dims = tuple(int(d) for d in np.frombuffer(buf, e + "i4", size // 4, start))
    _, size, start, pos = _tag(buf, pos, e)
    name = buf[start:start + size].decode("latin1")
    if mx_class not in _MX_CLASSES or flags & _COMPLEX_FLAG:
        return name, None
    mi_type, size, start, pos = _tag(buf, pos, e)
    if mi_type not in _MI_TYPES:
        raise _MatFormatError(f"variable '{name}' stores its values with unknown data type {mi_type}")
    stored = np.dtype(e + _MI_TYPES[mi_type])
    count = int(np.prod(dims))
    if size != count * stored.itemsize:
        raise _MatFormatError(f"variable '{name}' has dimensions {dims} but {size} bytes of {stored} values")
    # MATLAB may store values in a smaller type than the class (e.g. a double array as uint8); convert back.
    values = np.frombuffer(buf, stored, count, start).astype(_MX_CLASSES[mx_class])
    array = values.reshape(dims, order="F")  # MATLAB arrays are column-major
    if flags & _LOGICAL_FLAG:
        array = array.astype(bool)
    return name, array


def _scan(path: Path):
    """Yields (name, loader) for each variable of a MAT-file; loader() returns the array (or None if skipped)."""
    buf = path.read_bytes()
    e = _endian(buf[:128])
    for mi_type, _, data, size in _elements(buf, 128, e):
        if mi_type == _MI_MATRIX:
            yield _matrix_name(buf, data, e), (lambda d=data, s=size: _parse_matrix(buf, d, d + s, e)[1])
        elif mi_type == _MI_COMPRESSED:
            head = zlib.decompressobj().decompress(buf[data:data + size], 4096)
            if len(head) < 8 or struct.unpack_from(e + "I", head)[0] != _MI_MATRIX:
                continue
            # The name sits in the first few dozen bytes; a long name needs more of the stream.
            try:
                name = _matrix_name(head, 8, e)
            except _MatFormatError:
                name = _matrix_name(zlib.decompress(buf[data:data + size]), 8, e)
            yield name, (lambda d=data, s=size: _inflate_matrix(buf[d:d + s], e))


def _inflate_matrix(compressed: bytes, e: str):
    try:
        inner = zlib.decompress(compressed)
    except zlib.error as err:
        raise _MatFormatError(f"a compressed variable is corrupt ({err})") from err
    _, size, data, _ = _tag(inner, 0, e)
    return _parse_matrix(inner, data, data + size, e)[1]


def read_mat(path, names=None) -> dict[str, np.ndarray]:
    """Reads the numeric variables of a MATLAB level 5 MAT-file (v6 or v7; not v7.3, which is HDF5).

    Args:
        path: the .mat file.
        names: the variables to read; None reads every numeric variable.

    Returns:
        {name: array} in MATLAB's shape and class (column-major order handled, double stays float64).

    Raises:
        DataError: the file is missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The MAT-file '{path}' does not exist.")
    wanted = None if names is None else set(names)
    out = {}
    try:
        for name, load in _scan(path):
            if wanted is None or name in wanted:
                array = load()
                if array is not None:
                    out[name] = array
    except (_MatFormatError, struct.error, zlib.error, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"'{path}' could not be read as a MATLAB level 5 MAT-file: {err}.") from err
    return out


def mat_variables(path) -> list[str]:
    """The names of the variables of a MAT-file, read without decompressing their values."""
    try:
        return [name for name, _ in _scan(Path(path))]
    except (_MatFormatError, struct.error, zlib.error, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"'{path}' could not be read as a MATLAB level 5 MAT-file: {err}.") from err


def load_svhn(source: str, train: bool, *, where: str) -> ArraySamples:
    """Reads the training (73,257 images) or test (26,032 images) split of SVHN's cropped digits.

    Args:
        source: the folder holding train_32x32.mat and test_32x32.mat.
        train: the training split; otherwise the test split.
        where: names the layer in error messages.

    Returns:
        ArraySamples with uint8 images (N, 3, 32, 32), RGB, and int64 labels 0..9 (label 10 read as 0).

    Raises:
        DataError: the file is missing or malformed, or a label is outside 1..10.
    """
    folder = Path(source)
    path = folder / ("train_32x32.mat" if train else "test_32x32.mat")
    if not path.is_file():
        raise DataError(f"{where}: the SVHN file '{path}' does not exist. Download train_32x32.mat and "
                        "test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into one folder and set "
                        "slim_data_param.source to it.")
    try:
        arrays = read_mat(path, ["X", "y"])
    except DataError as err:
        raise DataError(f"{where}: {err} Re-download the file.") from err
    if "X" not in arrays or "y" not in arrays:
        raise DataError(f"{where}: '{path}' lacks the numeric variable {'X' if 'X' not in arrays else 'y'}; an SVHN "
                        "file holds X (32x32x3xN) and y (Nx1).")
    x, y = arrays["X"], arrays["y"].reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{where}: '{path}' has X of shape {x.shape} and {len(y)} labels; expected X of shape "
                        "32x32x3xN with N labels.")
    if not np.array_equal(y, np.round(y)) or y.min(initial=1) < 1 or y.max(initial=1) > 10:
        bad = int(np.flatnonzero((y != np.round(y)) | (y < 1) | (y > 10))[0])
        raise DataError(f"{where}: SVHN label {y[bad]} (sample {bad} of '{path}') is outside 1..10. The file is "
                        "corrupt; re-download it.")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)  # (row, col, ch, n) -> (n, ch, row, col)
    labels = y.astype(np.int64) % 10  # SVHN writes the digit 0 as label 10
    return ArraySamples(images, labels)
