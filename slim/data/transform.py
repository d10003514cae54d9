"""Caffe's DataTransformer, applied to a whole batch at once on the training device.

Caffe transforms one image at a time on the CPU (data_transformer.cpp). For each image, with (C, H, W) its raw
shape, crop size ``k`` and ``scale`` s::

    mirror  = transform_param.mirror and Rand(2)          # random in EITHER phase (Caffe's behaviour)
    h_off   = Rand(H - k + 1) at TRAIN,  (H - k) / 2 at TEST   (w_off likewise; 0 when crop_size is 0)
    out[c, h, w'] = (x[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * s,
    w' = k - 1 - w when mirrored else w

where ``mean`` is the mean_file image (shape 1 x C x H x W, indexed with the same offsets as the image) or the
per-channel mean_value (one value is repeated over all channels). mean_file and mean_value are exclusive.

Here the same formula runs on a batch tensor: per-sample offsets and mirror flags are drawn at once from a
``torch.Generator`` and the crop and mirror are one pair of ``gather`` calls, so nothing is done per sample in
Python.

slim's extension ``transform_param.pad`` (field 1000) zero-pads each side of the RAW image before the crop, as
the CIFAR recipes of network slimming do (pad 4, random 32x32 crop): their code pads the PIL image with zeros and
normalises afterwards, so a padded pixel becomes ``(0 - mean) * scale``, not 0. Here too a padded pixel is 0 before
the mean is subtracted. A mean_file is extended over the padding by repeating its border pixels. The crop offsets
then range over the padded image (``Rand(H + 2 pad - k + 1)``); a TEST-phase center crop of a padded image is the
center crop of the unpadded one when ``k <= H``.

The specification (`TransformSpec`) and its output shape need only numpy, so a net's shapes can be inferred
without torch; torch is imported by the functions that run on tensors.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slim import proto as pb
from slim.errors import DataError, ParseError

__all__ = ["TransformSpec", "Augmentation", "build_transform", "transform_output_shape", "read_mean_file"]


@dataclass(frozen=True)
class TransformSpec:
    """What one data layer's transform_param asks for, checked against the raw image shape.

    Attributes:
        phase: pb.TRAIN (random crop offsets) or pb.TEST (center crop).
        in_shape: raw image shape (C, H, W), before padding.
        crop_size: side of the square crop; 0 keeps the whole (padded) image.
        pad: zeros added on each side of the raw image before the crop.
        mirror: mirror each image with probability 1/2 (in either phase, as Caffe).
        scale: multiplies the mean-subtracted value.
        mean: mean image of shape in_shape (float32), or None.
        mean_values: one value per channel (already repeated from a single value), or ().
    """

    phase: int
    in_shape: tuple[int, int, int]
    crop_size: int = 0
    pad: int = 0
    mirror: bool = False
    scale: float = 1.0
    mean: np.ndarray | None = field(default=None, repr=False, compare=False)
    mean_values: tuple[float, ...] = ()
    _device_means: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """The raw shape after padding: (C, H + 2 pad, W + 2 pad)."""
        c, h, w = self.in_shape
        return c, h + 2 * self.pad, w + 2 * self.pad

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """The transformed image shape (C, crop, crop), or the padded shape without a crop."""
        c, h, w = self.padded_shape
        return (c, self.crop_size, self.crop_size) if self.crop_size else (c, h, w)

    @property
    def is_identity(self) -> bool:
        """True when the transform only converts to float32."""
        return (not self.crop_size and not self.pad and not self.mirror and self.scale == 1.0
                and self.mean is None and not self.mean_values)

    def draw(self, n: int, generator) -> "Augmentation":
        """Draws the random part of the transform for ``n`` images (on the CPU, so results do not depend on the device).

        Args:
            n: batch size.
            generator: a CPU ``torch.Generator``.
        """
        import torch

        _, hp, wp = self.padded_shape
        k = self.crop_size
        if k and self.phase == pb.TRAIN:
            # Caffe: h_off = Rand(H - k + 1), w_off = Rand(W - k + 1), per image.
            h_off = torch.randint(0, hp - k + 1, (n,), generator=generator)
            w_off = torch.randint(0, wp - k + 1, (n,), generator=generator)
        elif k:
            # Caffe's TEST phase: the center crop, rounding the offset down.
            h_off = torch.full((n,), (hp - k) // 2, dtype=torch.int64)
            w_off = torch.full((n,), (wp - k) // 2, dtype=torch.int64)
        else:
            h_off = torch.zeros(n, dtype=torch.int64)
            w_off = torch.zeros(n, dtype=torch.int64)
        if self.mirror:
            flip = torch.randint(0, 2, (n,), generator=generator).bool()
        else:
            flip = torch.zeros(n, dtype=torch.bool)
        return Augmentation(h_off, w_off, flip)

    def apply(self, images, aug: "Augmentation"):
        """Transforms a batch: ``(crop(mirror(pad(x))) - mean) * scale``, as float32 on the images' device.

        Args:
            images: tensor (N, C, H, W), uint8 or float32, on the target device; shape ``in_shape``.
            aug: offsets and mirror flags from `draw` (CPU tensors).

        Returns:
            A float32 tensor of shape (N,) + out_shape on the images' device.
        """
        import torch
        import torch.nn.functional as F

        assert tuple(images.shape[1:]) == self.in_shape, (images.shape, self.in_shape)
        if self.is_identity:
            x = images.float()
            return x if x is not images else x.clone()
        device, p = images.device, self.pad
        # Pad, crop and mirror move pixels only, so they run on the raw (often uint8) values before the conversion.
        x = F.pad(images, (p, p, p, p)) if p else images  # zeros: padded pixels are 0 before the mean subtraction
        n, c, hp, wp = x.shape
        _, ho, wo = self.out_shape
        index = None
        if self.crop_size or self.mirror:
            rows = aug.h_off.to(device)[:, None] + torch.arange(ho, device=device)  # (N, ho)
            steps = torch.arange(wo, device=device)
            # A mirrored output column w' reads source column w_off + (k - 1 - w'): crop and mirror in one gather.
            steps = torch.where(aug.flip.to(device)[:, None], wo - 1 - steps, steps)
            cols = aug.w_off.to(device)[:, None] + steps  # (N, wo)
            index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, ho * wo).expand(n, c, ho * wo)
            x = x.reshape(n, c, hp * wp).gather(2, index).reshape(n, c, ho, wo)
        x = x.float()
        if self.mean is not None:
            # mean_file: Caffe subtracts it at the source coordinates (data_index), so it takes the same crop.
            mean = self._device_means.get(str(device))
            if mean is None:  # copied to the device (and padded) once
                mean = torch.from_numpy(self.mean).to(device)
                if p:
                    mean = F.pad(mean[None], (p, p, p, p), mode="replicate")[0]
                self._device_means[str(device)] = mean
            if index is None:
                x = x - mean
            else:
                x = x - mean.reshape(1, c, hp * wp).expand(n, c, hp * wp).gather(2, index).reshape(n, c, ho, wo)
        if self.mean_values:
            x = x - torch.tensor(self.mean_values, dtype=torch.float32, device=device)[:, None, None]
        if self.scale != 1.0:
            x = x * self.scale
        return x.contiguous()


@dataclass(frozen=True)
class Augmentation:
    """The random draws of one batch: crop offsets into the padded image and mirror flags, one per image."""

    h_off: "object"  # torch.int64 (N,)
    w_off: "object"  # torch.int64 (N,)
    flip: "object"  # torch.bool (N,)


def transform_output_shape(param: pb.TransformationParameter, in_shape: tuple[int, int, int], *,
                           where: str) -> tuple[int, int, int]:
    """The image shape a transform_param produces from raw images of ``in_shape``, without reading any file.

    Args:
        param: the layer's transform_param.
        in_shape: raw (C, H, W).
        where: names the layer in error messages, e.g. 'layer "data" (Data)'.

    Raises:
        DataError: the crop does not fit the (padded) image, or pad is given without crop_size.
    """
    c, h, w = in_shape
    k, p = int(param.crop_size), int(param.pad)
    if p and not k:
        raise DataError(f"{where}: transform_param.pad is {p} but crop_size is 0; padding only makes sense before a "
                        "random crop. Set crop_size (e.g. crop_size: 32 with pad: 4 for CIFAR) or remove pad.")
    if k and (k > h + 2 * p or k > w + 2 * p):
        padded = f" padded by {p} to {h + 2 * p}x{w + 2 * p}" if p else ""
        raise DataError(f"{where}: transform_param.crop_size {k} is larger than the {h}x{w} images{padded}. "
                        f"Set crop_size to at most {min(h, w) + 2 * p}, or resize the images (new_height/new_width).")
    return (c, k, k) if k else (c, h + 2 * p, w + 2 * p)


def read_mean_file(path: str, *, where: str) -> np.ndarray:
    """Reads a Caffe mean file (.binaryproto holding one BlobProto) as a float32 array.

    Args:
        path: the .binaryproto file.
        where: names the layer in error messages.

    Raises:
        DataError: the file is missing or is not a BlobProto.
    """
    if not Path(path).is_file():
        raise DataError(f"{where}: transform_param.mean_file '{path}' does not exist. Give the path of a mean "
                        "image .binaryproto (as written by Caffe's compute_image_mean), or use mean_value.")
    from slim.io.binary import read_blobproto  # imported here: the io layer is not needed to read datasets

    try:
        return np.asarray(read_blobproto(path), dtype=np.float32)
    except ParseError as e:
        raise DataError(f"{where}: transform_param.mean_file '{path}' could not be read as a BlobProto ({e}). "
                        "Give a .binaryproto mean image written by Caffe's compute_image_mean.") from e


def build_transform(param: pb.TransformationParameter, *, phase: int, in_shape: tuple[int, int, int],
                    where: str) -> TransformSpec:
    """Checks a transform_param against the raw image shape and loads its mean file.

    Args:
        param: the layer's transform_param.
        phase: pb.TRAIN or pb.TEST (the layer's phase decides random versus center crops).
        in_shape: raw (C, H, W) of the images the layer reads.
        where: names the layer in error messages.

    Raises:
        DataError: crop too large, pad without crop, mean_file with mean_value, a mean of the wrong shape, or a
            mean_value count that is neither 1 nor C.
    """
    transform_output_shape(param, in_shape, where=where)
    c, h, w = in_shape
    mean = None
    if param.mean_file and len(param.mean_value):
        raise DataError(f"{where}: transform_param sets both mean_file and mean_value; Caffe refuses this "
                        "('Cannot specify mean_file and mean_value at the same time'). Keep one of them.")
    if param.mean_file:
        mean = read_mean_file(param.mean_file, where=where)
        # Caffe: the mean blob must have the datum's channels, height and width (num is 1).
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.shape != (c, h, w):
            raise DataError(f"{where}: the mean image '{param.mean_file}' has shape {tuple(mean.shape)} but the "
                            f"images are {c}x{h}x{w} (CxHxW) before cropping; Caffe requires the mean to match the "
                            "uncropped images. Recompute the mean with compute_image_mean on the same data.")
        mean = np.ascontiguousarray(mean, dtype=np.float32)
    mean_values: tuple[float, ...] = ()
    if len(param.mean_value):
        values = [float(v) for v in param.mean_value]
        if len(values) not in (1, c):
            raise DataError(f"{where}: transform_param has {len(values)} mean_value entries for {c}-channel images; "
                            f"give either 1 mean_value or exactly {c} (one per channel, in channel order).")
        mean_values = tuple(values * c if len(values) == 1 else values)
    return TransformSpec(phase=phase, in_shape=tuple(in_shape), crop_size=int(param.crop_size), pad=int(param.pad),
                         mirror=bool(param.mirror), scale=float(param.scale), mean=mean, mean_values=mean_values)
