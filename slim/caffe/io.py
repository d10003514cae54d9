"""pycaffe's ``caffe.io``: the input Transformer, image loading and resizing, oversampling, and the BlobProto and Datum
converters, written from pycaffe's documented behaviour.

Images follow pycaffe's conventions: ``load_image`` gives H x W x K float32 in [0, 1], RGB; the Transformer turns
that into the net's K x H x W layout (``set_transpose``), channel order (``set_channel_swap``), range
(``set_raw_scale``), mean (``set_mean``) and scale (``set_input_scale``), in that order.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from slim import proto as caffe_pb2
from slim.errors import DataError

__all__ = ["Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array", "array_to_blobproto",
           "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist", "array_to_datum",
           "datum_to_array"]

# skimage's rgb2gray weights (ITU-R 709 luma), which pycaffe's load_image(color=False) applies.
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], np.float32)


# ----- BlobProto and Datum ----------------------------------------------------------------------------------------
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array of its shape: the legacy num/channels/height/width when any of them is
    set, else ``shape.dim``."""
    values = np.asarray(blob.diff if return_diff else blob.data, dtype=np.float32)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    if int(np.prod(shape, dtype=np.int64)) != values.size:
        raise DataError(f"the BlobProto declares shape {shape} but holds {values.size} "
                        f"{'diff' if return_diff else 'data'} values.")
    return values.reshape(shape)


def array_to_blobproto(arr, diff=None):
    """A BlobProto holding ``arr`` (and ``diff``, of the same shape) with its shape in ``shape.dim``."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise DataError(f"array_to_blobproto: the diff has shape {diff.shape}, the data {arr.shape}; they must be "
                            f"equal.")
        blob.diff.extend(diff.astype(np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist: Sequence) -> bytes:
    """The serialized BlobProtoVector of a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list:
    """The arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr, label: Optional[int] = None):
    """A Datum of a C x H x W array: uint8 arrays go to ``data`` as bytes, others to ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DataError(f"array_to_datum needs a 3-D array (channels, height, width), got shape {arr.shape}.")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum) -> np.ndarray:
    """A Datum's values as a C x H x W array: uint8 from ``data``, else float from ``float_data`` (not decoding an
    encoded image)."""
    shape = (datum.channels, datum.height, datum.width)
    if datum.encoded:
        raise DataError("datum_to_array: the Datum holds an encoded image (encoded: true); decode its data bytes "
                        "as an image instead.")
    values = np.frombuffer(datum.data, np.uint8) if datum.data else np.asarray(datum.float_data, dtype=np.float64)
    if values.size != int(np.prod(shape)):
        raise DataError(f"the Datum declares {shape[0]}x{shape[1]}x{shape[2]} but holds {values.size} values.")
    return values.reshape(shape)


# ----- images -----------------------------------------------------------------------------------------------------
def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as H x W x 3 (``color``) or H x W x 1 float32 in [0, 1], RGB (Pillow decodes it).

    Raises:
        DataError: Pillow is missing, the file does not exist or cannot be decoded.
    """
    from slim.data.folder import decode_image

    rgb = decode_image(str(filename), color="rgb", where=f"caffe.io.load_image('{filename}')")
    img = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    if not color:
        img = (img @ _GRAY_WEIGHTS)[:, :, None]
    return img


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K image to ``new_dims`` (height, width): nearest (``interp_order`` 0), bilinear (1) or
    bicubic (3) with pixel centres aligned (skimage's mapping), channels kept.

    Raises:
        DataError: another interpolation order, or an image that is not H x W x K.
    """
    import torch
    from torch.nn import functional as F

    im = np.asarray(im)
    if im.ndim != 3:
        raise DataError(f"resize_image needs an H x W x K image, got shape {im.shape}.")
    modes = {0: "nearest", 1: "bilinear", 3: "bicubic"}
    if interp_order not in modes:
        raise DataError(f"resize_image: interp_order {interp_order} is not supported; use 0 (nearest), 1 (bilinear) "
                        f"or 3 (bicubic).")
    h, w = int(new_dims[0]), int(new_dims[1])
    if im.shape[:2] == (h, w):
        return im.astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32).transpose(2, 0, 1))[None]
    kwargs = {} if interp_order == 0 else {"align_corners": False}
    y = F.interpolate(x, size=(h, w), mode=modes[interp_order], **kwargs)
    return y[0].numpy().transpose(1, 2, 0).copy()


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """Ten crops of each H x W x K image: the four corners and the centre, then the same five mirrored left-right.

    Returns:
        (10 N) x crop_h x crop_w x K float32, ten per image in that order.
    """
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    out = []
    for im in images:
        h, w = im.shape[:2]
        if ch > h or cw > w:
            raise DataError(f"oversample: crop {ch}x{cw} is larger than the image {h}x{w}.")
        top, left = int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0)
        corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left)]
        crops = [im[i:i + ch, j:j + cw, :] for i, j in corners]
        out.extend(crops)
        out.extend(c[:, ::-1, :] for c in crops)
    return np.asarray(out, dtype=np.float32)


