"""Element-wise layers: activations, Power/Exp/Log, Clip, Threshold and Dropout. Each keeps the bottom's shape."""

import copy
import math

from slim import proto as pb
from slim.layers._lazy import F, torch
from slim.layers.base import ChannelRole, Layer, count, register
from slim.layers.fillers import constant_filler, fill

__all__ = ["ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Swish", "Clip",
           "Threshold", "Dropout"]


class _Elementwise(Layer):
    def setup(self):
        self.top_shapes = [self.bottom_shapes[0]]
        self.check()

    def check(self):
        """Validate the layer's own parameter (ValueError with the specifics)."""

    def maps_zero_to_zero(self) -> bool:
        """Whether f(0) == 0 for this layer's parameter (with learned blobs of ones), declared without running it.

        The pruner reads this with no torch loaded; tests/test_layers.py checks every type against ``apply`` on 0.
        """
        return True

    def channel_role(self) -> ChannelRole:
        # Channel c of the top is a function of channel c of the bottom alone. Whether a silenced (zero) channel
        # stays zero decides whether removing it is exact downstream: f(0) == 0?
        return ChannelRole("passthrough", pointwise=True, zero_preserving=self.maps_zero_to_zero())

    def forward(self, blobs, bottoms):
        return [self.apply(bottoms[0], blobs)]

    def macs(self):
        return count(self.bottom_shapes[0])


def _simple(type_name, fn, zero_to_zero, doc):
    cls = type(type_name, (_Elementwise,), {"type": type_name, "__doc__": doc,
                                             "apply": lambda self, x, blobs: fn(x),
                                             "maps_zero_to_zero": lambda self: zero_to_zero})
    return register(cls)


Sigmoid = _simple("Sigmoid", lambda x: torch.sigmoid(x), False, "y = 1 / (1 + exp(-x)).")
TanH = _simple("TanH", lambda x: torch.tanh(x), True, "y = tanh(x).")
AbsVal = _simple("AbsVal", lambda x: torch.abs(x), True, "y = |x|.")
BNLL = _simple("BNLL", lambda x: F.softplus(x), False, "y = log(1 + exp(x)), computed stably as Caffe does.")


@register
class ReLU(_Elementwise):
    """y = max(x, 0) + negative_slope * min(x, 0)."""

    type = "ReLU"

    def maps_zero_to_zero(self):
        return math.isfinite(self.param.relu_param.negative_slope)  # 0 * inf is NaN

    def apply(self, x, blobs):
        slope = self.param.relu_param.negative_slope
        return F.relu(x) if slope == 0 else F.leaky_relu(x, slope)

    def apply_in_place(self, x):
        """``apply`` written into ``x``: slim.Net uses it for an in-place ReLU when nothing else holds ``x``."""
        slope = self.param.relu_param.negative_slope
        return F.relu_(x) if slope == 0 else F.leaky_relu_(x, slope)


