"""ONNX operators -> Caffe layers: one converter per operator family, registered by ONNX op type.

A converter reads its node's inputs through the ImportContext (``blob`` for computed tensors, ``const`` for
weights and parameters) and writes Caffe layers with ``layer`` + ``emit``; slim's layer classes (the same registry as
every net) infer the tops' shapes. What Caffe cannot express exactly is refused with ``ctx.error``, naming the node:
asymmetric padding that changes the output size, pooling whose divisors differ, broadcasts between two computed
tensors, a Reshape that moves the batch axis, training-mode nodes.

| ONNX | Caffe |
|---|---|
| Conv / ConvTranspose | Convolution / Deconvolution (groups, dilation; pads symmetric or size-preserving) |
| BatchNormalization | BatchNorm + Scale (in place), so network slimming and every criterion apply |
| Relu, LeakyRelu, PRelu, Elu, Sigmoid, Tanh, Softplus, Abs, Exp, Log | ReLU, PReLU, ELU, Sigmoid, TanH, BNLL, ... |
| Clip | ReLU (min 0, no max) or Clip (ReLU6 and the like) |
| HardSigmoid / HardSwish | Power + Clip (+ Eltwise PROD): Caffe has no hard activations, these are exact |
| MaxPool / AveragePool, GlobalAveragePool / GlobalMaxPool, ReduceMean / ReduceMax over H, W | Pooling |
| Gemm, MatMul (+ a following Add) | InnerProduct (the Add becomes its bias) |
| Add / Sub / Sum / Max, Mul / Div | Eltwise, or with a constant: Bias / Scale / Power, or folded into a bias |
| Concat, Split | Concat, Slice |
| Flatten, Reshape, Squeeze, Unsqueeze | Flatten or Reshape (the batch axis stays first) |
| Softmax, Dropout, Identity, Cast to float | Softmax, Dropout, nothing |
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from slim import proto as pb
from slim.interop.onnx_import import Blob, ImportContext
from slim.layers.pooling import pooled_size

__all__ = ["CONVERTERS", "converts"]

#: ONNX op type -> converter(ctx, node).
CONVERTERS: Dict[str, Callable[[ImportContext, object], None]] = {}

FLT_MAX = float(np.finfo(np.float32).max)


def converts(*op_types: str):
    """Register a converter for the given ONNX operator types."""

    def register(fn):
        for op in op_types:
            assert op not in CONVERTERS, op
            CONVERTERS[op] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _axis(ctx, node, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ctx.error(node, f"axis {axis} is out of range for a {rank}-D input.")
    return axis + rank if axis < 0 else axis


def _axes_input(ctx, node, attrs, index: int, rank: int, since: int) -> Optional[List[int]]:
    """Axes given as an attribute (before opset ``since``) or as input ``index`` (from it); None when absent."""
    if ctx.opset >= since:
        axes = ctx.optional_const(node, index, "axes")
        axes = None if axes is None else axes.reshape(-1).tolist()
    else:
        axes = attrs.get("axes")
    return None if axes is None else sorted(_axis(ctx, node, int(a), rank) for a in axes)


def _compact(values: Sequence[int]) -> List[int]:
    """One value when all are equal (Caffe's usual form), else one per axis."""
    values = [int(v) for v in values]
    return values[:1] if len(set(values)) == 1 else values


def _conv_geometry(cp, kernel, stride, pad, dilation) -> None:
    """Write kernel, stride, pad and dilation into a ConvolutionParameter in the forms BVLC Caffe and OpenCV read:
    a single value, or *_h/*_w for 2-D, or one value per axis for 3-D."""

    def put(values, field, h_field, w_field, default):
        if all(v == default for v in values) and field != "kernel_size":
            return
        if len(values) == 2 and values[0] != values[1]:
            setattr(cp, h_field, int(values[0]))
            setattr(cp, w_field, int(values[1]))
        else:
            getattr(cp, field).extend(_compact(values))

    put(kernel, "kernel_size", "kernel_h", "kernel_w", None)
    put(stride, "stride", "stride_h", "stride_w", 1)
    put(pad, "pad", "pad_h", "pad_w", 0)
    if any(d != 1 for d in dilation):
        cp.dilation.extend(_compact(dilation))


def _pads(ctx, node, attrs, sizes, kernel, strides, dilations) -> Tuple[List[int], List[int]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad``."""
    n = len(sizes)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else large)
            ends.append(large if auto == "SAME_UPPER" else small)
        return begins, ends
    if auto == "VALID":
        return [0] * n, [0] * n
    if auto != "NOTSET":
        raise ctx.error(node, f"auto_pad {auto!r} is not an ONNX value (NOTSET, SAME_UPPER, SAME_LOWER, VALID).")
    pads = list(attrs.get("pads", [0] * (2 * n)))
    if len(pads) != 2 * n:
        raise ctx.error(node, f"pads has {len(pads)} values for {n} spatial axes; expected {2 * n}.")
    return [int(p) for p in pads[:n]], [int(p) for p in pads[n:]]


def _channel_vector(c: np.ndarray, shape: Sequence[int], axis: int) -> Optional[np.ndarray]:
    """``c`` broadcast against a tensor of ``shape``, when it varies along ``axis`` only: its (shape[axis],) vector."""
    if c.ndim > len(shape):
        return None
    c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
    for i, (d, n) in enumerate(zip(c.shape, shape)):
        if d != 1 and (i != axis or d != n):
            return None
    return np.broadcast_to(c.reshape(-1), (shape[axis],)).astype(np.float32)


def _per_sample(c: np.ndarray, shape: Sequence[int]) -> Optional[np.ndarray]:
    """``c`` broadcast against a tensor of ``shape`` as one array of shape[1:] (the same for every sample), or None
    when it varies along the batch axis or would enlarge the tensor."""
    if c.ndim > len(shape):
        return None
    c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
    if c.shape[0] != 1 or any(d not in (1, n) for d, n in zip(c.shape, shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(c[0], tuple(shape[1:])), dtype=np.float32)


def _simple(ctx, node, type_name: str, setup=None, blobs=()) -> List[Blob]:
    """One layer of ``type_name`` over input 0, in place where nothing else reads the input."""
    x = ctx.blob(node, 0)
    lp = ctx.layer(node, type_name)
    if setup is not None:
        setup(lp)
    return ctx.emit(node, lp, [x], blobs, in_place=ctx.overwritable(node))


# ---------------------------------------------------------------------------------------------------------------
# convolution


@converts("Conv")
def _conv(ctx: ImportContext, node) -> None:
    x = ctx.blob(node, 0)
    w = ctx.const(node, 1, "weight")
    b = ctx.optional_const(node, 2, "bias")
    a = ctx.attrs(node)
    nsp = len(x.shape) - 2
    if nsp not in (1, 2, 3) or w.ndim != nsp + 2:
        raise ctx.error(node, f"slim converts 1-D to 3-D convolutions; input {x.shape}, weight {w.shape}.")
    group = int(a.get("group", 1))
    kernel = [int(k) for k in a.get("kernel_shape", w.shape[2:])]
    if tuple(kernel) != tuple(w.shape[2:]):
        raise ctx.error(node, f"kernel_shape {kernel} does not match the weight {w.shape}.")
    if w.shape[1] * group != x.shape[1]:
        raise ctx.error(node, f"the weight {w.shape} with group {group} expects {w.shape[1] * group} input channels, "
                              f"the input has {x.shape[1]}.")
    strides = [int(s) for s in a.get("strides", [1] * nsp)]
    dilations = [int(d) for d in a.get("dilations", [1] * nsp)]
    begins, ends = _pads(ctx, node, a, x.shape[2:], kernel, strides, dilations)
    for axis, (n, k, s, d, p0, p1) in enumerate(zip(x.shape[2:], kernel, strides, dilations, begins, ends)):
        extent = d * (k - 1) + 1
        if p0 != p1 and (n + 2 * p0 - extent) // s != (n + p0 + p1 - extent) // s:
            raise ctx.error(node, f"spatial axis {axis} is padded {p0} before and {p1} after, which changes the output "
                                  f"size; Caffe's Convolution pads both sides equally. Use symmetric padding in the "
                                  f"model (padding=k//2 for odd kernels) and export again.")
    lp = ctx.layer(node, "Convolution")
    cp = lp.convolution_param
    cp.num_output = int(w.shape[0])
    cp.bias_term = b is not None
    if group != 1:
        cp.group = group
    _conv_geometry(cp, kernel, strides, begins, dilations)
    ctx.emit(node, lp, [x], [w] + ([b] if b is not None else []))


@converts("ConvTranspose")
def _deconv(ctx: ImportContext, node) -> None:
    x = ctx.blob(node, 0)
    w = ctx.const(node, 1, "weight")
    b = ctx.optional_const(node, 2, "bias")
    a = ctx.attrs(node)
    nsp = len(x.shape) - 2
    if nsp not in (1, 2, 3) or w.ndim != nsp + 2:
        raise ctx.error(node, f"slim converts 1-D to 3-D transposed convolutions; input {x.shape}, weight {w.shape}.")
    group = int(a.get("group", 1))
    if w.shape[0] != x.shape[1]:
        raise ctx.error(node, f"the weight {w.shape} expects {w.shape[0]} input channels, the input has {x.shape[1]}.")
    kernel = [int(k) for k in w.shape[2:]]
    strides = [int(s) for s in a.get("strides", [1] * nsp)]
    dilations = [int(d) for d in a.get("dilations", [1] * nsp)]
    out_pad = [int(p) for p in a.get("output_padding", [0] * nsp)]
    if "output_shape" in a:
        pads = []
        for n, k, s, d, op, want in zip(x.shape[2:], kernel, strides, dilations, out_pad, a["output_shape"][-nsp:]):
            total = s * (n - 1) + op + d * (k - 1) + 1 - int(want)
            if total < 0 or total % 2 or op:
                raise ctx.error(node, f"output_shape {list(a['output_shape'])} needs padding {total} with "
                                      f"output_padding {op}; Caffe's Deconvolution pads both sides equally and has no "
                                      f"output_padding.")
            pads.append(total // 2)
        begins = ends = pads
    else:
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ctx.error(node, f"auto_pad {a['auto_pad']} is not supported for ConvTranspose; give explicit pads.")
        begins, ends = _pads(ctx, node, {k: v for k, v in a.items() if k != "auto_pad"}, x.shape[2:], kernel,
                             strides, dilations)
    if begins != ends or any(out_pad):
        raise ctx.error(node, f"pads {begins} before and {ends} after with output_padding {out_pad}: Caffe's "
                              f"Deconvolution pads both sides equally and has no output_padding. Export a model with "
                              f"symmetric padding and output_padding 0.")
    lp = ctx.layer(node, "Deconvolution")
    cp = lp.convolution_param
    cp.num_output = int(w.shape[1] * group)
    cp.bias_term = b is not None
    if group != 1:
        cp.group = group
    _conv_geometry(cp, kernel, strides, begins, dilations)
    ctx.emit(node, lp, [x], [w] + ([b] if b is not None else []))


# ---------------------------------------------------------------------------------------------------------------
# normalisation and activations


@converts("BatchNormalization")
def _batch_norm(ctx: ImportContext, node) -> None:
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    if a.get("training_mode", 0) or any(out for out in node.output[1:]):
        raise ctx.error(node, "it is in training mode (it outputs batch statistics); export the model in eval mode "
                              "(model.eval() before torch.onnx.export).")
    if a.get("spatial", 1) != 1:
        raise ctx.error(node, "spatial = 0 (per-position statistics) has no Caffe equivalent.")
    if len(x.shape) < 2:
        raise ctx.error(node, f"the input {x.shape} has no channel axis.")
    c = x.shape[1]
    gamma, beta, mean, var = (ctx.const(node, i, what).astype(np.float32).reshape(-1)
                              for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")))
    if any(t.shape != (c,) for t in (gamma, beta, mean, var)):
        raise ctx.error(node, f"its parameters must have {c} values, one per channel.")
    bn = ctx.layer(node, "BatchNorm")
    eps = float(a.get("epsilon", 1e-5))
    if np.float32(eps) != np.float32(1e-5):
        bn.batch_norm_param.eps = eps
    # Caffe's BatchNorm stores running sums and their scale factor s; s = 1 makes the sums the statistics.
    top = ctx.emit(node, bn, [x], [mean, var, np.ones(1, np.float32)], outputs=[None],
                   in_place=ctx.overwritable(node))
    scale = ctx.layer(node, "Scale", suffix="/scale")
    scale.scale_param.bias_term = True
    ctx.emit(node, scale, top, [gamma, beta], in_place=True)


@converts("Relu")
def _relu(ctx, node):
    _simple(ctx, node, "ReLU")


@converts("LeakyRelu")
def _leaky_relu(ctx, node):
    slope = float(ctx.attrs(node).get("alpha", 0.01))
    _simple(ctx, node, "ReLU", lambda lp: setattr(lp.relu_param, "negative_slope", slope))


@converts("PRelu")
def _prelu(ctx, node):
    x = ctx.blob(node, 0)
    slope = ctx.const(node, 1, "slope").astype(np.float32)
    if slope.size == 1:
        _simple(ctx, node, "PReLU", lambda lp: setattr(lp.prelu_param, "channel_shared", True),
                [slope.reshape(())])
        return
    vector = _channel_vector(slope, x.shape, 1) if len(x.shape) >= 2 else None
    if vector is None:
        raise ctx.error(node, f"the slope {slope.shape} is neither shared nor one per channel of {x.shape}; Caffe's "
                              f"PReLU has one of those two forms.")
    _simple(ctx, node, "PReLU", blobs=[vector])


def _unary(type_name: str):
    def convert(ctx, node):
        _simple(ctx, node, type_name)
    return convert


for _op, _type in (("Sigmoid", "Sigmoid"), ("Tanh", "TanH"), ("Softplus", "BNLL"), ("Abs", "AbsVal")):
    converts(_op)(_unary(_type))


@converts("Exp")
def _exp(ctx, node):
    _simple(ctx, node, "Exp")  # base -1 (e), scale 1, shift 0: Caffe's defaults


@converts("Log")
def _log(ctx, node):
    _simple(ctx, node, "Log")


@converts("Elu")
def _elu(ctx, node):
    alpha = float(ctx.attrs(node).get("alpha", 1.0))
    _simple(ctx, node, "ELU", lambda lp: setattr(lp.elu_param, "alpha", alpha))


@converts("Clip")
def _clip(ctx, node):
    a = ctx.attrs(node)
    if ctx.opset >= 11:
        lo, hi = (ctx.optional_const(node, i, what) for i, what in ((1, "min"), (2, "max")))
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
    else:
        lo, hi = a.get("min"), a.get("max")
    if lo == 0 and (hi is None or hi >= FLT_MAX):
        _simple(ctx, node, "ReLU")
        return

    def setup(lp):
        lp.clip_param.min = -FLT_MAX if lo is None else lo
        lp.clip_param.max = FLT_MAX if hi is None else hi

    _simple(ctx, node, "Clip", setup)


def _hard_sigmoid(ctx, node, x: Blob, alpha: float, beta: float, output: Optional[str], in_place: bool) -> Blob:
    """max(0, min(1, alpha x + beta)) as Power (shift + scale x) then Clip(0, 1): exact, in Caffe's own layers."""
    power = ctx.layer(node, "Power", suffix="/affine")
    power.power_param.scale = alpha
    power.power_param.shift = beta
    (y,) = ctx.emit(node, power, [x], outputs=[None], in_place=in_place)
    clip = ctx.layer(node, "Clip", suffix="/clip")
    clip.clip_param.min = 0.0
    clip.clip_param.max = 1.0
    return ctx.emit(node, clip, [y], outputs=[output], in_place=True)[0]


@converts("HardSigmoid")
def _hardsigmoid(ctx, node):
    a = ctx.attrs(node)
    _hard_sigmoid(ctx, node, ctx.blob(node, 0), float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)),
                  node.output[0], ctx.overwritable(node))


