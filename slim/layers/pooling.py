"""Pooling with Caffe's exact output sizes and averaging divisors.

Output size: ceil((in + 2p - k) / s) + 1 by default (round_mode CEIL; FLOOR uses floor); then, only when pad > 0,
the last window must start inside the image or the left padding: if (out - 1) * s >= in + p, out -= 1 (on both
axes as soon as either pad is non-zero).
torch applies that clip even without padding, so where the two disagree (e.g. in 6, k 1, s 2: Caffe 4, torch 3),
or where pad > k/2 (torch refuses it), the layer pads explicitly instead of using torch's implicit padding.
MAX ignores padding (Caffe's windows are clipped to the image; a window entirely outside gives -FLT_MAX). AVE
divides by the window size clipped to the padded extent, so padding counts as zeros but ceil overhang does not.
"""

import functools
import math
from typing import Optional

from slim import proto as pb
from slim.layers._lazy import F, torch
from slim.layers.base import ChannelRole, Layer, count, register

__all__ = ["Pooling", "pooled_size"]

FLT_MAX = 3.4028234663852886e38


def pooled_size(size: int, k: int, s: int, p: int, ceil: bool, padded: Optional[bool] = None) -> int:
    """Caffe's pooled output length along one axis.

    ``padded`` says whether the layer has any padding (pad_h or pad_w): Caffe clips the last window on both axes
    as soon as either pad is non-zero. None means "this axis is padded" (p > 0).
    """
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if (p > 0 if padded is None else padded) and (out - 1) * s >= size + p:
        out -= 1
    return out


def _torch_pooled_size(size, k, s, p, ceil):
    span = size + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