@register
class PReLU(_Elementwise):
    """y = max(x, 0) + a * min(x, 0), a learned per channel (C,) or shared (a 0-axis scalar blob).

    Filler default constant 0.25.
    """

    type = "PReLU"

    def check(self):
        shape = self.bottom_shapes[0]
        if len(shape) < 2:
            raise ValueError(f"PReLU needs a bottom with a channel axis, found {shape}")
        self.blob_shapes = [()] if self.param.prelu_param.channel_shared else [(shape[1],)]

    def channel_role(self) -> ChannelRole:
        # The slopes follow their channels (left untouched by masking: PReLU maps 0 to 0 whatever the slope).
        blobs = () if self.param.prelu_param.channel_shared else ((0, 0),)
        return ChannelRole("passthrough", channel_blobs=blobs, masked=(), pointwise=True)

    def init_blobs(self, generator):
        pp = self.param.prelu_param
        return [fill(pp.filler if pp.HasField("filler") else constant_filler(0.25), self.blob_shapes[0], generator,
                     f"layer {self.name!r}")]

    def apply(self, x, blobs):
        a = blobs[0].reshape((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x > 0, x, x * a)


@register
class ELU(_Elementwise):
    """y = x for x > 0, alpha * (exp(x) - 1) otherwise."""

    type = "ELU"

    def apply(self, x, blobs):
        return F.elu(x, self.param.elu_param.alpha)


@register
class Swish(_Elementwise):
    """y = x * sigmoid(beta * x)."""

    type = "Swish"

    def maps_zero_to_zero(self):
        return math.isfinite(self.param.swish_param.beta)  # 0 * inf is NaN

    def apply(self, x, blobs):
        beta = self.param.swish_param.beta
        return x * torch.sigmoid(beta * x) if beta != 1 else F.silu(x)


@register
class Power(_Elementwise):
    """y = (shift + scale * x) ^ power."""

    type = "Power"

    def maps_zero_to_zero(self):
        # f(0) = shift ^ power: zero only for shift 0 and a positive power (0 ^ 0 = 1, 0 ^ -1 = inf); 0 * inf is NaN.
        p = self.param.power_param
        return p.shift == 0 and p.power > 0 and math.isfinite(p.scale)

    def apply(self, x, blobs):
        p = self.param.power_param
        y = x if p.scale == 1 else x * p.scale
        if p.shift != 0:
            y = y + p.shift
        if p.power == 1:
            return y if y is not x else x.clone()
        if p.scale == 0:
            # Caffe fills a constant (shift^power) without touching x; keep the graph (and the gradient of 0).
            return torch.full_like(x, p.shift ** p.power if p.power != 0 else 1.0)
        return y.pow(p.power)


def _ln_base(base: float) -> float:
    """ln(base) for Exp and Log, where Caffe's base -1 means e."""
    if base != -1 and base <= 0:
        raise ValueError(f"base must be -1 (for e) or positive, found {base}")
    return 1.0 if base == -1 else math.log(base)


@register
class Exp(_Elementwise):
    """y = base ^ (shift + scale * x); base -1 means e."""

    type = "Exp"

    def maps_zero_to_zero(self):
        return False  # base ^ shift > 0

    def check(self):
        _ln_base(self.param.exp_param.base)

    def apply(self, x, blobs):
        p = self.param.exp_param
        return torch.exp(_ln_base(p.base) * (p.shift + p.scale * x))


@register
class Log(_Elementwise):
    """y = log_base(shift + scale * x); base -1 means e."""

    type = "Log"

    def maps_zero_to_zero(self):
        p = self.param.log_param
        return p.shift == 1 and math.isfinite(p.scale)  # log_base(shift); 0 * inf is NaN

    def check(self):
        _ln_base(self.param.log_param.base)

    def apply(self, x, blobs):
        p = self.param.log_param
        y = torch.log(p.shift + p.scale * x)
        return y if p.base == -1 else y / _ln_base(p.base)


@register
class Clip(_Elementwise):
    """y = min(max(x, min), max)."""

    type = "Clip"

    def maps_zero_to_zero(self):
        cp = self.param.clip_param
        return cp.min <= 0 <= cp.max

    def check(self):
        cp = self.param.clip_param
        if not (cp.HasField("min") and cp.HasField("max")):
            raise ValueError("clip_param needs both min and max")
        if cp.min > cp.max:
            raise ValueError(f"clip_param min {cp.min} is larger than max {cp.max}")

    def apply(self, x, blobs):
        cp = self.param.clip_param
        return torch.clamp(x, cp.min, cp.max)


@register
class Threshold(_Elementwise):
    """y = 1 if x > threshold else 0 (no gradient)."""

    type = "Threshold"

    def maps_zero_to_zero(self):
        return not self.param.threshold_param.threshold < 0  # (0 > threshold) is 0, NaN included

    def apply(self, x, blobs):
        return (x > self.param.threshold_param.threshold).to(x.dtype)


@register
class Dropout(_Elementwise):
    """TRAIN: y = x * bernoulli(1 - ratio) / (1 - ratio); TEST: identity. The layer's phase decides, not a flag."""

    type = "Dropout"

    def check(self):
        r = self.param.dropout_param.dropout_ratio
        if not 0 <= r < 1:
            raise ValueError(f"dropout_ratio must be in [0, 1), found {r}")

    def for_mode(self, training):
        phase = pb.TRAIN if training else pb.TEST
        if phase == self.phase:
            return self
        twin = copy.copy(self)
        twin.phase = phase
        return twin

    def apply(self, x, blobs):
        if self.phase != pb.TRAIN or self.param.dropout_param.dropout_ratio == 0:
            return x
        return F.dropout(x, self.param.dropout_param.dropout_ratio, True)

    def macs(self):
        # TEST (or ratio 0) is the identity: no arithmetic. TRAIN multiplies each element by its scaled mask.
        if self.phase != pb.TRAIN or self.param.dropout_param.dropout_ratio == 0:
            return 0
        return count(self.bottom_shapes[0])
