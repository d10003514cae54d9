"""Images read from files: Caffe's ImageData list files and ImageNet-style class folders.

ImageData (Caffe). ``source`` is a text file with one ``path label`` line per image; as in Caffe the label is
after the LAST space, so paths may contain spaces. Blank lines are skipped; a line without a space or with a
label that is not a non-negative integer is an error (Caffe's atoi would silently read 0). Paths are relative to
``root_folder`` (joined as a folder: Caffe concatenates the strings, so its root_folder needs a trailing slash;
both spellings work here) and relative root folders to the working directory, as in Caffe. Images are decoded as
OpenCV does for Caffe: colour images in BGR channel order (``is_color: true``, the default) or one grey channel
(``is_color: false``, luma 0.299 R + 0.587 G + 0.114 B, rounded; OpenCV's libpng path truncates, so grey
levels can differ by 1), then resized to new_height x new_width when both are set.

IMAGE_FOLDER (slim). ``source`` holds one sub-folder per class; the sorted sub-folder names are labels 0..K-1 and
every image below a class folder (recursively, in sorted order) is a sample. If ``source`` has a ``train``
sub-folder and a ``val`` or ``test`` one, those are the two splits (slim_data_param.train picks one); otherwise
``source`` itself is the class root. Images are RGB (3 channels), the order of the datasets' torchvision recipes.

Resizing is bilinear with OpenCV's INTER_LINEAR sampling (pixel centres aligned, no antialiasing, rounded to
uint8); results can differ from OpenCV's fixed-point arithmetic by 1 grey level.

All images must have the same size (after resizing), since a batch is one tensor: set new_height and new_width
otherwise. Every file is opened when the layer is created (its header only) so a missing or undecodable file is
reported before training; decoding happens batch by batch, on a few threads.

Decoding needs Pillow (``pip install slim[image]``).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slim.data.source import optional_module
from slim.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "FileSamples", "parse_image_list", "read_image_list", "scan_image_folder",
           "open_image_data", "open_image_folder", "decode_image", "resize_bilinear", "image_header"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")

# The worker threads that decode a batch (Pillow releases the GIL while decoding).
_DECODE_THREADS = min(8, os.cpu_count() or 1)


def _pillow(where: str):
    return optional_module("PIL.Image", where=where, needed_for="reading image files", what="Pillow", extra="image",
                           pip_name="pillow")


def image_header(source, *, where: str) -> tuple[int, int, str]:
    """(height, width, Pillow mode) of an image, from its header; the pixels are not decoded.

    Args:
        source: a path or the encoded bytes.
        where: names the layer (and file) in error messages.

    Raises:
        DataError: the file is missing or is not an image Pillow can identify.
    """
    import io

    image_module = _pillow(where)
    try:
        with image_module.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.height, im.width, im.mode
    except FileNotFoundError as e:
        raise DataError(f"{where}: the image file does not exist. Fix the path or remove the entry.") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{where}: the image cannot be decoded ({e}). Replace or remove the file.") from e


def decode_image(source, *, color: str, where: str) -> np.ndarray:
    """Decodes an image into a (C, H, W) uint8 array.

    Args:
        source: a path or the encoded bytes.
        color: "bgr" (3 channels, as OpenCV's IMREAD_COLOR), "rgb" (3 channels), "gray" (1 channel, as
            IMREAD_GRAYSCALE) or "native" (as IMREAD_UNCHANGED: grey images keep 1 channel, colour ones are BGR,
            with alpha BGRA).
        where: names the layer (and file) in error messages.

    Raises:
        DataError: the file is missing or cannot be decoded.
    """
    import io

    image_module = _pillow(where)
    try:
        with image_module.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if color == "native":
                mode = {"1": "L", "L": "L", "I;16": "L", "I": "L", "LA": "RGBA", "RGBA": "RGBA", "PA": "RGBA"}.get(
                    im.mode, "RGBA" if "transparency" in im.info else "RGB")
                color = {"L": "gray", "RGB": "bgr", "RGBA": "bgra"}[mode]
            mode = {"gray": "L", "bgr": "RGB", "rgb": "RGB", "bgra": "RGBA"}[color]
            array = np.asarray(im.convert(mode))
    except FileNotFoundError as e:
        raise DataError(f"{where}: the image file does not exist. Fix the path or remove the entry.") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: the image cannot be decoded ({e}). Replace or remove the file.") from e
    if array.ndim == 2:
        return np.ascontiguousarray(array[None])
    if color in ("bgr", "bgra"):
        # OpenCV, and so Caffe, stores colour images as BGR(A).
        array = array[..., [2, 1, 0, 3][:array.shape[2]]]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # OpenCV INTER_LINEAR: source coordinate (d + 0.5) * n_in / n_out - 0.5, clamped to the first/last pixel.
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(x).astype(np.int64)
    frac = x - i0
    frac[i0 < 0] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    frac[i0 >= n_in - 1] = 0.0
    return i0, np.minimum(i0 + 1, n_in - 1), frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a (C, H, W) uint8 image to (C, height, width) as OpenCV's cv::resize with INTER_LINEAR.

    The result is rounded to uint8; OpenCV's fixed-point arithmetic can differ by 1.
    """
    c, h, w = image.shape
    if (h, w) == (height, width):
        return image
    r0, r1, fr = _linear_taps(h, height)
    c0, c1, fc = _linear_taps(w, width)
    x = image.astype(np.float32)
    rows = x[:, r0, :] * (1 - fr)[:, None] + x[:, r1, :] * fr[:, None]
    out = rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass
