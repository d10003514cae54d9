"""Caffe's Data layer: Datum records in an LMDB database (as written by convert_imageset or convert_cifar_data).

Records are read in key order, as Caffe's cursor reads them. A Datum holds either raw pixels (``data``: C*H*W
bytes in CHW order, BGR for images Caffe converted; or ``float_data``) or, with ``encoded: true``, an image file
(PNG, JPEG) decoded as Caffe does: as stored (OpenCV's IMREAD_UNCHANGED: grey stays 1 channel, colour is BGR)
unless transform_param.force_color (3 channels, BGR) or force_gray (1 channel) is set. data_param.
force_encoded_color counts as force_color. Every record must have the shape of the first one.

When the layer is opened the keys are listed (values are not read) and the first record is decoded for the
shape; a malformed record later on is reported with its key. LEVELDB, Caffe's default backend, is not supported:
convert the database to LMDB. Needs the ``lmdb`` package (``pip install slim[lmdb]``).
"""

import os
import weakref
from pathlib import Path

import numpy as np

from slim import proto as pb
from slim.data.folder import decode_image
from slim.data.source import optional_module
from slim.errors import DataError

__all__ = ["LmdbSamples", "open_lmdb"]

# py-lmdb refuses to open one environment twice in a process ("is already open in this process"), yet a train net
# and its test net, or a pipeline's solver and the pruner after it, may read the same database at once: readers
# share the open environment of a path (by its real path) for as long as one of them holds it.
_OPEN_ENVS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _lmdb(where: str):
    return optional_module("lmdb", where=where, needed_for="reading an LMDB database", what="the lmdb package",
                           extra="lmdb", pip_name="lmdb")


class LmdbSamples:
    """The Datum records of one LMDB database, read by key order.

    Attributes:
        shape: (C, H, W) of the first record, after decoding.
        num_samples: number of records.
    """

    def __init__(self, source: str, *, color: str, where: str, list_keys: bool = True):
        """Opens the database, lists its keys and decodes the first record.

        Args:
            source: the LMDB folder (or file).
            color: how encoded records are decoded: "native", "bgr" or "gray".
            where: names the layer in messages.
            list_keys: list every key (False finds only the first, enough for the shape).

        Raises:
            DataError: lmdb is missing, the database does not exist, is empty, or its first record is malformed.
        """
        lmdb = _lmdb(where)
        path = Path(source)
        if not path.exists():
            raise DataError(f"{where}: the LMDB database '{source}' (data_param.source) does not exist. Create it "
                            "with Caffe's convert_imageset -backend lmdb, or fix the path.")
        self.source, self.color, self.where = source, color, where
        try:
            self._env = _OPEN_ENVS.get(os.path.realpath(path))
            if self._env is None:
                self._env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir(),
                                      max_readers=512)
                _OPEN_ENVS[os.path.realpath(path)] = self._env
            self._txn = self._env.begin(buffers=False)
            cursor = self._txn.cursor()
            if list_keys:
                self.keys = [bytes(k) for k in cursor.iternext(keys=True, values=False)]
            else:
                self.keys = [bytes(cursor.key())] if cursor.first() else []
        except lmdb.Error as e:
            raise DataError(f"{where}: '{source}' could not be opened as an LMDB database ({e}). If it is a "
                            "LEVELDB database, convert it to LMDB.") from e
        if not self.keys:
            raise DataError(f"{where}: the LMDB database '{source}' holds no records.")
        first, _ = self._record(0)
        self.shape = tuple(int(d) for d in first.shape)
        self._float = first.dtype == np.float32

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def _record(self, i: int) -> tuple[np.ndarray, int]:
        key = self.keys[i]
        name = f"record {key.decode('latin1')!r} of '{self.source}'"
        value = self._txn.get(key)
        try:
            datum = pb.Datum.FromString(value)
        except Exception as e:  # a protobuf DecodeError
            raise DataError(f"{self.where}: {name} is not a Datum ({e}); the database is corrupt.") from e
        if datum.encoded:
            image = decode_image(datum.data, color=self.color, where=f"{self.where}: {name}")
        else:
            c, h, w = datum.channels, datum.height, datum.width
            count = c * h * w
            if datum.data:
                values = np.frombuffer(datum.data, np.uint8)
            else:
                values = np.asarray(datum.float_data, np.float32)
            if count <= 0 or values.size != count:
                raise DataError(f"{self.where}: {name} declares {c}x{h}x{w} (CxHxW) but holds {values.size} values; "
                                "the database is corrupt or was written by another tool.")
            image = values.reshape(c, h, w)
        if hasattr(self, "shape") and image.shape != self.shape:
            raise DataError(f"{self.where}: {name} is {'x'.join(map(str, image.shape))} (CxHxW) but the first record "
                            f"is {'x'.join(map(str, self.shape))}; every record of a Data layer must have one shape. "
                            "Rebuild the database with convert_imageset --resize_height/--resize_width.")
        return image, int(datum.label)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = [self._record(int(i)) for i in indices]
        dtype = np.float32 if self._float else np.uint8
        images = np.stack([r[0].astype(dtype, copy=False) for r in records])
        return images, np.asarray([r[1] for r in records], dtype=np.int64)


def open_lmdb(layer: pb.LayerParameter, *, where: str, list_keys: bool = True) -> LmdbSamples:
    """The samples of a Caffe Data layer; only LMDB is supported (``list_keys`` as in `LmdbSamples`).

    Raises:
        DataError: the backend is LEVELDB, force_color and force_gray are both set, or the database is unusable.
    """
    param = layer.data_param
    if param.backend != pb.DataParameter.LMDB:
        raise DataError(f"{where}: data_param.backend is LEVELDB (Caffe's default when backend is not set), which "
                        "slim does not read. Convert the database to LMDB (e.g. rerun convert_imageset with "
                        "-backend lmdb) and set `backend: LMDB`.")
    t = layer.transform_param
    if t.force_color and t.force_gray:
        raise DataError(f"{where}: transform_param sets both force_color and force_gray; keep one.")
    color = "bgr" if (t.force_color or param.force_encoded_color) else "gray" if t.force_gray else "native"
    return LmdbSamples(param.source, color=color, where=where, list_keys=list_keys)