# ----- Transformer ------------------------------------------------------------------------------------------------
class Transformer:
    """Turns images into a net's input layout and back (pycaffe's ``caffe.io.Transformer``).

    Args:
        inputs: input blob name -> its shape (N, K, H, W), e.g. ``{'data': net.blobs['data'].data.shape}``.

    ``preprocess(name, image)``: float32; resize to the input's H x W; ``transpose``; ``channel_swap``; times
    ``raw_scale``; minus ``mean``; times ``input_scale``. ``deprocess`` undoes these in reverse order (not the resize).
    """

    def __init__(self, inputs: Dict[str, Sequence[int]]) -> None:
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: Dict[str, tuple] = {}
        self.channel_swap: Dict[str, tuple] = {}
        self.raw_scale: Dict[str, float] = {}
        self.mean: Dict[str, np.ndarray] = {}
        self.input_scale: Dict[str, float] = {}

    def _check(self, name: str) -> None:
        if name not in self.inputs:
            raise DataError(f"Transformer: {name!r} is not one of its inputs {sorted(self.inputs)}.")

    def preprocess(self, name: str, data) -> np.ndarray:
        """An H x W x K image (any size) as the input ``name`` expects it: K x H x W after the set transforms."""
        self._check(name)
        x = np.asarray(data).astype(np.float32, copy=False)
        dims = self.inputs[name][2:]
        if x.shape[:2] != tuple(dims):
            x = resize_image(x, dims)
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name]), :, :]
        x = np.array(x, dtype=np.float32)   # owned: the steps below work in place
        if name in self.raw_scale:
            x *= self.raw_scale[name]
        if name in self.mean:
            x -= self.mean[name]
        if name in self.input_scale:
            x *= self.input_scale[name]
        return x

    def deprocess(self, name: str, data) -> np.ndarray:
        """Undo ``preprocess`` (except the resize) on one input item: K x H x W back to H x W x K."""
        self._check(name)
        x = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            x /= self.input_scale[name]
        if name in self.mean:
            x += self.mean[name]
        if name in self.raw_scale:
            x /= self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x

    def set_transpose(self, name: str, order: Sequence[int]) -> None:
        """The axis order taking an image to the input's layout, e.g. (2, 0, 1) for H x W x K -> K x H x W."""
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise DataError(f"Transformer.set_transpose({name!r}, {tuple(order)}): the order needs "
                            f"{len(self.inputs[name]) - 1} axes, as the input's items have.")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name: str, order: Sequence[int]) -> None:
        """The channel order after transposing, e.g. (2, 1, 0) for RGB -> BGR."""
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise DataError(f"Transformer.set_channel_swap({name!r}, {tuple(order)}): the input has "
                            f"{self.inputs[name][1]} channels; give one index per channel.")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name: str, scale: float) -> None:
        """A factor applied before the mean, e.g. 255 for images in [0, 1] and a mean in [0, 255]."""
        self._check(name)
        self.raw_scale[name] = scale

    def set_mean(self, name: str, mean) -> None:
        """The mean to subtract: one value per channel (K,), or a whole K x H x W (or H x W) mean image."""
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        channels, dims = self.inputs[name][1], self.inputs[name][1:]
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise DataError(f"Transformer.set_mean({name!r}): {mean.shape[0]} channel means for an input of "
                                f"{channels} channels.")
            mean = mean[:, None, None]
        else:
            shape = (1,) + mean.shape if mean.ndim == 2 else mean.shape
            if len(shape) != 3 or shape[1:] != dims[1:] or shape[0] not in (1, channels):
                raise DataError(f"Transformer.set_mean({name!r}): a mean of shape {mean.shape} does not fit the "
                                f"input's items {dims}; give (K,), (K, H, W) or (H, W) with the input's sizes.")
        self.mean[name] = mean

    def set_input_scale(self, name: str, scale: float) -> None:
        """A factor applied after the mean (e.g. 0.017 for a standard-deviation scaling)."""
        self._check(name)
        self.input_scale[name] = scale