class FileSamples:
    """Images in files, decoded batch by batch.

    Attributes:
        paths: one file per sample.
        labels: int64 (N,).
        shape: (C, H, W) every decoded (and resized) image has.
        color: how to decode (see `decode_image`).
        resize: (height, width) to resize to, or None.
        names: per sample, how messages name it (e.g. "list.txt line 12: a.png").
        where: names the layer in messages.
    """

    paths: list
    labels: np.ndarray
    shape: tuple[int, int, int]
    color: str
    resize: tuple[int, int] | None
    names: list
    where: str

    @property
    def num_samples(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> np.ndarray:
        where = f"{self.where}: {self.names[i]}"
        image = decode_image(self.paths[i], color=self.color, where=where)
        if self.resize:
            image = resize_bilinear(image, *self.resize)
        if image.shape != self.shape:
            raise DataError(f"{where}: the image decodes to {image.shape[0]}x{image.shape[1]}x{image.shape[2]} "
                            f"(CxHxW) but the layer's images are {'x'.join(map(str, self.shape))}. Set new_height "
                            "and new_width to resize every image to one size.")
        return image

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = [int(i) for i in indices]
        if len(indices) > 1 and _DECODE_THREADS > 1:
            with ThreadPoolExecutor(min(_DECODE_THREADS, len(indices))) as pool:
                images = list(pool.map(self._load, indices))
        else:
            images = [self._load(i) for i in indices]
        return np.stack(images), self.labels[indices]


def parse_image_list(path, *, where: str) -> list[tuple[int, str, int]]:
    """The entries of a Caffe image list (ImageData's source, convert_imageset's LISTFILE): one ``path label`` line
    per image, the label after the LAST space (so paths may contain spaces); blank lines are skipped.

    Args:
        path: the list file; it must exist (callers say which flag or field named it when it does not).
        where: names the caller in messages (a layer, or a command).

    Returns:
        (line number, relative path as written, label) per entry, in file order.

    Raises:
        DataError: a line without a label, or with a label that is not a non-negative integer (Caffe's atoi would
            silently read 0).
    """
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n").strip()
            if not line:
                continue
            name, _, label = line.rpartition(" ")  # Caffe: the label follows the last space
            name = name.rstrip()
            if not name or not label.isdigit():
                raise DataError(f"{where}: line {number} of '{path}' reads {line!r}; expected 'path label' with "
                                "a non-negative integer label after the last space.")
            entries.append((number, name, int(label)))
    return entries


def read_image_list(source: str, root_folder: str, *, where: str) -> tuple[list, np.ndarray, list]:
    """Parses an ImageData list file (see `parse_image_list`).

    Returns:
        (paths, int64 labels, names for messages), one per non-blank line.

    Raises:
        DataError: the file is missing or empty, or a line is malformed.
    """
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{where}: the image list '{source}' (image_data_param.source) does not exist. Give a text "
                        "file with one 'path label' line per image.")
    paths, labels, names = [], [], []
    root = Path(root_folder) if root_folder else None
    for number, name, label in parse_image_list(source, where=where):
        paths.append(root / name if root else Path(name))
        labels.append(label)
        names.append(f"'{source}' line {number} ({name})")
    if not paths:
        raise DataError(f"{where}: the image list '{source}' has no entries; add 'path label' lines.")
    return paths, np.asarray(labels, dtype=np.int64), names


