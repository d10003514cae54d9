"""Writing Caffe's LMDB of Datum records, and Caffe's ``convert_mnist_data`` on top of it (``convert_imageset`` is
in slim.data.imageset).

The records are those Caffe's converters write and its Data layer (and slim's, slim.data.lmdb_source) reads: a
serialized Datum (channels, height, width, raw uint8 ``data`` in CHW order, ``label``) under the key "%08d" of
the item's index, in the files' order. Protobuf writes fields in number order in both languages, so the values
are byte-identical to Caffe's. The database is built in a temporary folder beside the destination and renamed
into place when complete: an interrupted conversion leaves no half-written database that a Data layer would read.

    from slim.data.lmdb_writer import convert_mnist_data
    convert_mnist_data("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "examples/mnist/mnist_train_lmdb")
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from slim import proto as pb
from slim.data.idx import read_idx, read_idx_header
from slim.data.source import optional_module
from slim.errors import DataError

__all__ = ["check_backend", "check_new_database", "write_lmdb", "write_datum_lmdb", "convert_mnist_data",
           "MNIST_IMAGE_MAGIC", "MNIST_LABEL_MAGIC"]

# The magic numbers Caffe's convert_mnist_data requires: uint8 (code 08) values in 3 (images) or 1 (labels) dims.
MNIST_IMAGE_MAGIC, MNIST_LABEL_MAGIC = 2051, 2049
_COMMIT_EVERY = 1000  # Caffe's converters commit a transaction every 1,000 records


def _lmdb(output: Path):
    return optional_module("lmdb", where=f"Writing '{output}'", needed_for="writing an LMDB database",
                           what="the lmdb package", extra="lmdb", pip_name="lmdb")


def check_backend(backend: str, fix: str = "use --backend lmdb and `backend: LMDB` in the net's data_param") -> None:
    """Refuse every database backend but LMDB (Caffe's converters also write LEVELDB, which slim does not read).

    Raises:
        DataError: ``backend`` is not "lmdb" (any case); the message ends with ``fix``.
    """
    if backend.lower() != "lmdb":
        raise DataError(f"--backend {backend}: slim writes and reads LMDB only (Caffe's LEVELDB is not supported); "
                        f"{fix}.")


def check_new_database(output) -> None:
    """Refuse an output database that exists already, or whose folder does not.

    Raises:
        DataError: naming the path and how to fix it.
    """
    output = Path(output)
    if output.exists():
        raise DataError(f"'{output}' already exists; a conversion never overwrites a database (Caffe's converters "
                        "refuse too). Delete it or choose another output name.")
    if not output.parent.is_dir():
        raise DataError(f"Cannot create '{output}': the folder '{output.parent}' does not exist. Create it, or choose "
                        "another output path.")


def write_lmdb(output, records: Iterable[tuple[bytes, bytes]], *, map_size: int = 1 << 26,
               on_commit: Optional[Callable[[int], None]] = None) -> int:
    """Writes (key, value) records, streamed, into a new LMDB folder that appears only when complete.

    The database is built in a temporary folder beside ``output`` (``.NAME.XXXXXXXX.tmp``) and renamed into place
    at the end; an error or an interruption (also one raised by ``records`` itself) removes it, so a Data layer
    never reads a half-written database. Records are committed 1,000 at a time, as Caffe's converters do.

    Args:
        output: the database folder to create; it must not exist (Caffe's converters refuse to overwrite too).
        records: (key, serialized value) pairs, in the order to write them.
        map_size: the initial LMDB map size in bytes; it doubles whenever a transaction does not fit.
        on_commit: called with the number of records written after each commit.

    Returns:
        The number of records written.

    Raises:
        DataError: the output exists or its folder does not, or lmdb is not installed.
    """
    output = Path(output)
    check_new_database(output)
    lmdb = _lmdb(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    written = 0
    try:
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True)
        try:
            records = iter(records)
            while True:
                chunk = list(itertools.islice(records, _COMMIT_EVERY))
                if not chunk:
                    break
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for key, value in chunk:
                                txn.put(key, value)
                        break
                    except lmdb.MapFullError:  # the aborted transaction is retried in a larger map
                        map_size *= 2
                        env.set_mapsize(map_size)
                written += len(chunk)
                if on_commit is not None:
                    on_commit(written)
            env.sync(True)
        finally:
            env.close()
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def write_datum_lmdb(output, images: np.ndarray, labels: np.ndarray) -> Path:
    """Writes uint8 images (N, C, H, W) and integer labels as an LMDB of Datum records keyed "%08d".

    Args:
        output: the database folder to create; it must not exist (Caffe's converters refuse to overwrite too).
        images: uint8 (N, C, H, W), in the channel order the net expects (Caffe's own converters write BGR for
            colour images; grey images have one channel).
        labels: N integer labels.

    Returns:
        The database folder.

    Raises:
        DataError: the output exists or its folder does not, the arrays do not fit, or lmdb is not installed.
    """
    output = Path(output)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"Cannot write '{output}': expected uint8 images (N, C, H, W) and N labels, got "
                        f"{images.dtype} {images.shape} and {labels.shape}.")
    n, c, h, w = images.shape

    def records():
        datum = pb.Datum(channels=c, height=h, width=w)
        for i in range(n):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            yield b"%08d" % i, datum.SerializeToString()

    # Leaf pages hold the ~C*H*W-byte records with some slack; the map grows (doubling) if it fills anyway.
    write_lmdb(output, records(), map_size=max(1 << 26, 3 * (images.nbytes + 64 * n)))
    return output


def _check_magic(path: Path, magic: int, what: str) -> None:
    header = read_idx_header(path)
    ndim = magic - 0x800  # the magic's low byte is the number of dimensions, 0x08 above it the uint8 type
    if header.dtype != np.uint8 or len(header.dims) != ndim:
        raise DataError(f"'{path}' is not an MNIST {what} file: it holds {header.dtype.name} values in "
                        f"{len(header.dims)} dimensions; convert_mnist_data expects magic number {magic} "
                        f"(0x{magic:08x}: uint8 in {ndim} dimension{'s' if ndim > 1 else ''}). Check the order of "
                        "the arguments: images first, then labels.")


def convert_mnist_data(image_file, label_file, output, *, backend: str = "lmdb",
                       echo: Optional[Callable[[str], None]] = None) -> int:
    """Caffe's ``convert_mnist_data``: an MNIST-format image file and label file (raw or .gz) into an LMDB.

    Each item becomes a Datum of 1 x rows x cols uint8 pixels with its label, under the key "%08d" of its index,
    as Caffe writes it; Caffe's examples/mnist nets (``Data`` layers, ``backend: LMDB``) read the result unchanged.

    Args:
        image_file: the idx3-ubyte images (magic 2051).
        label_file: the idx1-ubyte labels (magic 2049).
        output: the database folder to create (must not exist).
        backend: "lmdb"; Caffe's other backend, LEVELDB, is refused (slim's Data layer reads only LMDB).
        echo: receives Caffe's log lines ("A total of N items.", "Rows: R Cols: C").

    Returns:
        The number of records written.

    Raises:
        DataError: a wrong backend, a file that is not an MNIST image/label file, counts that differ, an existing
            output.
    """
    check_backend(backend)
    image_file, label_file = Path(image_file), Path(label_file)
    _check_magic(image_file, MNIST_IMAGE_MAGIC, "image")
    _check_magic(label_file, MNIST_LABEL_MAGIC, "label")
    images, labels = read_idx(image_file, ndim=3), read_idx(label_file, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"'{image_file}' holds {len(images):,} images but '{label_file}' holds {len(labels):,} "
                        "labels; the two files are not a pair (or one is truncated).")
    if echo is not None:
        echo(f"A total of {len(images)} items.")
        echo(f"Rows: {images.shape[1]} Cols: {images.shape[2]}")
    write_datum_lmdb(output, images[:, None], labels)
    if echo is not None:
        echo(f"Processed {len(images)} files.")
    return len(images)
