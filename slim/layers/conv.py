"""Convolution and Deconvolution (ConvolutionParameter), N-D over the spatial axes after the channel axis.

Blob layout: Convolution weight (Cout, Cin/group, *kernel), Deconvolution weight (Cin, Cout/group, *kernel); bias
(Cout,) when bias_term (default true). Geometry fields are repeated (one value, or one per spatial axis) with 2-D
``*_h``/``*_w`` overrides, which may not be mixed with the repeated forms.
"""

import math
from typing import List, Tuple

from slim import proto as pb
from slim.layers._lazy import F
from slim.layers.base import ChannelRole, Layer, count, register
from slim.layers.fillers import fill_weight_and_bias

__all__ = ["Convolution", "Deconvolution", "conv_geometry"]


def conv_geometry(cp, num_spatial: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """(kernel, stride, pad, dilation) per spatial axis from a ConvolutionParameter, with Caffe's checks."""

    def pick(repeated, h_field, w_field, default, what):
        if cp.HasField(h_field) or cp.HasField(w_field):
            if num_spatial != 2:
                raise ValueError(f"{h_field}/{w_field} are only for 2-D convolution, the input has "
                                 f"{num_spatial} spatial axes")
            if len(repeated):
                raise ValueError(f"give either {what} or {h_field}/{w_field}, not both")
            if not (cp.HasField(h_field) and cp.HasField(w_field)):
                raise ValueError(f"give both {h_field} and {w_field}")
            return [getattr(cp, h_field), getattr(cp, w_field)]
        vals = list(repeated)
        if not vals:
            if default is None:
                raise ValueError(f"{what} is required (kernel_size, or kernel_h and kernel_w)")
            return [default] * num_spatial
        if len(vals) == 1:
            return vals * num_spatial
        if len(vals) != num_spatial:
            raise ValueError(f"{what} has {len(vals)} values for {num_spatial} spatial axes; give 1 or "
                             f"{num_spatial}")
        return vals

    kernel = pick(cp.kernel_size, "kernel_h", "kernel_w", None, "kernel_size")
    stride = pick(cp.stride, "stride_h", "stride_w", 1, "stride")
    pad = pick(cp.pad, "pad_h", "pad_w", 0, "pad")
    if len(cp.dilation) not in (0, 1, num_spatial):
        raise ValueError(f"dilation has {len(cp.dilation)} values for {num_spatial} spatial axes")
    dilation = list(cp.dilation) * (num_spatial if len(cp.dilation) == 1 else 1) or [1] * num_spatial
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel size must be positive, found {kernel}")
    if any(s <= 0 for s in stride):
        raise ValueError(f"stride must be positive, found {stride}")
    return kernel, stride, pad, dilation


class _ConvBase(Layer):
    num_bottoms = (1, None)
    num_tops = (1, None)
    cost_kind = "conv"
    transposed = False

    def setup(self):
        cp = self.param.convolution_param
        if len(self.param.top) != len(self.param.bottom):
            raise ValueError(f"needs one top per bottom, found {len(self.param.bottom)} bottoms and "
                             f"{len(self.param.top)} tops")
        shape = self.bottom_shapes[0]
        if any(s != shape for s in self.bottom_shapes):
            raise ValueError(f"all bottoms must have the same shape, found {self.bottom_shapes}")
        if cp.axis not in (1, -len(shape) + 1):
            raise ValueError(f"only axis 1 (channels after the batch axis) is supported, found {cp.axis}")
        if len(shape) < 3 or len(shape) > 5:
            raise ValueError(f"input must have 1 to 3 spatial axes (3-D to 5-D), found shape {shape}")
        self.num_spatial = len(shape) - 2
        self.kernel, self.stride, self.pad, self.dilation = conv_geometry(cp, self.num_spatial)
        self.group = cp.group
        cin = shape[1]
        cout = cp.num_output
        if cout <= 0:
            raise ValueError("num_output must be positive")
        if self.group <= 0 or cin % self.group or cout % self.group:
            raise ValueError(f"group {self.group} must divide both the input channels ({cin}) and num_output ({cout})")
        self.channels_in, self.channels_out = cin, cout
        out_spatial = []
        for i, size in enumerate(shape[2:]):
            out = self._out_size(size, self.kernel[i], self.stride[i], self.pad[i], self.dilation[i])
            if out <= 0:
                ext = self.dilation[i] * (self.kernel[i] - 1) + 1
                raise ValueError(f"the kernel extent {ext} is larger than the padded input {size + 2 * self.pad[i]} "
                                 f"of bottom {self.param.bottom[0]!r} (shape {shape}); reduce kernel_size or add pad")
            out_spatial.append(out)
        self.top_shapes = [(shape[0], cout, *out_spatial)] * len(self.param.top)
        self.blob_shapes = [self._weight_shape()]
        if cp.bias_term:
            self.blob_shapes.append((cout,))

    def channel_role(self) -> ChannelRole:
        # Weight (C_out, C_in/group, *k) for Convolution, (C_in, C_out/group, *k) for Deconvolution; bias (C_out,).
        out_axis, in_axis = (1, 0) if self.type == "Deconvolution" else (0, 1)
        outputs = ((0, out_axis),) + (((1, 0),) if len(self.blob_shapes) > 1 else ())
        # Without padding every output sees the whole kernel, so a constant input channel adds a constant.
        unpadded = self.type == "Convolution" and not any(self.pad) and len(self.param.bottom) == 1
        return ChannelRole("produces", channel_blobs=outputs, input_blobs=((0, in_axis),), group=self.group,
                           absorbs_constants=unpadded)

    def init_blobs(self, generator):
        return fill_weight_and_bias(self.param.convolution_param, self.blob_shapes, generator, f"layer {self.name!r}")


@register
class Convolution(_ConvBase):
    """Caffe's Convolution: output size floor((in + 2p - (d(k-1)+1)) / s) + 1."""

    type = "Convolution"

    @staticmethod
    def _out_size(size, k, s, p, d):
        return (size + 2 * p - (d * (k - 1) + 1)) // s + 1

    def _weight_shape(self):
        return (self.channels_out, self.channels_in // self.group, *self.kernel)

    def forward(self, blobs, bottoms):
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.num_spatial - 1]
        bias = blobs[1] if len(blobs) > 1 else None
        return [fn(x, blobs[0], bias, self.stride, self.pad, self.dilation, self.group) for x in bottoms]

    def macs(self):
        per_output = self.channels_in // self.group * math.prod(self.kernel)
        return sum(count(s) for s in self.top_shapes) * per_output


@register
class Deconvolution(_ConvBase):
    """Caffe's Deconvolution (transposed convolution): output size s(in-1) + d(k-1)+1 - 2p."""

    type = "Deconvolution"

    @staticmethod
    def _out_size(size, k, s, p, d):
        return s * (size - 1) + d * (k - 1) + 1 - 2 * p

    def _weight_shape(self):
        return (self.channels_in, self.channels_out // self.group, *self.kernel)

    def forward(self, blobs, bottoms):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.num_spatial - 1]
        bias = blobs[1] if len(blobs) > 1 else None
        return [fn(x, blobs[0], bias, self.stride, self.pad, 0, self.group, self.dilation) for x in bottoms]

    def macs(self):
        per_input = self.channels_out // self.group * math.prod(self.kernel)
        return sum(count(s) for s in self.bottom_shapes) * per_input
