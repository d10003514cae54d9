"""IDX files (LeCun's MNIST format; also Fashion-MNIST, KMNIST, EMNIST), raw or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in row-major order, big-endian. MNIST-style datasets ship four files:

    train-images-idx3-ubyte   (N, H, W) uint8, magic 0x00000803 (2051)   train-labels-idx1-ubyte   (N,) uint8, 2049
    t10k-images-idx3-ubyte    the test split                             t10k-labels-idx1-ubyte

each possibly gzip-compressed (``.gz``, detected by the gzip magic rather than the name) and, as some mirrors name
them, with a dot before ``idx`` (``train-images.idx3-ubyte``). As a SlimData source (``dataset: IDX``) the folder
given by ``source`` is searched for the split's pair (``train: true`` the train files, false the t10k files), or
``image_file`` and ``label_file`` name the pair. Images come out (N, 1, H, W), grey, in the file's order.

Sizes are checked before anything is allocated: a header that declares more values than the file can hold (for a
gzip file, more than deflate's ~1032:1 ratio allows) is refused as truncated or corrupt, and a file that holds more
bytes than its header declares is refused too (its dimensions are wrong).
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from slim.data.source import ArraySamples
from slim.errors import DataError

__all__ = ["IdxHeader", "IdxShape", "read_idx_header", "read_idx", "write_idx", "idx_pair", "load_idx",
           "open_idx", "IDX_TYPES"]

#: IDX type code -> numpy dtype (big-endian, as the format stores values).
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {dtype.newbyteorder("="): code for code, dtype in IDX_TYPES.items()}

# (images, labels) base names of each split; the standard names first, then the dotted spelling of some mirrors.
_SPLIT_NAMES = {True: [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       ("train-images.idx3-ubyte", "train-labels.idx1-ubyte")],
                False: [("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                        ("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte")]}

_GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot compress better than about 1032:1; a header declaring more than this is a corrupt file, caught
# before its declared size is allocated.
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class IdxHeader:
    """What an IDX file's header declares.

    Attributes:
        path: the file.
        dtype: the values' type (big-endian numpy dtype).
        dims: the dimensions, first one the number of items.
        offset: bytes before the values (4 + 4 * len(dims)).
        compressed: the file is gzip-compressed.
    """

    path: Path
    dtype: np.dtype
    dims: Tuple[int, ...]
    offset: int
    compressed: bool

    @property
    def data_bytes(self) -> int:
        """Bytes of values the header declares."""
        return int(np.prod(self.dims, dtype=object)) * self.dtype.itemsize


def _open(path: Path):
    """A binary reader of the file's content: through gzip when the file starts with the gzip magic."""
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return (gzip.open(path, "rb") if compressed else open(path, "rb")), compressed


def _read_exact(f, count: int) -> bytes:
    data = f.read(count)
    return data if data is not None else b""


