"""Caffe's ``convert_imageset``: the images of a list file into an LMDB of Datum records.

    from slim.data.imageset import convert_imageset
    convert_imageset("data/ilsvrc12/train/", "train.txt", "ilsvrc12_train_lmdb", resize_height=256, resize_width=256,
                     shuffle=True)

What Caffe's tool does (tools/convert_imageset.cpp with util/io.cpp), and so this one:

* LISTFILE has one ``path label`` line per image, the label after the last space (slim.data.folder's parser:
  a line without a label is an error naming it). Paths are relative to ROOTFOLDER: Caffe concatenates the two
  strings, so its ROOTFOLDER ends with a slash; here both spellings work.
* An image is decoded as OpenCV's imread: 3 channels in BGR order, or one grey channel with ``gray``; it is
  resized to resize_height x resize_width (bilinear, as cv::resize) when both are given.
* A raw record is Datum{channels, height, width, data = the CxHxW bytes, label, encoded: false}, as CVMatToDatum.
* With ``encoded`` (or an ``encode_type``, which implies it) the record holds an image file, Datum{data, label,
  encoded: true}: the file's own bytes when no resize is asked and its extension is the encode type (jpg and jpeg
  alike; with no encode_type, whatever the extension is), else the decoded image encoded by Pillow in the encode type
  (or the file's extension): the same pixels as OpenCV's encoder would store, not the same bytes (JPEG at quality
  95, OpenCV's default). Caffe also checks that the file has the channels asked, but its check is always true, so
  ``gray`` can store a colour file; here a file whose channels differ is re-encoded with the channels asked.
* Keys are ``%08d_`` + the path as written in the list, numbered by position in the (shuffled) list; a skipped
  image leaves its number unused, as in Caffe. Records are committed 1,000 at a time ("Processed N files.").
* An image that cannot be read is skipped with a message naming the list line and the file (Caffe: "Could not
  open or find file"), and the number skipped is said at the end. ``check_size`` stops the conversion at the
  first image whose size differs from the first one's (Caffe's CHECK).
* ``shuffle`` permutes the list with numpy's generator seeded by ``seed`` (default 0; Caffe's shuffle is unseeded,
  so its order differs from run to run).
* The output must not exist; the database appears only when complete (slim.data.lmdb_writer.write_lmdb).

Needs Pillow (``pip install slim[image]``) and lmdb (``pip install slim[lmdb]``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from slim import proto as pb
from slim.data.folder import decode_image, parse_image_list, resize_bilinear
from slim.data.lmdb_writer import check_backend, check_new_database, write_lmdb
from slim.data.source import optional_module
from slim.errors import DataError

__all__ = ["convert_imageset", "ImagesetResult"]

_WHERE = "LISTFILE"  # names the list in messages about its lines
_JPEG_QUALITY = 95  # OpenCV's default IMWRITE_JPEG_QUALITY, which Caffe's cv::imencode uses


@dataclass(frozen=True)
class ImagesetResult:
    """What a conversion wrote.

    Attributes:
        output: the database folder.
        written: records written.
        skipped: one message per image that could not be read.
    """

    output: Path
    written: int
    skipped: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.output}: {self.written} records, {len(self.skipped)} images skipped"


def _match_ext(ext: str, encoding: str) -> bool:
    # Caffe's matchExt: case-insensitive, and a ".jpeg" file counts as "jpg" (not the other way round).
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def _pillow_format(image_module, encoding: str, where: str) -> str:
    fmt = image_module.registered_extensions().get("." + encoding)
    if fmt is None or fmt not in image_module.SAVE:
        raise DataError(f"{where}: Pillow cannot write '{encoding}' images, so the image cannot be encoded as "
                        f"{encoding}. Use --encode_type png (lossless) or jpg.")
    return fmt


def _encode(image_module, image: np.ndarray, encoding: str, where: str) -> bytes:
    """A (C, H, W) uint8 image (BGR or grey) as the bytes of an image file in ``encoding``."""
    fmt = _pillow_format(image_module, encoding, where)
    pixels = image[0] if image.shape[0] == 1 else image[::-1].transpose(1, 2, 0)  # BGR -> RGB, channels last
    buffer = io.BytesIO()
    image_module.fromarray(np.ascontiguousarray(pixels)).save(
        buffer, format=fmt, **({"quality": _JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def convert_imageset(root_folder, list_file, output, *, gray: bool = False, shuffle: bool = False, seed: int = 0,
                     backend: str = "lmdb", resize_height: int = 0, resize_width: int = 0, check_size: bool = False,
                     encoded: bool = False, encode_type: str = "",
                     echo: Optional[Callable[[str], None]] = None) -> ImagesetResult:
    """Caffe's ``convert_imageset ROOTFOLDER/ LISTFILE DB_NAME`` (see the module docstring for every rule).

    Args:
        root_folder: the folder the list's paths are relative to ("" for the working directory).
        list_file: the text file of ``path label`` lines.
        output: the LMDB folder to create (must not exist).
        gray: decode images as one grey channel (Caffe's --gray); colour images are BGR otherwise.
        shuffle: write the images in a random order drawn from ``seed``.
        seed: the seed of the shuffle.
        backend: "lmdb"; Caffe's other backend, LEVELDB, is refused.
        resize_height, resize_width: resize every image to this size (both or neither).
        check_size: require every image to have the first one's size.
        encoded: store image files (PNG, JPEG, ...) instead of raw pixels.
        encode_type: the file format of encoded records ("png", "jpg", ...); implies ``encoded``.
        echo: receives Caffe's log lines and one line per skipped image.

    Returns:
        The ImagesetResult.

    Raises:
        DataError: a wrong backend or resize, a missing list file or root folder, a malformed list line, an existing
            output, no readable image, a size that differs under ``check_size``, Pillow or lmdb not installed.
    """
    echo = echo or (lambda line: None)
    check_backend(backend)
    if resize_height < 0 or resize_width < 0:
        raise DataError(f"--resize_height {resize_height} and --resize_width {resize_width}: sizes must not be "
                        "negative; give both as pixels, or leave both out to keep the images' sizes.")
    if bool(resize_height) != bool(resize_width):
        raise DataError(f"--resize_height is {resize_height} and --resize_width is {resize_width}; give both to "
                        "resize (Caffe silently ignores one alone), or neither.")
    list_file, output = Path(list_file), Path(output)
    if not list_file.is_file():
        raise DataError(f"The list file '{list_file}' (LISTFILE) does not exist. Give a text file with one 'path "
                        "label' line per image, the paths relative to ROOTFOLDER.")
    root = Path(root_folder) if str(root_folder) else Path(".")
    if not root.is_dir():
        raise DataError(f"ROOTFOLDER '{root_folder}' is not a folder; give the folder that the paths in "
                        f"'{list_file}' are relative to.")
    check_new_database(output)  # before any work (write_lmdb checks again)
    image_module = optional_module("PIL.Image", where="Converting images", needed_for="reading images", what="Pillow",
                                   extra="image", pip_name="pillow")
    encode_type = encode_type.lower().lstrip(".")
    if encode_type:
        _pillow_format(image_module, encode_type, f"--encode_type {encode_type}")
        if not encoded:
            echo("encode_type specified, assuming encoded=true.")
            encoded = True
    entries = parse_image_list(list_file, where=_WHERE)
    if not entries:
        raise DataError(f"The list file '{list_file}' (LISTFILE) has no entries; add 'path label' lines.")
    if shuffle:
        echo(f"Shuffling data (seed {seed})")
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    echo(f"A total of {len(entries)} images.")
    resize = (int(resize_height), int(resize_width)) if resize_height else None
    color = "gray" if gray else "bgr"
    skipped: list[str] = []

    def records():
        first = None
        for index, (number, name, label) in enumerate(entries):
            path = root / name
            where = f"'{list_file}' line {number} ({path})"
            try:
                image = decode_image(path, color=color, where=where)
            except DataError as e:
                skipped.append(str(e))
                echo(f"{e} Skipped.")
                continue
            if resize:
                image = resize_bilinear(image, *resize)
            if first is None:
                first = (image.shape, number, path)
            elif check_size and image.shape != first[0]:
                raise DataError(f"{where}: the image is {'x'.join(map(str, image.shape))} (CxHxW) but the first "
                                f"one (line {first[1]}, {first[2]}) is {'x'.join(map(str, first[0]))}; --check_size "
                                "requires one size. Give --resize_height and --resize_width, or fix the image. "
                                "Nothing was written.")
            if encoded:
                ext = Path(name).suffix.lower().lstrip(".")
                encoding = encode_type or ext  # Caffe guesses the type from the file name
                if (not resize and _match_ext(ext, encoding)
                        and decode_image(path, color="native", where=where).shape[0] == image.shape[0]):
                    data = path.read_bytes()  # the file as it is (Caffe's ReadFileToDatum)
                else:
                    data = _encode(image_module, image, encoding or "png", where)
                datum = pb.Datum(data=data, label=label, encoded=True)
            else:
                c, h, w = image.shape
                datum = pb.Datum(channels=c, height=h, width=w, data=image.tobytes(), label=label, encoded=False)
            yield b"%08d_" % index + name.encode("utf-8"), datum.SerializeToString()
        if first is None:
            raise DataError(f"None of the {len(entries)} images listed in '{list_file}' could be read (see the "
                            "messages above); nothing was written. Check ROOTFOLDER and the paths.")

    written = write_lmdb(output, records(), map_size=1 << 28, on_commit=lambda n: echo(f"Processed {n} files."))
    if skipped:
        echo(f"Skipped {len(skipped)} of {len(entries)} images that could not be read (listed above); "
             f"{written} written to {output}.")
    return ImagesetResult(output, written, tuple(skipped))
