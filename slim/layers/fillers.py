"""Caffe's fillers (FillerParameter), seeded by a torch.Generator.

An absent filler is ``constant 0`` (FillerParameter's default type is "constant" with value 0), except where a
layer documents another default (Scale: constant 1; PReLU: constant 0.25). fan_in = count / shape[0] and fan_out =
count / shape[1] follow Caffe's convention for both convolution (Cout, Cin/g, kh, kw) and InnerProduct (N, K) blobs.
"""

import math

from slim import proto as pb
from slim.errors import NetError
from slim.layers._lazy import torch

__all__ = ["fill", "fill_weight_and_bias", "constant_filler"]


def constant_filler(value: float) -> "pb.FillerParameter":
    """A FillerParameter of type constant with the given value."""
    f = pb.FillerParameter()
    f.type = "constant"
    f.value = value
    return f


def _fans(shape):
    n = math.prod(shape)
    fan_in = n // shape[0] if shape and shape[0] else n
    fan_out = n // shape[1] if len(shape) > 1 and shape[1] else n
    return fan_in, fan_out


_KNOWN = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")


def fill(filler: "pb.FillerParameter", shape, generator, where: str = "blob"):
    """A float32 tensor of ``shape`` filled as Caffe's filler ``filler`` would fill it.

    Args:
        filler: the FillerParameter.
        shape: the blob shape.
        generator: a torch.Generator (CPU) for reproducible draws.
        where: "layer 'x' blob i", used in error messages.
    """
    shape = tuple(shape)
    kind = filler.type
    if kind not in _KNOWN:
        raise NetError(f"{where}: unknown filler type {kind!r}; use constant, uniform, gaussian, positive_unitball, "
                       f"xavier, msra or bilinear.")
    if math.prod(shape) == 0:
        return torch.zeros(shape)  # nothing to draw (and the fan-based scales would divide by a zero fan)
    if kind == "constant":
        return torch.full(shape, filler.value, dtype=torch.float32)
    if kind == "uniform":
        if not (math.isfinite(filler.min) and math.isfinite(filler.max) and filler.min <= filler.max):
            raise NetError(f"{where}: the uniform filler needs finite min <= max, found min {filler.min} and max "
                           f"{filler.max}.")
        return torch.empty(shape).uniform_(filler.min, filler.max, generator=generator)
    if kind == "gaussian":
        if not (math.isfinite(filler.mean) and math.isfinite(filler.std) and filler.std >= 0):
            raise NetError(f"{where}: the gaussian filler needs a finite mean and a finite std >= 0, found mean "
                           f"{filler.mean} and std {filler.std}.")
        out = torch.empty(shape).normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            # Caffe: each weight is kept with probability sparse / num_outputs (num_outputs = shape[0]).
            if len(shape) < 2:
                raise NetError(f"{where}: a sparse gaussian filler needs a blob of at least 2 axes, found {shape}.")
            p = filler.sparse / shape[0]
            out *= torch.bernoulli(torch.full(shape, min(p, 1.0)), generator=generator)
        return out
    if kind == "positive_unitball":
        out = torch.rand(shape, generator=generator)
        rows = out.reshape(shape[0], -1) if shape else out.reshape(1, -1)
        rows /= rows.sum(dim=1, keepdim=True)
        return out
    if kind in ("xavier", "msra"):
        fan_in, fan_out = _fans(shape)
        n = {pb.FillerParameter.FAN_IN: fan_in, pb.FillerParameter.FAN_OUT: fan_out,
             pb.FillerParameter.AVERAGE: (fan_in + fan_out) / 2.0}[filler.variance_norm]
        if kind == "xavier":
            scale = math.sqrt(3.0 / n)
            return torch.empty(shape).uniform_(-scale, scale, generator=generator)
        return torch.empty(shape).normal_(0.0, math.sqrt(2.0 / n), generator=generator)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise NetError(f"{where}: the bilinear filler needs a 4-D blob with a square kernel, found {shape}.")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        idx = torch.arange(k, dtype=torch.float64)
        w1 = 1 - (idx / f - c).abs()
        kernel = (w1[:, None] * w1[None, :]).to(torch.float32)
        return kernel.expand(shape).contiguous()
    raise AssertionError(f"filler {kind!r} is in _KNOWN but not handled")


def fill_weight_and_bias(param, shapes, generator, where: str) -> list:
    """The weight from ``param.weight_filler`` and, with ``param.bias_term``, the bias from ``param.bias_filler``
    (Convolution's and InnerProduct's blobs)."""
    blobs = [fill(param.weight_filler, shapes[0], generator, where)]
    if param.bias_term:
        blobs.append(fill(param.bias_filler, shapes[1], generator, where))
    return blobs
