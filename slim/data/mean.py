"""Caffe's ``compute_image_mean``: the mean image of an LMDB of Datum records, as a .binaryproto mean file.

    from slim.data.mean import compute_image_mean
    mean = compute_image_mean("examples/cifar10/cifar10_train_lmdb", "examples/cifar10/mean.binaryproto")
    mean.channel_means                      # what Caffe logs as "mean_value channel [c]: ..."

What Caffe's tool does (tools/compute_image_mean.cpp), and so this one:

* every record is read in key order; encoded records are decoded as stored (Caffe's DecodeDatumNative, OpenCV's
  IMREAD_UNCHANGED: grey stays one channel, colour is BGR); raw ``data`` bytes and ``float_data`` are both summed;
  every record must have the first one's C x H x W;
* the mean is written as one BlobProto with the legacy num/channels/height/width fields (1 x C x H x W) and float
  ``data``, which Caffe's and slim's transform_param.mean_file read;
* the log ends with the number of channels and each channel's mean over the image ("mean_value channel [c]: v"),
  the values to give as transform_param.mean_value instead of the file.

Caffe accumulates the sum in float32 (the BlobProto's own floats), which rounds once a pixel's sum passes 2^24 (some
65,000 images of value 255); here the sum is float64 and only the mean is rounded to float32. The file is written
atomically (slim.io.atomic). Needs the ``lmdb`` package (``pip install slim[lmdb]``); LEVELDB is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from slim import proto as pb
from slim.data.lmdb_source import LmdbSamples
from slim.data.lmdb_writer import check_backend
from slim.errors import DataError, OutputError

__all__ = ["compute_image_mean", "ImageMean"]

_WHERE = "INPUT_DB"  # names the database in the reader's messages
_CHUNK = 256           # records decoded and summed at a time
_LOG_EVERY = 10000     # Caffe's "Processed N files." interval


@dataclass(frozen=True)
class ImageMean:
    """The mean image of a database.

    Attributes:
        mean: float32 (C, H, W).
        count: the number of records averaged.
        source: the database read.
    """

    mean: np.ndarray = field(repr=False)
    count: int
    source: str

    @property
    def channel_means(self) -> tuple[float, ...]:
        """Each channel's mean over the image (Caffe's "mean_value channel [c]" lines), in the records' order."""
        return tuple(float(v) for v in self.mean.reshape(self.mean.shape[0], -1).mean(axis=1, dtype=np.float64))

    def __str__(self) -> str:
        values = ", ".join(f"{v:.6g}" for v in self.channel_means)
        return f"mean of {self.count} images {'x'.join(map(str, self.mean.shape))} from {self.source}: {values}"


def mean_blobproto(mean: np.ndarray) -> "pb.BlobProto":
    """A (C, H, W) mean as Caffe's compute_image_mean writes it: num 1, channels, height, width and float data."""
    c, h, w = mean.shape
    blob = pb.BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(np.asarray(mean, np.float32).ravel().tolist())
    return blob


def compute_image_mean(input_db, output_file=None, *, backend: str = "lmdb",
                       echo: Optional[Callable[[str], None]] = None) -> ImageMean:
    """Caffe's ``compute_image_mean INPUT_DB [OUTPUT_FILE]`` (see the module docstring).

    Args:
        input_db: the LMDB folder (or file) of Datum records.
        output_file: the .binaryproto to write (replaced atomically if it exists); None only computes and logs.
        backend: "lmdb"; Caffe's other backend, LEVELDB, is refused.
        echo: receives Caffe's log lines.

    Returns:
        The ImageMean.

    Raises:
        DataError: a wrong backend, a database that is missing, empty, corrupt or of mixed image sizes, or lmdb not
            installed. OutputError: the mean file cannot be written.
    """
    echo = echo or (lambda line: None)
    check_backend(backend, fix="convert the database to LMDB (e.g. rerun convert_imageset with --backend lmdb)")
    if not Path(input_db).exists():
        raise DataError(f"The database '{input_db}' (INPUT_DB) does not exist. Create it with slim convert_imageset "
                        "(or convert_mnist_data), or fix the path.")
    if output_file is not None and not Path(output_file).parent.is_dir():  # said before the reading, not after
        raise OutputError(f"Cannot write {output_file}: the folder {Path(output_file).parent} does not exist. Create "
                          "it or write somewhere else.")
    samples = LmdbSamples(str(input_db), color="native", where=_WHERE)
    n = samples.num_samples
    total = np.zeros(samples.shape, np.float64)
    echo("Starting iteration")
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        images, _ = samples.read(np.arange(start, stop))
        total += images.sum(axis=0, dtype=np.float64)
        if stop // _LOG_EVERY > start // _LOG_EVERY:
            echo(f"Processed {stop // _LOG_EVERY * _LOG_EVERY} files.")
    if n % _LOG_EVERY:
        echo(f"Processed {n} files.")
    mean = (total / n).astype(np.float32)
    if output_file is not None:
        from slim.io.atomic import atomic_write  # the io layer, only when a file is written

        echo(f"Write to {output_file}")
        with atomic_write(output_file) as f:
            f.write(mean_blobproto(mean).SerializeToString())
    result = ImageMean(mean, n, str(input_db))
    echo(f"Number of channels: {mean.shape[0]}")
    for c, value in enumerate(result.channel_means):
        echo(f"mean_value channel [{c}]: {value:.6g}")
    return result