def read_idx_header(path) -> IdxHeader:
    """Reads and checks an IDX file's header (a few bytes, even of a gzip file).

    Raises:
        DataError: the file is missing, is not an IDX file (wrong magic number or type code), or is shorter than
            the values its header declares (raw files only; a gzip file's size is bounded, and checked when read).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The IDX file '{path}' does not exist.")
    try:
        f, compressed = _open(path)
        with f:
            magic = _read_exact(f, 4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or magic[3] == 0:
                raise DataError(f"'{path}' is not an IDX file: its magic number is {magic.hex() or 'missing'}, "
                                "expected 0000 then a type code (08 ubyte, 09 byte, 0b short, 0c int, 0d float, "
                                "0e double) and the number of dimensions (MNIST images: 00000803, labels: 00000801). "
                                "Check that the file is an MNIST-format file and not truncated or mislabelled.")
            ndim = magic[3]
            raw_dims = _read_exact(f, 4 * ndim)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"'{path}' could not be read as an IDX file ({e}); re-download or re-extract it.") from e
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"'{path}' is truncated: its header declares {ndim} dimensions but the file ends before "
                        "they are all given. Re-download the file.")
    header = IdxHeader(path, IDX_TYPES[magic[2]], tuple(struct.unpack(f">{ndim}I", raw_dims)), 4 + 4 * ndim,
                       compressed)
    size = path.stat().st_size
    limit = size * _MAX_DEFLATE_RATIO + 1024 if compressed else size - header.offset
    if header.data_bytes > limit:
        raise DataError(f"'{path}' is truncated or corrupt: its header declares dimensions "
                        f"{'x'.join(map(str, header.dims))} of {header.dtype.name} ({header.data_bytes:,} bytes of "
                        f"values) but the file has {size:,} bytes{' (gzip-compressed)' if compressed else ''}. "
                        "Re-download the file.")
    return header


def read_idx(path, *, ndim: Optional[int] = None) -> np.ndarray:
    """Reads an IDX file, raw or gzip-compressed, into an array in native byte order.

    Args:
        path: the file.
        ndim: the number of dimensions required (3 for images, 1 for labels); None accepts any.

    Raises:
        DataError: the file is missing, malformed, truncated, longer than its header declares, or has another
            number of dimensions than ``ndim``.
    """
    header = read_idx_header(path)
    path = header.path
    if ndim is not None and len(header.dims) != ndim:
        raise DataError(f"'{path}' has {len(header.dims)} dimensions ({'x'.join(map(str, header.dims))}); expected "
                        f"{ndim} ({'N x height x width images' if ndim == 3 else 'N labels' if ndim == 1 else ''}). "
                        "Check that images and labels are not swapped.")
    out = np.empty(header.data_bytes, np.uint8)
    try:
        f, _ = _open(path)
        with f:
            f.seek(header.offset)
            filled = 0
            view = memoryview(out)
            while filled < len(out):
                got = f.readinto(view[filled:filled + _CHUNK])
                if not got:
                    break
                filled += got
            extra = len(f.read(1)) if filled == len(out) else 0
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"'{path}' could not be read as an IDX file ({e}); it is corrupt or truncated. Re-download "
                        "it.") from e
    if filled < len(out):
        raise DataError(f"'{path}' is truncated: its header declares {'x'.join(map(str, header.dims))} values "
                        f"({len(out):,} bytes) but it holds {filled:,}. Re-download the file.")
    if extra:
        raise DataError(f"'{path}' holds more bytes than its header declares ({'x'.join(map(str, header.dims))} "
                        f"{header.dtype.name} values); the header or the file is corrupt. Re-download the file.")
    return out.view(header.dtype).reshape(header.dims).astype(header.dtype.newbyteorder("="), copy=False)


def write_idx(path, array: np.ndarray, *, compress: Optional[bool] = None) -> Path:
    """Writes an array as an IDX file, atomically; gzip-compressed when ``compress`` (default: the name ends .gz).

    Args:
        path: the file to write.
        array: uint8, int8, int16, int32, float32 or float64 values, at least one dimension.
        compress: gzip the file; None decides by the ``.gz`` suffix.

    Returns:
        The path written.
    """
    from slim.io.atomic import atomic_write

    path = Path(path)
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise DataError(f"Cannot write '{path}' as IDX: {array.dtype} values in {array.ndim} dimensions; IDX holds "
                        "uint8, int8, int16, int32, float32 or float64 arrays of 1 to 255 dimensions.")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    if path.suffix == ".gz" if compress is None else compress:
        # mtime 0: the same array gives the same bytes.
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with atomic_write(path, "wb") as f:
        f.write(payload)
    return path


def _find(folder: Path, base: str) -> Optional[Path]:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def idx_pair(source: str, train: bool, image_file: str = "", label_file: str = "", *,
             where: str) -> Tuple[Path, Path]:
    """The (images, labels) files of a split: ``image_file`` and ``label_file`` (inside ``source`` when relative and
    ``source`` is set), or the split's standard names in the folder ``source``.

    Raises:
        DataError: only one of the two files is named, a named file is missing, or the folder lacks the split's
            files (the message lists the names looked for).
    """
    if bool(image_file) != bool(label_file):
        raise DataError(f"{where}: slim_data_param sets only {'image_file' if image_file else 'label_file'}; give "
                        "both image_file and label_file, or neither (then the standard names are found in source).")
    folder = Path(source) if source else Path(".")
    if image_file:
        pair = (folder / image_file, folder / label_file)
        for path, field in zip(pair, ("image_file", "label_file")):
            if not path.is_file():
                raise DataError(f"{where}: the IDX file '{path}' (slim_data_param.{field}) does not exist; fix the "
                                "path.")
        return pair
    if not source:
        raise DataError(f"{where}: slim_data_param.source is not set; give the folder holding the IDX files "
                        "(e.g. /usr/share/datasets/fashion-mnist, where Debian's dataset-fashion-mnist installs "
                        "them), or set image_file and label_file.")
    if not folder.is_dir():
        raise DataError(f"{where}: the IDX folder '{folder}' (slim_data_param.source) does not exist. Point source at "
                        "the folder holding the MNIST-format files (e.g. `apt-get install dataset-fashion-mnist` "
                        "puts Fashion-MNIST in /usr/share/datasets/fashion-mnist).")
    split = "training" if train else "test"
    for images, labels in _SPLIT_NAMES[train]:
        found = _find(folder, images), _find(folder, labels)
        if found[0] and found[1]:
            return found[0], found[1]
        if found[0] or found[1]:
            missing = labels if found[0] else images
            raise DataError(f"{where}: the IDX folder '{folder}' has {(found[0] or found[1]).name} but lacks "
                            f"{missing} (or {missing}.gz), the other file of the {split} split. Copy the "
                            "complete dataset into the folder.")
    images, labels = _SPLIT_NAMES[train][0]
    raise DataError(f"{where}: the IDX folder '{folder}' lacks the {split} split: expected {images} and {labels} "
                    "(raw or .gz) in it. Point slim_data_param.source at the folder of the MNIST-format files, or "
                    "set image_file and label_file.")


@dataclasses.dataclass(frozen=True)
class IdxShape:
    """An IDX split known from its headers only (for shape inference): no values are read."""

    shape: Tuple[int, int, int]
    num_samples: int

    def read(self, indices: np.ndarray):
        raise AssertionError("IdxShape holds no values; open the source with headers=True to read samples")


def _image_header(path: Path, where: str) -> IdxHeader:
    try:
        header = read_idx_header(path)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    if len(header.dims) != 3:
        raise DataError(f"{where}: '{path}' has dimensions {'x'.join(map(str, header.dims))}; an IDX image file "
                        "holds N x height x width values (magic 00000803). Check that images and labels are not "
                        "swapped.")
    if min(header.dims[1:]) == 0:
        raise DataError(f"{where}: '{path}' declares images of {header.dims[1]}x{header.dims[2]} pixels; the file is "
                        "corrupt.")
    return header


def load_idx(images_path, labels_path, *, where: str) -> ArraySamples:
    """Reads an IDX image file and its label file into memory.

    Returns:
        ArraySamples with images (N, 1, H, W) (uint8 as stored; other types as float32) and int64 labels.

    Raises:
        DataError: a file is missing or malformed, the images are not N x H x W, the labels not N values, the two
            counts differ, or a label is negative or not an integer.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    _image_header(images_path, where)
    try:
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    if len(images) != len(labels):
        raise DataError(f"{where}: '{images_path}' holds {len(images):,} images but '{labels_path}' holds "
                        f"{len(labels):,} labels; the two files are not a pair (or one is truncated).")
    if len(images) == 0:
        raise DataError(f"{where}: '{images_path}' holds no images.")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        bad = int(np.flatnonzero(labels != np.round(labels))[0])
        raise DataError(f"{where}: label {labels[bad]} (item {bad} of '{labels_path}') is not an integer class.")
    if labels.min() < 0:
        bad = int(np.argmin(labels))
        raise DataError(f"{where}: label {labels[bad]} (item {bad} of '{labels_path}') is negative; classes are "
                        "numbered from 0.")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    return ArraySamples(images[:, None], labels.astype(np.int64))


def open_idx(param, *, where: str, headers: bool = True):
    """The samples of a SlimData layer with ``dataset: IDX``: ArraySamples, or with ``headers=False`` an IdxShape
    read from the image file's header alone (for shape inference without loading the data).

    Raises:
        DataError: as `idx_pair` and `load_idx`.
    """
    images, labels = idx_pair(param.source, param.train, param.image_file, param.label_file, where=where)
    if not headers:
        header = _image_header(images, where)
        return IdxShape((1, header.dims[1], header.dims[2]), header.dims[0])
    return load_idx(images, labels, where=where)