def scan_image_folder(source: str, train: bool, *, where: str) -> tuple[list, np.ndarray, list[str]]:
    """Lists an ImageNet-style folder: one sub-folder per class.

    Returns:
        (paths, int64 labels, class names) with labels indexing the sorted class names.

    Raises:
        DataError: the folder is missing, has no class folders, or a class has no images.
    """
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"{where}: the image folder '{source}' (slim_data_param.source) does not exist. Give a "
                        "folder with one sub-folder of images per class.")
    held = (root / "val") if (root / "val").is_dir() else (root / "test")
    if (root / "train").is_dir() and held.is_dir():
        root = root / "train" if train else held
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: the image folder '{root}' has no class sub-folders; put each class's images in "
                        "a sub-folder named after the class.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DataError(f"{where}: the class folder '{root / name}' holds no images (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64), classes


def _check_headers(paths, names, color_channels: int, resize, *, where: str) -> tuple[int, int, int]:
    """Opens every file's header; returns the common (C, H, W) or raises naming the first odd file."""
    shape = None
    for p, name in zip(paths, names):
        h, w, _ = image_header(p, where=f"{where}: {name}")
        size = resize or (h, w)
        if shape is None:
            shape, first = size, name
        elif size != shape:
            raise DataError(f"{where}: {name} is {h}x{w} but {first} is {shape[0]}x{shape[1]}; a batch needs images "
                            "of one size. Set new_height and new_width to resize them all.")
    return (color_channels,) + tuple(shape)


def _resize_param(new_height: int, new_width: int, where: str):
    if bool(new_height) != bool(new_width):
        raise DataError(f"{where}: new_height is {new_height} and new_width is {new_width}; as in Caffe, set both "
                        "(to resize) or neither.")
    return (int(new_height), int(new_width)) if new_height else None


def open_image_data(param, *, where: str, headers: bool = True) -> FileSamples:
    """The samples of a Caffe ImageData layer (image_data_param).

    Args:
        param: the layer's image_data_param.
        where: names the layer in messages.
        headers: open every image's header now (False reads only the first one, for shape inference).
    """
    resize = _resize_param(param.new_height, param.new_width, where)
    paths, labels, names = read_image_list(param.source, param.root_folder, where=where)
    color = "bgr" if param.is_color else "gray"
    channels = 3 if param.is_color else 1
    count = len(paths) if headers else 1
    shape = _check_headers(paths[:count], names[:count], channels, resize, where=where)
    return FileSamples(paths, labels, shape, color, resize, names, where)


def open_image_folder(param, *, where: str, headers: bool = True) -> FileSamples:
    """The samples of a SlimData IMAGE_FOLDER layer (slim_data_param)."""
    resize = _resize_param(param.new_height, param.new_width, where)
    paths, labels, _ = scan_image_folder(param.source, param.train, where=where)
    names = [str(p) for p in paths]
    count = len(paths) if headers else 1
    shape = _check_headers(paths[:count], names[:count], 3, resize, where=where)
    return FileSamples(paths, labels, shape, "rgb", resize, names, where)