@register
class Pooling(Layer):
    """Caffe's Pooling layer (MAX and AVE, 2-D; STOCHASTIC is not supported). Optional second top: MAX's argmax."""

    type = "Pooling"
    num_tops = (1, 2)

    def setup(self):
        pp = self.param.pooling_param
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"Pooling needs a 4-D bottom (N, C, H, W), found {shape}")
        if pp.pool == pb.PoolingParameter.STOCHASTIC:
            raise ValueError("STOCHASTIC pooling is not supported (Caffe implements it on the GPU only); use MAX or "
                             "AVE")
        h, w = shape[2], shape[3]
        if pp.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise ValueError("global_pooling forbids kernel_size, kernel_h and kernel_w; remove them")
            kernel = (h, w)
        elif pp.HasField("kernel_size"):
            if pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise ValueError("give kernel_size or kernel_h/kernel_w, not both")
            kernel = (pp.kernel_size, pp.kernel_size)
        elif pp.HasField("kernel_h") and pp.HasField("kernel_w"):
            kernel = (pp.kernel_h, pp.kernel_w)
        else:
            raise ValueError("a kernel is required: kernel_size, kernel_h and kernel_w, or global_pooling: true")
        pad, stride = _h_w(pp, "pad"), _h_w(pp, "stride")
        if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
            raise ValueError("global_pooling requires pad 0 and stride 1")
        if min(kernel) <= 0 or min(stride) <= 0:
            raise ValueError(f"kernel {kernel} and stride {stride} must be positive")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise ValueError(f"pad {pad} must be smaller than the kernel {kernel}")
        self.kernel, self.stride, self.pad = kernel, stride, pad
        self.max = pp.pool == pb.PoolingParameter.MAX
        ceil = pp.round_mode == pb.PoolingParameter.CEIL
        self.ceil = ceil
        padded = any(pad)  # Caffe: `if (pad_h_ || pad_w_)` clips both axes
        out = tuple(pooled_size(n, k, s, p, ceil, padded) for n, k, s, p in zip((h, w), kernel, stride, pad))
        if min(out) <= 0:
            raise ValueError(f"the kernel {kernel} is larger than the padded input {h + 2 * pad[0]}x{w + 2 * pad[1]} "
                             f"of bottom {self.param.bottom[0]!r}; reduce kernel_size or add pad")
        self.out = out
        torch_out = tuple(_torch_pooled_size(n, k, s, p, ceil) for n, k, s, p in zip((h, w), kernel, stride, pad))
        self.native = torch_out == out and all(p <= k // 2 for p, k in zip(pad, kernel))
        if len(self.param.top) == 2:
            if not self.max:
                raise ValueError("a second top (the argmax mask) exists only for MAX pooling")
            if not self.native:
                raise ValueError("the argmax top is not supported for this pad/kernel/stride combination")
        self.top_shapes = [(shape[0], shape[1]) + out] * len(self.param.top)

    def channel_role(self) -> ChannelRole:
        if len(self.param.top) == 2:
            return ChannelRole("barrier")  # the argmax top holds positions, not values
        # MAX ignores padding and AVE without padding divides by what it sums, so a constant plane stays constant;
        # AVE with padding counts the zeros of the padding at the borders.
        return ChannelRole("passthrough", keeps_constants=self.max or not any(self.pad))

    def forward(self, blobs, bottoms):
        x = bottoms[0]
        if self.native:
            if self.max:
                if len(self.top_shapes) == 2:
                    y, idx = F.max_pool2d(x, self.kernel, self.stride, self.pad, 1, self.ceil, True)
                    return [y, idx.to(y.dtype)]
                return [F.max_pool2d(x, self.kernel, self.stride, self.pad, 1, self.ceil)]
            return [F.avg_pool2d(x, self.kernel, self.stride, self.pad, self.ceil, True)]
        return [self._explicit(x)]

    def _explicit(self, x):
        """Pad (or crop) so that the windows tile exactly ``out`` positions, then pool without implicit padding."""
        h, w = x.shape[2], x.shape[3]
        pads = []
        crops = []
        for n, k, s, p, o in zip((h, w), self.kernel, self.stride, self.pad, self.out):
            extent = (o - 1) * s + k  # from -p to the end of the last window
            right = extent - n - p
            pads.append((p, max(right, 0)))
            crops.append(n + min(right, 0))
        x = x[:, :, :crops[0], :crops[1]]
        padding = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])
        if self.max:
            return F.max_pool2d(F.pad(x, padding, value=-FLT_MAX), self.kernel, self.stride)
        # Every window lies inside the explicit padding, so avg_pool2d divides by the full kernel area; rescale to
        # Caffe's divisors. (Not divisor_override: ONNX's AveragePool has none and torch's exporters drop it.)
        mean = F.avg_pool2d(F.pad(x, padding), self.kernel, self.stride)
        # A fresh tensor each call from cached numbers: a cached tensor made while torch.export or torch.compile
        # traces would be a fake tensor, and would leak into every later eager call.
        rows, cols = self._divisor(h, w)
        area = float(self.kernel[0] * self.kernel[1])
        factor = (torch.tensor(rows, dtype=x.dtype, device=x.device)[:, None] *
                  torch.tensor(cols, dtype=x.dtype, device=x.device)[None, :]).reciprocal_().mul_(area)
        return mean * factor

    @functools.lru_cache(maxsize=4)
    def _divisor(self, h, w):
        """Caffe's AVE divisors along H and W: each window clipped to the padded extent."""
        sizes = []
        for n, k, s, p, o in zip((h, w), self.kernel, self.stride, self.pad, self.out):
            starts = [i * s - p for i in range(o)]
            sizes.append(tuple(min(a + k, n + p) - a for a in starts))
        return tuple(sizes)

    def macs(self):
        return count(self.top_shapes[0]) * math.prod(self.kernel)


def _h_w(pp, name: str) -> tuple:
    """(height, width) of a PoolingParameter field given as ``name`` or as ``name_h`` and ``name_w``."""
    if pp.HasField(f"{name}_h") or pp.HasField(f"{name}_w"):
        if pp.HasField(name):
            raise ValueError(f"give {name} or {name}_h/{name}_w, not both")
        return getattr(pp, f"{name}_h"), getattr(pp, f"{name}_w")
    value = getattr(pp, name)
    return value, value