@converts("HardSwish")
def _hardswish(ctx, node):
    x = ctx.blob(node, 0)
    gate = _hard_sigmoid(ctx, node, x, 1.0 / 6.0, 0.5, None, False)
    prod = ctx.layer(node, "Eltwise")
    prod.eltwise_param.operation = pb.EltwiseParameter.PROD
    ctx.emit(node, prod, [x, gate])


@converts("Softmax")
def _softmax(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    axis = _axis(ctx, node, int(a.get("axis", -1 if ctx.opset >= 13 else 1)), len(x.shape))
    if ctx.opset < 13 and math.prod(x.shape[axis + 1:]) != 1:
        raise ctx.error(node, f"before opset 13 Softmax normalises over all axes from {axis} on of {x.shape}; Caffe's "
                              f"Softmax normalises over one axis. Export with opset 13 or later.")
    _simple(ctx, node, "Softmax", lambda lp: setattr(lp.softmax_param, "axis", axis))


@converts("Dropout")
def _dropout(ctx, node):
    if len(node.output) > 1 and node.output[1] and ctx.uses.get(node.output[1]):
        raise ctx.error(node, "its mask output is used; Caffe's Dropout has none.")
    if ctx.opset >= 12:
        ratio = ctx.optional_const(node, 1, "ratio")
        training = ctx.optional_const(node, 2, "training_mode")
        if training is not None and bool(training):
            raise ctx.error(node, "it is in training mode; export the model in eval mode.")
        ratio = 0.5 if ratio is None else float(ratio)
    else:
        ratio = float(ctx.attrs(node).get("ratio", 0.5))
    # Identity at inference, as in ONNX; the layer keeps dropout for training the imported net in slim.
    _simple(ctx, node, "Dropout", lambda lp: setattr(lp.dropout_param, "dropout_ratio", ratio))


@converts("Identity")
def _identity(ctx, node):
    ctx.alias(node.output[0], ctx.blob(node, 0))


@converts("Cast")
def _cast(ctx, node):
    from onnx import TensorProto

    to = ctx.attrs(node).get("to")
    if to not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        raise ctx.error(node, f"it casts a computed tensor to {TensorProto.DataType.Name(to)}; a Caffe net computes in "
                              f"float only.")
    ctx.alias(node.output[0], ctx.blob(node, 0))  # the net computes in float32 throughout


# ---------------------------------------------------------------------------------------------------------------
# pooling


def _onnx_pooled(n: int, k: int, s: int, p0: int, p1: int, ceil: bool) -> int:
    """ONNX Runtime's pooled length: floor or ceil, and in ceil mode a last window starting in the end padding is
    dropped (as PyTorch)."""
    span = n + p0 + p1 - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p0:
        out -= 1
    return out


def _divisors(n: int, k: int, s: int, begin: int, limit: int, out: int, valid_only: bool) -> List[int]:
    """Averaging divisor of each window: the window clipped to [-begin, limit) (padding counted), or to [0, n)."""
    out_divs = []
    for i in range(out):
        a = i * s - begin
        out_divs.append(min(a + k, n) - max(a, 0) if valid_only else min(a + k, limit) - a)
    return out_divs


@converts("MaxPool", "AveragePool")
def _pool(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    if len(x.shape) != 4:
        raise ctx.error(node, f"slim's Pooling is 2-D (N, C, H, W); the input is {x.shape}.")
    if len(node.output) > 1 and node.output[1]:
        raise ctx.error(node, "its indices output has no Caffe equivalent in a deploy net.")
    kernel = [int(k) for k in a["kernel_shape"]]
    strides = [int(s) for s in a.get("strides", [1, 1])]
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise ctx.error(node, f"dilations {list(a['dilations'])}: Caffe's Pooling has no dilation.")
    ceil = bool(a.get("ceil_mode", 0))
    begins, ends = _pads(ctx, node, a, x.shape[2:], kernel, strides, [1, 1])
    is_max = node.op_type == "MaxPool"
    include_pad = bool(a.get("count_include_pad", 0))
    if any(p >= k for p, k in zip(begins, kernel)):
        raise ctx.error(node, f"pads {begins} are not smaller than the kernel {kernel}, as Caffe requires.")
    want = [_onnx_pooled(n, k, s, p0, p1, ceil) for n, k, s, p0, p1 in zip(x.shape[2:], kernel, strides, begins, ends)]
    padded = any(begins)
    mode = None
    for caffe_ceil in (True, False):  # CEIL is Caffe's default: prefer it, so BVLC Caffe reads the file too
        got = [pooled_size(n, k, s, p, caffe_ceil, padded) for n, k, s, p in zip(x.shape[2:], kernel, strides, begins)]
        if got == want:
            mode = caffe_ceil
            break
    if mode is None:
        raise ctx.error(node, f"its output {want[0]}x{want[1]} (kernel {kernel}, stride {strides}, pads {begins} "
                              f"before and {ends} after, ceil_mode {int(ceil)}) is not a size Caffe's Pooling gives "
                              f"with symmetric padding in either rounding mode.")
    if not is_max:
        for n, k, s, p0, p1, out in zip(x.shape[2:], kernel, strides, begins, ends, want):
            caffe = _divisors(n, k, s, p0, n + p0, out, False)
            onnx_divs = _divisors(n, k, s, p0, n + p1, out, not include_pad)
            if caffe != onnx_divs:
                raise ctx.error(node, f"Caffe's AVE pooling divides each window by its size including padding "
                                      f"({caffe}); this node divides by {onnx_divs} (count_include_pad "
                                      f"{int(include_pad)}). Use count_include_pad=True (PyTorch's default) or no "
                                      f"padding.")
    lp = ctx.layer(node, "Pooling")
    pp = lp.pooling_param
    pp.pool = pb.PoolingParameter.MAX if is_max else pb.PoolingParameter.AVE
    if kernel[0] == kernel[1]:
        pp.kernel_size = kernel[0]
    else:
        pp.kernel_h, pp.kernel_w = kernel
    if strides[0] == strides[1]:
        if strides[0] != 1:
            pp.stride = strides[0]
    else:
        pp.stride_h, pp.stride_w = strides
    if begins[0] == begins[1]:
        if begins[0]:
            pp.pad = begins[0]
    else:
        pp.pad_h, pp.pad_w = begins
    if not mode:
        pp.round_mode = pb.PoolingParameter.FLOOR
    ctx.emit(node, lp, [x])


def _global_pool(ctx, node, x: Blob, is_max: bool, keepdims: bool) -> None:
    if len(x.shape) != 4:
        raise ctx.error(node, f"slim's global Pooling is 2-D (N, C, H, W); the input is {x.shape}.")
    lp = ctx.layer(node, "Pooling")
    lp.pooling_param.pool = pb.PoolingParameter.MAX if is_max else pb.PoolingParameter.AVE
    lp.pooling_param.global_pooling = True
    if keepdims:
        ctx.emit(node, lp, [x])
        return
    (pooled,) = ctx.emit(node, lp, [x], outputs=[None])
    flat = ctx.layer(node, "Flatten", suffix="/flatten")
    ctx.emit(node, flat, [pooled])


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global(ctx, node):
    _global_pool(ctx, node, ctx.blob(node, 0), node.op_type == "GlobalMaxPool", True)


@converts("ReduceMean", "ReduceMax")
def _reduce(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    axes = _axes_input(ctx, node, a, 1, len(x.shape), 18)
    if len(x.shape) != 4 or axes != [2, 3]:
        raise ctx.error(node, f"only a reduction over the spatial axes [2, 3] of a 4-D tensor (global pooling) has a "
                              f"Caffe equivalent; this one reduces axes {axes} of {x.shape}.")
    _global_pool(ctx, node, x, node.op_type == "ReduceMax", bool(a.get("keepdims", 1)))


# ---------------------------------------------------------------------------------------------------------------
# fully connected


@converts("Gemm")
def _gemm(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    w = ctx.const(node, 1, "weight (B)").astype(np.float32)
    c = ctx.optional_const(node, 2, "bias (C)")
    if a.get("transA", 0):
        raise ctx.error(node, "transA = 1 transposes the computed input; Caffe's InnerProduct cannot.")
    if len(x.shape) != 2 or w.ndim != 2:
        raise ctx.error(node, f"Gemm needs a 2-D input and weight; found {x.shape} and {w.shape}.")
    w = w if a.get("transB", 0) else w.T                          # InnerProduct's (N, K)
    w = w * np.float32(a.get("alpha", 1.0))
    if w.shape[1] != x.shape[1]:
        raise ctx.error(node, f"the weight has {w.shape[1]} inputs, the input {x.shape} has {x.shape[1]}.")
    bias = None
    if c is not None:
        bias = _channel_vector(c.astype(np.float32), (x.shape[0], w.shape[0]), 1)
        if bias is None:
            raise ctx.error(node, f"the bias C {c.shape} differs between samples; InnerProduct has one bias per "
                                  f"output.")
        bias = bias * np.float32(a.get("beta", 1.0))
    lp = ctx.layer(node, "InnerProduct")
    lp.inner_product_param.num_output = int(w.shape[0])
    lp.inner_product_param.bias_term = bias is not None
    ctx.emit(node, lp, [x], [w] + ([bias] if bias is not None else []))


@converts("MatMul")
def _matmul(ctx, node):
    x = ctx.blob(node, 0)
    w = ctx.const(node, 1, "weight (B)").astype(np.float32)
    if w.ndim != 2 or len(x.shape) < 2 or x.shape[-1] != w.shape[0]:
        raise ctx.error(node, f"slim converts a MatMul of a computed tensor (..., K) by a constant (K, N) matrix; "
                              f"found {x.shape} by {w.shape}.")
    lp = ctx.layer(node, "InnerProduct")
    ip = lp.inner_product_param
    ip.num_output = int(w.shape[1])
    ip.bias_term = False
    if len(x.shape) > 2:
        ip.axis = len(x.shape) - 1
    ctx.emit(node, lp, [x], [w.T])


# ---------------------------------------------------------------------------------------------------------------
# element-wise arithmetic


def _absorb_bias(ctx, node, index: int, x: Blob, c: np.ndarray) -> bool:
    """Fold ``x + c`` into the bias of the layer that wrote ``x`` (a Convolution, Deconvolution, InnerProduct or a
    per-channel Scale) when nothing else reads ``x`` and ``c`` is one value per output channel."""
    name = node.input[index]
    if ctx.uses.get(name, 0) != 1 or name in ctx.graph_inputs or name in ctx.graph_outputs:
        return False
    lp = ctx.writer.get(x.name)
    if lp is None or len(lp.top) != 1:
        return False
    if lp.type in ("Convolution", "Deconvolution"):
        param, axis = lp.convolution_param, 1
    elif lp.type == "InnerProduct":
        param, axis = lp.inner_product_param, lp.inner_product_param.axis % len(x.shape)
    elif lp.type == "Scale" and len(lp.bottom) == 1 and lp.scale_param.axis == 1 and lp.scale_param.num_axes == 1:
        param, axis = lp.scale_param, 1
    else:
        return False
    vector = _channel_vector(c, x.shape, axis)
    if vector is None:
        return False
    blobs = ctx.blobs.setdefault(lp.name, [])
    if param.bias_term:
        blobs[-1] = blobs[-1] + vector
    else:
        param.bias_term = True
        blobs.append(vector)
    ctx.alias(node.output[0], x)
    return True


def _add_const(ctx, node, index: int, c: np.ndarray) -> None:
    """x + c for a computed x (input ``index``) and a constant c."""
    x = ctx.blob(node, index)
    c = c.astype(np.float32)
    if c.size == 1:
        if float(c.reshape(())) == 0:
            ctx.alias(node.output[0], x)
            return
        if _absorb_bias(ctx, node, index, x, c):
            return
        lp = ctx.layer(node, "Power")
        lp.power_param.shift = float(c.reshape(()))
        ctx.emit(node, lp, [x], in_place=ctx.overwritable(node, index))
        return
    if _absorb_bias(ctx, node, index, x, c):
        return
    vector = _channel_vector(c, x.shape, 1) if len(x.shape) >= 2 else None
    lp = ctx.layer(node, "Bias")
    if vector is not None:
        ctx.emit(node, lp, [x], [vector], in_place=ctx.overwritable(node, index))
        return
    full = _per_sample(c, x.shape)
    if full is None or len(x.shape) < 2:
        raise ctx.error(node, f"the constant {c.shape} broadcast against {x.shape} varies between samples; Caffe's "
                              f"Bias adds the same values to every sample.")
    lp.bias_param.num_axes = -1
    ctx.emit(node, lp, [x], [full], in_place=ctx.overwritable(node, index))


def _mul_const(ctx, node, index: int, c: np.ndarray) -> None:
    """x * c for a computed x (input ``index``) and a constant c."""
    x = ctx.blob(node, index)
    c = c.astype(np.float32)
    if c.size == 1:
        if float(c.reshape(())) == 1:
            ctx.alias(node.output[0], x)
            return
        lp = ctx.layer(node, "Power")
        lp.power_param.scale = float(c.reshape(()))
        ctx.emit(node, lp, [x], in_place=ctx.overwritable(node, index))
        return
    vector = _channel_vector(c, x.shape, 1) if len(x.shape) >= 2 else None
    lp = ctx.layer(node, "Scale")
    if vector is not None:
        ctx.emit(node, lp, [x], [vector], in_place=ctx.overwritable(node, index))
        return
    full = _per_sample(c, x.shape)
    if full is None or len(x.shape) < 2:
        raise ctx.error(node, f"the constant {c.shape} broadcast against {x.shape} varies between samples; Caffe's "
                              f"Scale multiplies every sample by the same values.")
    lp.scale_param.num_axes = -1
    ctx.emit(node, lp, [x], [full], in_place=ctx.overwritable(node, index))


def _eltwise(ctx, node, operation, coeff: Sequence[float] = ()) -> None:
    xs = [ctx.blob(node, i) for i in range(len(node.input))]
    if any(x.shape != xs[0].shape for x in xs):
        raise ctx.error(node, f"its inputs have the shapes {[x.shape for x in xs]}; Caffe's Eltwise needs equal shapes "
                              f"(no broadcasting between computed tensors).")
    if len(xs) == 1:
        ctx.alias(node.output[0], xs[0])
        return
    lp = ctx.layer(node, "Eltwise")
    lp.eltwise_param.operation = operation
    lp.eltwise_param.coeff.extend(coeff)
    ctx.emit(node, lp, xs)


@converts("Add", "Sub")
def _add(ctx, node):
    const = [ctx.is_const(name) for name in node.input[:2]]
    if const == [False, False]:
        _eltwise(ctx, node, pb.EltwiseParameter.SUM, [1.0, -1.0] if node.op_type == "Sub" else [])
    elif const == [False, True]:
        c = ctx.consts[node.input[1]]
        _add_const(ctx, node, 0, -c if node.op_type == "Sub" else c)
    elif node.op_type == "Add":
        _add_const(ctx, node, 1, ctx.consts[node.input[0]])
    else:  # c - x
        c = ctx.consts[node.input[0]]
        if c.size != 1:
            raise ctx.error(node, "a constant tensor minus a computed one has no Caffe layer (only a scalar minus x).")
        lp = ctx.layer(node, "Power")
        lp.power_param.scale = -1.0
        lp.power_param.shift = float(c.reshape(()))
        ctx.emit(node, lp, [ctx.blob(node, 1)], in_place=ctx.overwritable(node, 1))


@converts("Sum")
def _sum(ctx, node):
    _eltwise(ctx, node, pb.EltwiseParameter.SUM)


@converts("Max")
def _max(ctx, node):
    _eltwise(ctx, node, pb.EltwiseParameter.MAX)


@converts("Mul")
def _mul(ctx, node):
    const = [ctx.is_const(name) for name in node.input[:2]]
    if const == [False, True]:
        _mul_const(ctx, node, 0, ctx.consts[node.input[1]])
        return
    if const == [True, False]:
        _mul_const(ctx, node, 1, ctx.consts[node.input[0]])
        return
    x, y = ctx.blob(node, 0), ctx.blob(node, 1)
    if x.shape == y.shape:
        _eltwise(ctx, node, pb.EltwiseParameter.PROD)
        return
    # Squeeze-and-excitation: x (N, C, H, W) times per-sample channel weights (N, C, 1, 1). Caffe's Scale with
    # two bottoms multiplies by bottom 1 aligned from axis 0, once that is flattened to (N, C).
    for big, small in ((x, y), (y, x)):
        if (len(big.shape) >= 3 and len(small.shape) == len(big.shape) and small.shape[:2] == big.shape[:2]
                and all(d == 1 for d in small.shape[2:])):
            flat = ctx.layer(node, "Flatten", suffix="/flatten")
            (weights,) = ctx.emit(node, flat, [small], outputs=[None])
            lp = ctx.layer(node, "Scale")
            lp.scale_param.axis = 0
            ctx.emit(node, lp, [big, weights])
            return
    raise ctx.error(node, f"it multiplies {x.shape} by {y.shape}; Caffe multiplies computed tensors of equal shape "
                          f"(Eltwise) or by per-sample channel weights (N, C, 1, 1) (Scale), not other broadcasts.")


@converts("Div")
def _div(ctx, node):
    if ctx.is_const(node.input[0]) or not ctx.is_const(node.input[1]):
        raise ctx.error(node, "only a computed tensor divided by a constant has a Caffe equivalent (Scale / Power).")
    c = ctx.consts[node.input[1]].astype(np.float32)
    if np.any(c == 0):
        raise ctx.error(node, "it divides by a constant that contains 0.")
    _mul_const(ctx, node, 0, np.float32(1.0) / c)


# ---------------------------------------------------------------------------------------------------------------
# structure


@converts("Concat")
def _concat(ctx, node):
    xs = [ctx.blob(node, i) for i in range(len(node.input))]
    axis = _axis(ctx, node, int(ctx.attrs(node)["axis"]), len(xs[0].shape))
    if len(xs) == 1:
        ctx.alias(node.output[0], xs[0])
        return
    lp = ctx.layer(node, "Concat")
    if axis != 1:
        lp.concat_param.axis = axis
    ctx.emit(node, lp, xs)


@converts("Split")
def _split(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    axis = _axis(ctx, node, int(a.get("axis", 0)), len(x.shape))
    n = x.shape[axis]
    outputs = list(node.output)
    if ctx.opset >= 13 and ctx.has_input(node, 1):
        sizes = ctx.const(node, 1, "split").reshape(-1).tolist()
    elif "split" in a:
        sizes = list(a["split"])
    else:
        parts = int(a.get("num_outputs", len(outputs)))
        step = -(-n // parts)
        sizes = [min(step, n - i * step) for i in range(parts)]
    if sum(sizes) != n or len(sizes) != len(outputs) or min(sizes) <= 0:
        raise ctx.error(node, f"the parts {sizes} do not split axis {axis} of size {n} into {len(outputs)} outputs.")
    if axis == 0:
        raise ctx.error(node, "it splits the batch axis; a Caffe net keeps every sample together.")
    lp = ctx.layer(node, "Slice")
    lp.slice_param.axis = axis
    lp.slice_param.slice_point.extend(np.cumsum(sizes)[:-1].tolist())
    tops = ctx.emit(node, lp, [x], outputs=outputs)
    unused = [t for t, out in zip(tops, outputs) if not ctx.uses.get(out) and out not in ctx.graph_outputs]
    if unused:  # a top nothing reads would become a net output in Caffe
        silence = ctx.layer(node, "Silence", suffix="/unused")
        ctx.emit(node, silence, unused, outputs=[])


def _reshape_to(ctx, node, x: Blob, shape: Sequence[int]) -> None:
    """Write ``x`` in ``shape``: nothing, a Flatten (N, C*H*W), or a Reshape that copies the batch axis."""
    shape = tuple(int(d) for d in shape)
    if math.prod(shape) != math.prod(x.shape):
        raise ctx.error(node, f"cannot reshape {x.shape} to {shape}.")
    if shape == x.shape:
        ctx.alias(node.output[0], x)
        return
    if not shape or shape[0] != x.shape[0]:
        raise ctx.error(node, f"it reshapes {x.shape} to {shape}, moving the batch axis; a Caffe net keeps axis 0 as "
                              f"the batch. Reshape within each sample (x.flatten(1), x.view(x.size(0), ...)).")
    lp = ctx.layer(node, "Flatten" if len(x.shape) >= 2 and shape == (x.shape[0], math.prod(x.shape[1:]))
                   else "Reshape")
    if lp.type == "Reshape":
        lp.reshape_param.shape.dim.extend([0, *shape[1:]])  # 0: copy the batch axis, whatever the batch size
    ctx.emit(node, lp, [x])


@converts("Flatten")
def _flatten(ctx, node):
    x = ctx.blob(node, 0)
    axis = int(ctx.attrs(node).get("axis", 1))
    axis = axis + len(x.shape) if axis < 0 else axis
    _reshape_to(ctx, node, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@converts("Reshape")
def _reshape(ctx, node):
    x = ctx.blob(node, 0)
    target = ctx.const(node, 1, "shape").reshape(-1).astype(np.int64).tolist()
    allowzero = bool(ctx.attrs(node).get("allowzero", 0))
    shape = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if shape.count(-1) > 1:
        raise ctx.error(node, f"the target shape {target} has more than one -1.")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or math.prod(x.shape) % known:
            raise ctx.error(node, f"cannot reshape {x.shape} to {target}.")
        shape[shape.index(-1)] = math.prod(x.shape) // known
    _reshape_to(ctx, node, x, shape)


@converts("Squeeze")
def _squeeze(ctx, node):
    x = ctx.blob(node, 0)
    axes = _axes_input(ctx, node, ctx.attrs(node), 1, len(x.shape), 13)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else axes
    if any(x.shape[i] != 1 for i in axes):
        raise ctx.error(node, f"it squeezes axes {axes} of {x.shape}, which are not all of size 1.")
    _reshape_to(ctx, node, x, [d for i, d in enumerate(x.shape) if i not in axes])


@converts("Unsqueeze")
def _unsqueeze(ctx, node):
    x = ctx.blob(node, 0)
    a = ctx.attrs(node)
    rank = len(x.shape)
    if ctx.opset >= 13:
        raw = ctx.const(node, 1, "axes").reshape(-1).tolist()
    else:
        raw = list(a["axes"])
    out_rank = rank + len(raw)
    axes = sorted(_axis(ctx, node, int(i), out_rank) for i in raw)
    shape = list(x.shape)
    for i in axes:
        shape.insert(i, 1)
    _reshape_to(ctx, node, x, shape)
