"""Every layer's forward against a NumPy reference written from Caffe's formulas (REFERENCE §3.2).

The references follow Caffe's C++ loops, not PyTorch: pooled sizes and AVE divisors, the BatchNorm running sums,
the loss normalisers and Accuracy's tie rule are computed here by hand on tiny shapes. Layers run through their
class (``layer_class(type)(param, bottom_shapes, phase)``), so each test sees one layer; the fused BatchNorm+Scale
path, the filler defaults and the test over every registered type go through ``slim.net.Net``.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from slim import proto as pb
from slim.errors import NetError
from slim.graph import build_graph
from slim.io import parse_net
from slim.layers import layer_class, registered_types
from slim.net import Net

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def make_layer(type_name, params="", nb=1, nt=1, shapes=(), phase=pb.TEST):
    """A Layer instance of ``type_name`` with bottoms b0.., tops t0.. and ``params`` (prototxt text)."""
    text = f'name: "l" type: "{type_name}" '
    text += " ".join(f'bottom: "b{i}"' for i in range(nb)) + " "
    text += " ".join(f'top: "t{i}"' for i in range(nt)) + " " + params
    lp = text_format.Parse(text, pb.LayerParameter())
    lp.phase = phase
    return layer_class(type_name, "l")(lp, [tuple(s) for s in shapes], phase)


def run(type_name, params, bottoms, blobs=None, nt=1, phase=pb.TEST, seed=0):
    """Run one layer on float32 copies of ``bottoms``; returns (layer, tops as float64 arrays, blobs as tensors)."""
    layer = make_layer(type_name, params, len(bottoms), nt, [np.shape(b) for b in bottoms], phase)
    if blobs is None:
        tblobs = layer.init_blobs(torch.Generator().manual_seed(seed))
    else:
        tblobs = [torch.tensor(np.asarray(b), dtype=torch.float32) for b in blobs]
    assert [tuple(b.shape) for b in tblobs] == [tuple(s) for s in layer.blob_shapes]
    tops = layer.forward(tblobs, [torch.tensor(np.asarray(b), dtype=torch.float32) for b in bottoms])
    assert [tuple(t.shape) for t in tops] == [tuple(s) for s in layer.top_shapes]
    return layer, [t.detach().double().numpy() for t in tops], tblobs


def rand(*shape, seed=0, low=-1.0, high=1.0):
    """Float32-exact random values (so float64 references see the same inputs)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, shape).astype(np.float32).astype(np.float64)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------
# Pooling


def ref_pool(x, kernel, stride, pad, mode, ceil=True):
    """Caffe's PoolingLayer::Forward_cpu (sizes from Reshape), MAX or AVE."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

    def size(length, k, s, p):
        span = length + 2 * p - k
        return (-(-span // s) if ceil else span // s) + 1

    oh, ow = size(h, kh, sh, ph), size(w, kw, sw, pw)
    if ph or pw:  # Caffe clips both axes when any pad is non-zero
        if (oh - 1) * sh >= h + ph:
            oh -= 1
        if (ow - 1) * sw >= w + pw:
            ow -= 1
    y = np.empty((n, c, oh, ow))
    for i, j in itertools.product(range(oh), range(ow)):
        hs, ws = i * sh - ph, j * sw - pw
        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
        pool_size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        window = x[:, :, hs:he, ws:we]
        if mode == "MAX":
            y[:, :, i, j] = window.max(axis=(2, 3)) if he > hs and we > ws else -FLT_MAX
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                y[:, :, i, j] = window.sum(axis=(2, 3)) / pool_size
    return y


POOL_CASES = [
    # (input H, W, pooling_param text, kernel, stride, pad, ceil)
    (7, 7, "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    (8, 8, "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),            # ceil overhang
    (8, 9, "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),     # divisor clipped to padded extent
    (8, 8, "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False),
    (7, 7, "kernel_size: 2 stride: 2 pad: 1 round_mode: FLOOR", (2, 2), (2, 2), (1, 1), False),
    (6, 6, "kernel_size: 1 stride: 2", (1, 1), (2, 2), (0, 0), True),            # Caffe 4 outputs, torch 3
    (5, 6, "kernel_size: 3 stride: 1 pad: 2", (3, 3), (1, 1), (2, 2), True),     # pad > k/2
    (7, 7, "kernel_size: 5 stride: 3 pad: 3", (5, 5), (3, 3), (3, 3), True),
    (7, 6, "kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 2 pad_h: 1 pad_w: 0", (3, 1), (2, 2), (1, 0), True),
    (6, 5, "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (2, 3), (1, 2), (0, 0), True),
]


@pytest.mark.parametrize("mode", ["MAX", "AVE"])
@pytest.mark.parametrize("h,w,text,kernel,stride,pad,ceil", POOL_CASES)
def test_pooling_matches_caffe(mode, h, w, text, kernel, stride, pad, ceil):
    x = rand(2, 3, h, w, seed=h * 10 + w)
    _, (y,), _ = run("Pooling", f"pooling_param {{ pool: {mode} {text} }}", [x])
    close(y, ref_pool(x, kernel, stride, pad, mode, ceil))


def test_pooling_window_outside_the_image():
    # H=6, k=1, s=2, pad 0: Caffe makes 4 outputs; the last window starts at 6, outside the image.
    x = rand(1, 2, 6, 6, seed=3)
    _, (y,), _ = run("Pooling", "pooling_param { pool: MAX kernel_size: 1 stride: 2 }", [x])
    assert y.shape == (1, 2, 4, 4)
    assert np.all(y[:, :, 3, :] == -FLT_MAX) and np.all(y[:, :, :, 3] == -FLT_MAX)
    close(y[:, :, :3, :3], x[:, :, 0:6:2, 0:6:2])
    _, (a,), _ = run("Pooling", "pooling_param { pool: AVE kernel_size: 1 stride: 2 }", [x])
    close(a[:, :, :3, :3], x[:, :, 0:6:2, 0:6:2])
    assert np.all(np.isnan(a[:, :, 3, :]))  # Caffe divides 0 by a pool size of 0


def test_pooling_pad_h_clips_the_width_too():
    # Caffe applies the "last window starts inside" clip to both axes as soon as pad_h or pad_w is non-zero.
    layer = make_layer("Pooling", "pooling_param { pool: MAX kernel_h: 3 kernel_w: 1 stride: 2 pad_h: 1 pad_w: 0 }",
                       shapes=[(1, 1, 7, 6)])
    assert layer.top_shapes == [(1, 1, 4, 3)]
    layer = make_layer("Pooling", "pooling_param { pool: MAX kernel_size: 1 stride: 2 }", shapes=[(1, 1, 7, 6)])
    assert layer.top_shapes == [(1, 1, 4, 4)]


@pytest.mark.parametrize("fields, message", [
    ("kernel_size: 2 pad: 1 pad_h: 1", "give pad or pad_h/pad_w, not both"),
    ("kernel_size: 2 stride: 2 stride_w: 1", "give stride or stride_h/stride_w, not both"),
    ("kernel_size: 2 kernel_h: 2", "give kernel_size or kernel_h/kernel_w, not both"),
])
def test_pooling_refuses_a_field_given_both_ways(fields, message):
    with pytest.raises(NetError, match=message):
        make_layer("Pooling", f"pooling_param {{ pool: MAX {fields} }}", shapes=[(1, 1, 6, 6)])


def test_pooling_stride_h_and_w():
    layer = make_layer("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride_h: 2 stride_w: 1 }",
                       shapes=[(1, 1, 6, 6)])
    assert (layer.stride, layer.pad) == ((2, 1), (0, 0)) and layer.top_shapes == [(1, 1, 3, 5)]


@pytest.mark.parametrize("mode", ["MAX", "AVE"])
def test_global_pooling(mode):
    x = rand(2, 3, 5, 4, seed=1)
    _, (y,), _ = run("Pooling", f"pooling_param {{ pool: {mode} global_pooling: true }}", [x])
    expected = x.max(axis=(2, 3)) if mode == "MAX" else x.mean(axis=(2, 3))
    close(y, expected[:, :, None, None])


def test_pooling_max_argmax_top():
    x = rand(1, 2, 4, 4, seed=2)
    _, (y, mask), _ = run("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }", [x], nt=2)
    flat = x.reshape(1, 2, 16)
    close(np.take_along_axis(flat, mask.reshape(1, 2, 4).astype(int), 2).reshape(y.shape), y)


# ----------------------------------------------------------------------------------------------------------------
# Convolution and Deconvolution


def ref_conv(x, w, b, stride, pad, dil, group):
    """Caffe's im2col convolution written as loops over output and kernel positions (N-D)."""
    n, cin = x.shape[:2]
    cout, k = w.shape[0], w.shape[2:]
    nsp = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = [(x.shape[2 + i] + 2 * pad[i] - (dil[i] * (k[i] - 1) + 1)) // stride[i] + 1 for i in range(nsp)]
    y = np.zeros((n, cout, *out))
    cg, og = cin // group, cout // group
    all_ = (slice(None),)
    for o in itertools.product(*map(range, out)):
        for kk in itertools.product(*map(range, k)):
            idx = tuple(o[i] * stride[i] + kk[i] * dil[i] for i in range(nsp))
            patch = xp[all_ + all_ + idx]
            for g in range(group):
                wg = w[(slice(g * og, (g + 1) * og), slice(None)) + kk]
                y[all_ + (slice(g * og, (g + 1) * og),) + o] += patch[:, g * cg:(g + 1) * cg] @ wg.T
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nsp)
    return y


def ref_deconv(x, w, b, stride, pad, dil, group):
    """Caffe's col2im deconvolution: every input value scatters ``w`` into the output, then pad is cropped."""
    n, cin = x.shape[:2]
    insz, k = x.shape[2:], w.shape[2:]
    nsp = x.ndim - 2
    og = w.shape[1]
    cg = cin // group
    full = [stride[i] * (insz[i] - 1) + dil[i] * (k[i] - 1) + 1 for i in range(nsp)]
    y = np.zeros((n, og * group, *full))
    all_ = (slice(None),)
    for pos in itertools.product(*map(range, insz)):
        for kk in itertools.product(*map(range, k)):
            o = tuple(pos[i] * stride[i] + kk[i] * dil[i] for i in range(nsp))
            for g in range(group):
                xg = x[all_ + (slice(g * cg, (g + 1) * cg),) + pos]
                wg = w[(slice(g * cg, (g + 1) * cg), slice(None)) + kk]
                y[all_ + (slice(g * og, (g + 1) * og),) + o] += xg @ wg
    y = y[all_ + all_ + tuple(slice(p, f - p) for p, f in zip(pad, full))]
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nsp)
    return y


CONV_CASES = [
    # (input shape, convolution_param, cout, kernel, stride, pad, dilation, group)
    ((2, 4, 7, 7), "num_output: 6 kernel_size: 3 pad: 1 group: 2 dilation: 2", 6, (3, 3), (1, 1), (1, 1), (2, 2), 2),
    ((1, 3, 7, 6), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
     2, (3, 2), (2, 1), (1, 0), (1, 1), 1),
    ((2, 3, 9), "num_output: 4 kernel_size: 3 stride: 2 pad: 1", 4, (3,), (2,), (1,), (1,), 1),
    ((1, 2, 4, 5, 5), "num_output: 4 kernel_size: 2 kernel_size: 3 kernel_size: 1 pad: 0 pad: 1 pad: 0 "
     "stride: 1 stride: 2 stride: 1 group: 2", 4, (2, 3, 1), (1, 2, 1), (0, 1, 0), (1, 1, 1), 2),
    ((2, 3, 6, 6), "num_output: 3 kernel_size: 3 stride: 2 bias_term: false", 3, (3, 3), (2, 2), (0, 0), (1, 1), 1),
    ((1, 6, 5, 5), "num_output: 6 kernel_size: 3 pad: 1 group: 6", 6, (3, 3), (1, 1), (1, 1), (1, 1), 6),
]


@pytest.mark.parametrize("shape,text,cout,kernel,stride,pad,dil,group", CONV_CASES)
def test_convolution_matches_caffe(shape, text, cout, kernel, stride, pad, dil, group):
    x = rand(*shape, seed=len(shape))
    bias = "bias_term: false" not in text
    w = rand(cout, shape[1] // group, *kernel, seed=7)
    b = rand(cout, seed=8) if bias else None
    layer, (y,), _ = run("Convolution", f"convolution_param {{ {text} }}", [x], [w] + ([b] if bias else []))
    assert layer.blob_shapes == [(cout, shape[1] // group, *kernel)] + ([(cout,)] if bias else [])
    close(y, ref_conv(x, w, b, stride, pad, dil, group))


def test_convolution_shares_filters_over_bottom_top_pairs():
    x0, x1 = rand(1, 2, 5, 5, seed=1), rand(1, 2, 5, 5, seed=2)
    w, b = rand(3, 2, 3, 3, seed=3), rand(3, seed=4)
    _, (y0, y1), _ = run("Convolution", "convolution_param { num_output: 3 kernel_size: 3 }", [x0, x1], [w, b], nt=2)
    close(y0, ref_conv(x0, w, b, (1, 1), (0, 0), (1, 1), 1))
    close(y1, ref_conv(x1, w, b, (1, 1), (0, 0), (1, 1), 1))


DECONV_CASES = [
    ((2, 4, 3, 3), "num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2", 6, (4, 4), (2, 2), (1, 1), (1, 1), 2),
    ((1, 2, 4), "num_output: 3 kernel_size: 3 stride: 3", 3, (3,), (3,), (0,), (1,), 1),
    ((1, 3, 4, 3), "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0 dilation: 2",
     2, (3, 2), (1, 2), (1, 0), (2, 2), 1),
    ((1, 2, 3, 3), "num_output: 2 kernel_size: 2 stride: 2 bias_term: false", 2, (2, 2), (2, 2), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("shape,text,cout,kernel,stride,pad,dil,group", DECONV_CASES)
def test_deconvolution_matches_caffe(shape, text, cout, kernel, stride, pad, dil, group):
    x = rand(*shape, seed=11)
    bias = "bias_term: false" not in text
    w = rand(shape[1], cout // group, *kernel, seed=12)
    b = rand(cout, seed=13) if bias else None
    layer, (y,), _ = run("Deconvolution", f"convolution_param {{ {text} }}", [x], [w] + ([b] if bias else []))
    assert layer.blob_shapes[0] == (shape[1], cout // group, *kernel)
    close(y, ref_deconv(x, w, b, stride, pad, dil, group))


# ----------------------------------------------------------------------------------------------------------------
# InnerProduct


@pytest.mark.parametrize("shape,text,axis", [
    ((2, 3, 2, 2), "num_output: 5", 1),
    ((2, 3, 4, 5), "num_output: 2 axis: 2", 2),
    ((2, 3, 4), "num_output: 3 axis: -1", 2),
    ((3, 6), "num_output: 4 transpose: true", 1),
    ((2, 3, 4), "num_output: 2 axis: 2 transpose: true bias_term: false", 2),
])
def test_inner_product_matches_caffe(shape, text, axis):
    x = rand(*shape, seed=5)
    k = math.prod(shape[axis:])
    n = int(text.split()[1])
    transpose, bias = "transpose: true" in text, "bias_term: false" not in text
    w = rand(*((k, n) if transpose else (n, k)), seed=6)
    b = rand(n, seed=7) if bias else None
    layer, (y,), _ = run("InnerProduct", f"inner_product_param {{ {text} }}", [x], [w] + ([b] if bias else []))
    assert layer.top_shapes == [tuple(shape[:axis]) + (n,)]
    expected = x.reshape(-1, k) @ (w if transpose else w.T) + (b if bias else 0)
    close(y, expected.reshape(*shape[:axis], n))


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm


def bn_blobs(c, seed=0, s=2.5):
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-1, 1, c)
    var = rng.uniform(0.5, 2, c)
    return [(mean * s).astype(np.float32), (var * s).astype(np.float32), np.array([s], np.float32)]


def test_batchnorm_train_normalises_with_batch_stats_and_updates_sums():
    x = rand(4, 3, 2, 3, seed=1) * 3 + 1
    blobs = bn_blobs(3, seed=2)
    maf, eps = 0.9, 1e-4
    layer, (y,), tb = run("BatchNorm", f"batch_norm_param {{ moving_average_fraction: {maf} eps: {eps} }}", [x],
                          blobs, phase=pb.TRAIN)
    assert not layer.use_global_stats
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))  # biased
    close(y, (x - mu[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None], rtol=1e-4, atol=1e-5)
    m = x.size // 3
    close(tb[2].numpy(), maf * blobs[2] + 1)
    close(tb[0].numpy(), maf * blobs[0] + mu, rtol=1e-5)
    close(tb[1].numpy(), maf * blobs[1] + m / (m - 1) * var, rtol=1e-5)


def test_batchnorm_train_on_2d_bottom():
    x = rand(5, 4, seed=3)
    _, (y,), tb = run("BatchNorm", "", [x], [np.zeros(4), np.zeros(4), np.zeros(1)], phase=pb.TRAIN)
    close(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
    close(tb[1].numpy(), x.var(0, ddof=1), rtol=1e-5)
    close(tb[2].numpy(), [1.0])


def test_batchnorm_train_one_value_per_channel():
    # m = 1: Caffe normalises to 0 (variance 0, correction factor 1) where torch's batch_norm refuses the input.
    x = rand(1, 3, seed=9)
    layer = make_layer("BatchNorm", "batch_norm_param { moving_average_fraction: 0.5 }", shapes=[x.shape],
                       phase=pb.TRAIN)
    blobs = [torch.ones(3), torch.ones(3), torch.ones(1)]
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    (y,) = layer.forward(blobs, [xt])
    assert torch.equal(y.detach(), torch.zeros(1, 3))
    y.sum().backward()
    assert torch.equal(xt.grad, torch.zeros(1, 3))
    close(blobs[0].numpy(), 0.5 + x[0], rtol=1e-6)
    close(blobs[1].numpy(), [0.5] * 3)
    close(blobs[2].numpy(), [1.5])


def test_batchnorm_test_uses_running_sums():
    x = rand(2, 3, 4, 4, seed=4)
    blobs = bn_blobs(3, seed=5, s=7.5)
    layer, (y,), tb = run("BatchNorm", "", [x], blobs, phase=pb.TEST)
    assert layer.use_global_stats
    mean, var = blobs[0] / 7.5, blobs[1] / 7.5
    close(y, (x - mean[None, :, None, None]) / np.sqrt(var + 1e-5)[None, :, None, None], rtol=1e-5)
    for got, want in zip(tb, blobs):  # TEST never touches the sums
        np.testing.assert_array_equal(got.numpy(), want)


def test_batchnorm_scale_factor_zero_means_zero_stats():
    x = rand(2, 3, 2, 2, seed=6)
    _, (y,), _ = run("BatchNorm", "", [x], [np.ones(3), np.ones(3), np.zeros(1)])
    close(y, x / np.sqrt(1e-5), rtol=1e-5)


@pytest.mark.parametrize("phase,field,uses_global", [
    (pb.TRAIN, "", False),
    (pb.TEST, "", True),
    (pb.TRAIN, "use_global_stats: true", True),
    (pb.TEST, "use_global_stats: false", False),
])
def test_batchnorm_use_global_stats_presence(phase, field, uses_global):
    x = rand(3, 2, 3, 3, seed=7)
    blobs = bn_blobs(2, seed=8)
    layer, (y,), tb = run("BatchNorm", f"batch_norm_param {{ {field} }}", [x], blobs, phase=phase)
    assert layer.use_global_stats == uses_global
    updated = not np.array_equal(tb[2].numpy(), blobs[2])
    assert updated == (not uses_global)
    if uses_global:
        mean, var = blobs[0] / blobs[2], blobs[1] / blobs[2]
    else:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    close(y, (x - mean[None, :, None, None]) / np.sqrt(var + 1e-5)[None, :, None, None], rtol=1e-4, atol=1e-5)


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { moving_average_fraction: 0.8 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
        scale_param { bias_term: %s filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
"""


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("bias", ["true", "false"])
def test_fused_batchnorm_scale_equals_unfused(phase, bias):
    text = BN_NET % bias
    nets = [Net(parse_net(text), phase=phase, seed=3, fuse_bn=f) for f in (True, False)]
    assert any(fused is not None for *_, fused in nets[0]._plan)
    assert all(fused is None for *_, fused in nets[1]._plan)
    stats = bn_blobs(4, seed=9, s=3.0)
    for net in nets:
        with torch.no_grad():
            for t, v in zip(net.params["bn"], stats):
                t.copy_(torch.from_numpy(v))
    x = torch.tensor(rand(4, 3, 5, 5, seed=10), dtype=torch.float32)
    g = torch.tensor(rand(4, 3, seed=11), dtype=torch.float32)
    results = []
    for net in nets:
        xi = x.clone().requires_grad_(True)
        out = net(data=xi)["ip"]
        (out * g).sum().backward()
        grads = {f"{name}/{i}": t.grad.clone() for name, ts in net.params.items() for i, t in enumerate(ts)
                 if t.grad is not None}
        blobs = [t.detach().clone() for t in net.params["bn"]]
        results.append((out.detach(), xi.grad, grads, blobs))
    (o1, gx1, g1, b1), (o2, gx2, g2, b2) = results
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
    assert set(g1) == set(g2) and {"conv/0", "conv/1", "scale/0", "ip/0", "ip/1"} <= set(g1)
    assert ("scale/1" in g1) == (bias == "true")
    for key in g1:
        torch.testing.assert_close(g1[key], g2[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(b1, b2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    changed = not torch.equal(b1[2], torch.tensor([3.0]))
    assert changed == (phase == "TRAIN")


# ----------------------------------------------------------------------------------------------------------------
# Scale and Bias


@pytest.mark.parametrize("shape,text,pshape,axis", [
    ((2, 3, 4, 5), "", (3,), 1),
    ((2, 3, 4, 5), "axis: 2 num_axes: 2", (4, 5), 2),
    ((2, 3, 4, 5), "axis: 1 num_axes: -1", (3, 4, 5), 1),
    ((2, 3, 4, 5), "num_axes: 0", (), 0),
    ((2, 3, 4, 5), "axis: -3 num_axes: 1", (3,), 1),
    ((2, 3), "axis: 0", (2,), 0),
])
@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_scale_and_bias_one_bottom(shape, text, pshape, axis, kind):
    x = rand(*shape, seed=1)
    gamma, beta = rand(*pshape, seed=2), rand(*pshape, seed=3)
    view = (1,) * axis + pshape + (1,) * (len(shape) - axis - len(pshape))
    if kind == "Scale":
        layer, (y,), _ = run("Scale", f"scale_param {{ {text} bias_term: true }}", [x], [gamma, beta])
        close(y, x * gamma.reshape(view) + beta.reshape(view))
        layer, (y,), _ = run("Scale", f"scale_param {{ {text} }}", [x], [gamma])
        close(y, x * gamma.reshape(view))
    else:
        layer, (y,), _ = run("Bias", f"bias_param {{ {text} }}", [x], [beta])
        close(y, x + beta.reshape(view))
    assert layer.blob_shapes[0] == pshape


@pytest.mark.parametrize("shape,other,text,axis", [
    ((2, 3, 4, 5), (3,), "", 1),
    ((2, 3, 4, 5), (3, 4), "", 1),
    ((2, 3, 4, 5), (4, 5), "axis: 2", 2),
    ((2, 3, 4, 5), (2, 3), "axis: 0", 0),
    ((2, 3, 4, 5), (), "", 0),
])
def test_scale_and_bias_two_bottoms(shape, other, text, axis):
    x, s = rand(*shape, seed=4), rand(*other, seed=5)
    view = (1,) * axis + other + (1,) * (len(shape) - axis - len(other))
    layer, (y,), _ = run("Scale", f"scale_param {{ {text} }}", [x, s], [])
    assert layer.blob_shapes == []
    close(y, x * s.reshape(view))
    beta = rand(*other, seed=6)
    layer, (y,), _ = run("Scale", f"scale_param {{ {text} bias_term: true }}", [x, s], [beta])
    assert layer.blob_shapes == [other]
    close(y, x * s.reshape(view) + beta.reshape(view))
    _, (y,), _ = run("Bias", f"bias_param {{ {text} }}", [x, s], [])
    close(y, x + s.reshape(view))


# ----------------------------------------------------------------------------------------------------------------
# LRN


def ref_lrn(x, size, alpha, beta, k, region):
    n, c, h, w = x.shape
    sq = x * x
    half = (size - 1) // 2
    if region == "ACROSS_CHANNELS":
        scale = np.empty_like(x)
        for ch in range(c):
            lo, hi = max(0, ch - half), min(c, ch + half + 1)
            scale[:, ch] = k + alpha / size * sq[:, lo:hi].sum(axis=1)
        return x * scale ** -beta
    padded = np.pad(sq, [(0, 0), (0, 0), (half, half), (half, half)])
    avg = np.empty_like(x)
    for i, j in itertools.product(range(h), range(w)):
        avg[:, :, i, j] = padded[:, :, i:i + size, j:j + size].sum(axis=(2, 3)) / (size * size)
    return x * (1 + alpha * avg) ** -beta  # WITHIN_CHANNEL ignores k


@pytest.mark.parametrize("region,size,alpha,beta,k", [
    ("ACROSS_CHANNELS", 3, 0.5, 0.75, 2.0),
    ("ACROSS_CHANNELS", 5, 1e-2, 0.6, 1.0),
    ("WITHIN_CHANNEL", 3, 0.9, 0.75, 3.0),
    ("WITHIN_CHANNEL", 5, 2.0, 0.5, 1.0),
])
def test_lrn_matches_caffe(region, size, alpha, beta, k):
    x = rand(2, 6, 5, 4, seed=size) * 2
    text = f"lrn_param {{ norm_region: {region} local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}"
    _, (y,), _ = run("LRN", text, [x])
    close(y, ref_lrn(x, size, alpha, beta, k, region), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# structure layers


def test_eltwise():
    a, b, c = rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2), rand(2, 3, 4, seed=3)
    _, (y,), _ = run("Eltwise", "", [a, b, c])
    close(y, a + b + c)
    _, (y,), _ = run("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 3 }", [a, b, c])
    close(y, 0.5 * a - 2 * b + 3 * c)
    _, (y,), _ = run("Eltwise", "eltwise_param { operation: PROD }", [a, b, c])
    close(y, a * b * c)
    _, (y,), _ = run("Eltwise", "eltwise_param { operation: MAX }", [a, b, c])
    close(y, np.maximum(np.maximum(a, b), c))
    # Caffe accepts (and ignores) coeff on MAX, refuses it on PROD.
    _, (y,), _ = run("Eltwise", "eltwise_param { operation: MAX coeff: 2 coeff: 2 coeff: 2 }", [a, b, c])
    close(y, np.maximum(np.maximum(a, b), c))
    with pytest.raises(NetError, match="only allowed for operation SUM"):
        make_layer("Eltwise", "eltwise_param { operation: PROD coeff: 1 coeff: 1 }", 2, 1, [a.shape, a.shape])


def ref_eltwise_max_mask(bottoms):
    """Caffe's EltwiseLayer MAX forward mask, element by element: a 0/1 tie goes to bottom 1 (``a > b`` else b);
    bottom k >= 2 takes over only where it is strictly greater than the running max."""
    flat = [b.reshape(-1) for b in bottoms]
    mask = np.empty(flat[0].size, int)
    top = np.empty(flat[0].size)
    for i in range(flat[0].size):
        top[i], mask[i] = (flat[0][i], 0) if flat[0][i] > flat[1][i] else (flat[1][i], 1)
        for k in range(2, len(flat)):
            if flat[k][i] > top[i]:
                top[i], mask[i] = flat[k][i], k
    return top.reshape(bottoms[0].shape), mask.reshape(bottoms[0].shape)


def test_eltwise_max_gradient_follows_caffes_mask_on_ties():
    # Integer values in a small range make ties between every pair of bottoms common.
    rng = np.random.default_rng(7)
    bottoms = [rng.integers(0, 3, (4, 5)).astype(np.float64) for _ in range(3)]
    layer = make_layer("Eltwise", "eltwise_param { operation: MAX }", 3, 1, [b.shape for b in bottoms])
    ts = [torch.tensor(b, dtype=torch.float32, requires_grad=True) for b in bottoms]
    (y,) = layer.forward([], ts)
    top_diff = rng.uniform(0.5, 1.5, (4, 5))
    y.backward(torch.tensor(top_diff, dtype=torch.float32))
    top, mask = ref_eltwise_max_mask(bottoms)
    close(y.detach().numpy(), top)
    assert (bottoms[0] == bottoms[1]).any() and (np.maximum(bottoms[0], bottoms[1]) == bottoms[2]).any()
    for k, t in enumerate(ts):                         # each element's gradient goes wholly to the mask's bottom
        close(t.grad.numpy(), np.where(mask == k, top_diff, 0.0))
    # The 0/1 tie alone: Caffe's gradient goes to bottom 1.
    a, b = (torch.tensor([1.0, 2.0], requires_grad=True) for _ in range(2))
    (y,) = make_layer("Eltwise", "eltwise_param { operation: MAX }", 2, 1, [(2,), (2,)]).forward([], [a, b])
    y.sum().backward()
    assert a.grad.tolist() == [0.0, 0.0] and b.grad.tolist() == [1.0, 1.0]


def test_concat():
    a, b = rand(2, 3, 4, 5, seed=1), rand(2, 2, 4, 5, seed=2)
    _, (y,), _ = run("Concat", "", [a, b])
    close(y, np.concatenate([a, b], 1))
    c, d = rand(2, 3, 1, 5, seed=3), rand(2, 3, 4, 5, seed=4)
    _, (y,), _ = run("Concat", "concat_param { axis: 2 }", [c, d])
    close(y, np.concatenate([c, d], 2))
    _, (y,), _ = run("Concat", "concat_param { concat_dim: 2 }", [c, d])
    close(y, np.concatenate([c, d], 2))
    _, (y,), _ = run("Concat", "concat_param { axis: -2 }", [c, d])
    close(y, np.concatenate([c, d], 2))
    with pytest.raises(NetError, match="axis or concat_dim"):
        make_layer("Concat", "concat_param { axis: 1 concat_dim: 1 }", 2, 1, [(2, 3), (2, 3)])


def test_slice_split_silence():
    x = rand(2, 6, 3, seed=1)
    _, tops, _ = run("Slice", "slice_param { slice_point: 1 slice_point: 4 }", [x], nt=3)
    for t, want in zip(tops, np.split(x, [1, 4], axis=1)):
        close(t, want)
    _, tops, _ = run("Slice", "slice_param { axis: 2 }", [x], nt=3)
    for t, want in zip(tops, np.split(x, 3, axis=2)):
        close(t, want)
    _, tops, _ = run("Slice", "slice_param { slice_dim: 0 }", [x], nt=2)
    for t, want in zip(tops, np.split(x, 2, axis=0)):
        close(t, want)
    _, tops, _ = run("Split", "", [x], nt=3)
    for t in tops:
        close(t, x)
    layer, tops, _ = run("Silence", "", [x, x], nt=0)
    assert tops == [] and layer.top_shapes == []


def test_split_sums_gradients():
    layer = make_layer("Split", "", 1, 2, [(3,)])
    x = torch.ones(3, requires_grad=True)
    a, b = layer.forward([], [x])
    (2 * a.sum() + 3 * b.sum()).backward()
    close(x.grad.numpy(), [5.0] * 3)


@pytest.mark.parametrize("shape,text,out", [
    ((2, 3, 4, 5), "", (2, 60)),
    ((2, 3, 4, 5), "flatten_param { axis: 2 }", (2, 3, 20)),
    ((2, 3, 4, 5), "flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
    ((2, 3, 4, 5), "flatten_param { axis: 0 end_axis: -3 }", (6, 4, 5)),
])
def test_flatten(shape, text, out):
    x = rand(*shape, seed=1)
    _, (y,), _ = run("Flatten", text, [x])
    assert y.shape == out
    close(y, x.reshape(out))


@pytest.mark.parametrize("shape,text,out", [
    ((2, 3, 4, 5), "shape { dim: 0 dim: -1 }", (2, 60)),
    ((2, 3, 4, 5), "shape { dim: 0 dim: 0 dim: 20 }", (2, 3, 20)),
    ((2, 3, 4, 5), "shape { dim: -1 dim: 5 }", (24, 5)),
    ((2, 3, 4, 5), "axis: 2 num_axes: 1 shape { dim: 2 dim: 2 }", (2, 3, 2, 2, 5)),
    ((2, 3, 4, 5), "axis: 2 shape { dim: 10 dim: -1 }", (2, 3, 10, 2)),
    ((2, 3, 4, 5), "axis: 1 num_axes: 2 shape { dim: -1 }", (2, 12, 5)),
    ((2, 3, 4, 5), "axis: -1 shape { dim: 1 }", (2, 3, 4, 5, 1)),
    ((2, 3, 4, 5), "axis: 0 num_axes: 0 shape { dim: 1 }", (1, 2, 3, 4, 5)),
    ((2, 6), "shape { dim: 0 dim: 2 dim: -1 }", (2, 2, 3)),
])
def test_reshape(shape, text, out):
    x = rand(*shape, seed=2)
    _, (y,), _ = run("Reshape", f"reshape_param {{ {text} }}", [x])
    assert y.shape == out
    close(y, x.reshape(out))


def test_reshape_rejects_bad_shapes():
    with pytest.raises(NetError, match="-1"):
        make_layer("Reshape", "reshape_param { shape { dim: -1 dim: -1 } }", shapes=[(2, 3)])
    with pytest.raises(NetError, match="elements"):
        make_layer("Reshape", "reshape_param { shape { dim: 5 } }", shapes=[(2, 3)])


def test_crop():
    a, b = rand(2, 3, 7, 6, seed=1), rand(2, 3, 4, 3, seed=2)
    _, (y,), _ = run("Crop", "crop_param { offset: 1 }", [a, b])  # axis 2 by default
    close(y, a[:, :, 1:5, 1:4])
    _, (y,), _ = run("Crop", "crop_param { offset: 2 offset: 3 }", [a, b])
    close(y, a[:, :, 2:6, 3:6])
    c = rand(2, 2, 4, 3, seed=3)
    _, (y,), _ = run("Crop", "crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }", [a, c])
    close(y, a[:, 1:3, 0:4, 2:5])
    _, (y,), _ = run("Crop", "", [a, b])
    close(y, a[:, :, :4, :3])
    with pytest.raises(NetError, match="offset"):
        make_layer("Crop", "crop_param { offset: 4 }", 2, 1, [a.shape, b.shape])


# ----------------------------------------------------------------------------------------------------------------
# element-wise layers


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


ELEMENTWISE = [
    ("ReLU", "", lambda x: np.maximum(x, 0)),
    ("ReLU", "relu_param { negative_slope: 0.1 }", lambda x: np.maximum(x, 0) + 0.1 * np.minimum(x, 0)),
    ("ELU", "", lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    ("ELU", "elu_param { alpha: 0.4 }", lambda x: np.where(x > 0, x, 0.4 * (np.exp(x) - 1))),
    ("Sigmoid", "", np_sigmoid),
    ("TanH", "", np.tanh),
    ("AbsVal", "", np.abs),
    ("BNLL", "", lambda x: np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0))))),
    ("Power", "", lambda x: x),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 3 }", lambda x: (3 + 0.5 * x) ** 2),
    ("Power", "power_param { power: 3 scale: -1.5 }", lambda x: (-1.5 * x) ** 3),
    ("Power", "power_param { power: 0.5 shift: 4 }", lambda x: np.sqrt(4 + x)),
    ("Power", "power_param { power: 2 scale: 0 shift: 3 }", lambda x: np.full_like(x, 9.0)),
    ("Power", "power_param { power: 0 scale: 2 }", lambda x: np.ones_like(x)),
    ("Exp", "", np.exp),
    ("Exp", "exp_param { base: -1 scale: 0.5 shift: 1 }", lambda x: np.exp(1 + 0.5 * x)),
    ("Exp", "exp_param { base: 2 scale: 3 shift: -1 }", lambda x: 2.0 ** (-1 + 3 * x)),
    ("Log", "log_param { shift: 4 }", lambda x: np.log(4 + x)),
    ("Log", "log_param { base: 2 scale: 2 shift: 7 }", lambda x: np.log2(7 + 2 * x)),
    ("Log", "log_param { base: 10 shift: 3 }", lambda x: np.log10(3 + x)),
    ("Swish", "", lambda x: x * np_sigmoid(x)),
    ("Swish", "swish_param { beta: 2.5 }", lambda x: x * np_sigmoid(2.5 * x)),
    ("Clip", "clip_param { min: -0.5 max: 1.25 }", lambda x: np.clip(x, -0.5, 1.25)),
    ("Threshold", "", lambda x: (x > 0).astype(float)),
    ("Threshold", "threshold_param { threshold: 0.7 }", lambda x: (x > 0.7).astype(float)),
    ("Dropout", "dropout_param { dropout_ratio: 0.3 }", lambda x: x),  # TEST phase: identity
]


@pytest.mark.parametrize("type_name,text,fn", ELEMENTWISE, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(ELEMENTWISE)])
def test_elementwise_matches_caffe(type_name, text, fn):
    x = rand(2, 3, 4, 5, seed=1, low=-3, high=3)
    _, (y,), _ = run(type_name, text, [x])
    close(y, fn(x), rtol=1e-5, atol=1e-6)


ZERO_PROBES = ELEMENTWISE + [
    (t, text, None) for t, text in [
        ("ReLU", "relu_param { negative_slope: inf }"), ("ELU", "elu_param { alpha: inf }"),
        ("ELU", "elu_param { alpha: 0 }"), ("Swish", "swish_param { beta: inf }"), ("Swish", "swish_param { beta: 0 }"),
        ("Power", "power_param { power: -1 }"), ("Power", "power_param { power: 0 }"),
        ("Power", "power_param { power: 2 scale: inf }"), ("Power", "power_param { power: 0.5 shift: -1 }"),
        ("Power", "power_param { power: 1 shift: nan }"), ("Power", "power_param { power: 2 scale: 0 }"),
        ("Log", "log_param { shift: 1 scale: 3 }"), ("Log", "log_param { base: 10 shift: 1 }"),
        ("Log", "log_param { shift: 1 scale: inf }"), ("Log", ""), ("Clip", "clip_param { min: 0 max: 0 }"),
        ("Clip", "clip_param { min: 0.1 max: 1 }"), ("Clip", "clip_param { min: -1 max: -0.1 }"),
        ("Threshold", "threshold_param { threshold: -0.5 }"), ("Threshold", "threshold_param { threshold: nan }"),
        ("Dropout", "dropout_param { dropout_ratio: 0.5 }"), ("PReLU", ""),
        ("PReLU", "prelu_param { channel_shared: true }")]]


@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
@pytest.mark.parametrize("type_name,text", [(t, text) for t, text, _ in ZERO_PROBES],
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(ZERO_PROBES)])
def test_elementwise_declares_whether_zero_stays_zero(type_name, text, phase):
    # The pruner reads zero_preserving without torch (slim.prune must not import it): the declaration must agree
    # with the layer's own function on a zero input, with learned blobs of ones.
    layer = make_layer(type_name, text, shapes=[(1, 3)], phase=phase)
    with np.errstate(all="ignore"):
        zero = layer.forward([torch.ones(s) for s in layer.blob_shapes], [torch.zeros((1, 3))])[0]
    assert layer.channel_role().zero_preserving == bool((zero == 0).all()), (type_name, text, zero)


PRODUCT_PROBES = [("Eltwise", "eltwise_param { operation: PROD }", [(2, 3, 4, 4), (2, 3, 4, 4)], True),
                  ("Eltwise", "eltwise_param { operation: SUM }", [(2, 3, 4, 4), (2, 3, 4, 4)], False),
                  ("Eltwise", "eltwise_param { operation: MAX }", [(2, 3, 4, 4), (2, 3, 4, 4)], False),
                  ("Scale", "scale_param { axis: 0 }", [(2, 3, 4, 4), (2, 3)], True),   # squeeze-and-excitation
                  ("Bias", "bias_param { axis: 0 }", [(2, 3, 4, 4), (2, 3)], False)]


@pytest.mark.parametrize("type_name,text,shapes,product", PRODUCT_PROBES,
                         ids=[f"{t}-{i}" for i, (t, *_) in enumerate(PRODUCT_PROBES)])
def test_ties_declare_whether_a_zero_in_one_bottom_zeroes_the_channel(type_name, text, shapes, product):
    # The pruner reads ``product`` to know that x * gate with gate(0) = 0.5 (HardSwish, squeeze-and-excitation)
    # still silences a channel zeroed in x: the declaration must agree with the forward, for either bottom zeroed.
    layer = make_layer(type_name, text, nb=len(shapes), shapes=shapes)
    role = layer.channel_role()
    assert role.kind == "ties" and role.product == product
    for zeroed in range(len(shapes)):
        bottoms = [torch.rand(s) + 0.5 for s in shapes]
        bottoms[zeroed][:, 1] = 0
        y = layer.forward([], bottoms)[0]
        assert bool((y[:, 1] == 0).all()) == product and bool((y[:, [0, 2]] != 0).all())


def test_bnll_is_stable_for_large_inputs():
    x = np.array([-200.0, -60.0, -1.0, 0.0, 1.0, 60.0, 200.0])
    _, (y,), _ = run("BNLL", "", [x])
    assert np.all(np.isfinite(y))
    close(y, np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0)))), rtol=1e-6,
          atol=1e-30)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu(shared):
    x = rand(2, 3, 4, 5, seed=2)
    a = np.array(0.3) if shared else np.array([0.1, -0.5, 2.0])
    layer, (y,), _ = run("PReLU", f"prelu_param {{ channel_shared: {str(shared).lower()} }}", [x], [a])
    assert layer.blob_shapes == [() if shared else (3,)]
    view = a if shared else a.reshape(1, 3, 1, 1)
    close(y, np.maximum(x, 0) + view * np.minimum(x, 0))
    _, (y2,), _ = run("PReLU", "", [rand(2, 3, seed=3)], [np.array([0.1, -0.5, 2.0])])  # 2-D bottom
    x2 = rand(2, 3, seed=3)
    close(y2, np.maximum(x2, 0) + np.array([0.1, -0.5, 2.0]) * np.minimum(x2, 0))


def test_dropout_train_scales_and_drops_the_ratio():
    torch.manual_seed(0)
    x = np.ones((100, 1000))
    _, (y,), _ = run("Dropout", "dropout_param { dropout_ratio: 0.3 }", [x], phase=pb.TRAIN)
    zeros = np.mean(y == 0)
    assert abs(zeros - 0.3) < 0.01
    close(y[y != 0], 1 / 0.7)
    _, (y,), _ = run("Dropout", "", [x], phase=pb.TRAIN)  # default ratio 0.5
    assert abs(np.mean(y == 0) - 0.5) < 0.01
    close(y[y != 0], 2.0)


# ----------------------------------------------------------------------------------------------------------------
# Softmax, losses and Accuracy


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_axis(axis):
    x = rand(2, 3, 4, seed=1, low=-4, high=4)
    text = f"softmax_param {{ axis: {axis} }}"
    _, (y,), _ = run("Softmax", text, [x])
    close(y, np_softmax(x, axis))


def ref_softmax_loss(scores, labels, axis, ignore, mode):
    """Loss and gradient of Caffe's SoftmaxWithLoss; labels broadcast to outer x inner."""
    c = scores.shape[axis]
    outer = math.prod(scores.shape[:axis])
    inner = math.prod(scores.shape[axis + 1:])
    p = np_softmax(scores, axis).reshape(outer, c, inner)
    lab = labels.reshape(outer, inner).astype(int)
    loss, valid = 0.0, 0
    grad = p.copy()
    for i, j in itertools.product(range(outer), range(inner)):
        if ignore is not None and lab[i, j] == ignore:
            grad[i, :, j] = 0
            continue
        loss -= math.log(max(p[i, lab[i, j], j], FLT_MIN))
        grad[i, lab[i, j], j] -= 1
        valid += 1
    norm = {"VALID": valid, "FULL": outer * inner, "BATCH_SIZE": outer, "NONE": 1}[mode]
    norm = max(1.0, norm)
    return loss / norm, (grad / norm).reshape(scores.shape)


@pytest.mark.parametrize("text,mode", [
    ("", "VALID"),
    ("loss_param { normalization: VALID }", "VALID"),
    ("loss_param { normalization: FULL }", "FULL"),
    ("loss_param { normalization: BATCH_SIZE }", "BATCH_SIZE"),
    ("loss_param { normalization: NONE }", "NONE"),
    ("loss_param { normalize: true }", "VALID"),
    ("loss_param { normalize: false }", "BATCH_SIZE"),
    ("loss_param { normalize: false normalization: FULL }", "FULL"),
])
@pytest.mark.parametrize("ignore", [None, 2, 255])
def test_softmax_with_loss_normalisation_and_gradient(text, mode, ignore):
    scores = rand(3, 4, 2, 2, seed=1, low=-3, high=3)
    labels = np.random.default_rng(2).integers(0, 4, (3, 1, 2, 2)).astype(np.float64)
    if ignore is not None:
        labels[0, 0, 0, 0] = labels[2, 0, 1, 1] = ignore
        text = (text[:-1] if text else "loss_param { ") + f" ignore_label: {ignore} }}"
    layer = make_layer("SoftmaxWithLoss", text, 2, 1, [scores.shape, labels.shape])
    s = torch.tensor(scores, dtype=torch.float32, requires_grad=True)
    (loss,) = layer.forward([], [s, torch.tensor(labels, dtype=torch.float32)])
    assert loss.shape == ()
    loss.backward()
    want, grad = ref_softmax_loss(scores, labels, 1, ignore, mode)
    close(float(loss.detach()), want, rtol=1e-5)
    close(s.grad.numpy(), grad, rtol=1e-4, atol=1e-6)


def test_softmax_with_loss_clamps_the_value_not_the_gradient():
    # Caffe: loss = -log(max(p_label, FLT_MIN)); backward = (prob - onehot) / normalizer, never clamped. For logits
    # [100, 0, 0] and label 1, p_1 = e^-100 < FLT_MIN: the loss is -log(FLT_MIN) and the gradient [1, -1, 0].
    layer = make_layer("SoftmaxWithLoss", "", 2, 1, [(1, 3), (1,)])
    s = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    (loss,) = layer.forward([], [s, torch.tensor([1.0])])
    loss.backward()
    close(float(loss.detach()), -math.log(FLT_MIN), rtol=1e-6)
    close(s.grad.numpy(), [[1.0, -1.0, 0.0]], atol=1e-6)
    # Two samples, one clamped: each gradient row is its own prob - onehot, over the VALID normaliser 2.
    s = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    layer = make_layer("SoftmaxWithLoss", "", 2, 1, [(2, 3), (2,)])
    (loss,) = layer.forward([], [s, torch.tensor([2.0, 0.0])])
    loss.backward()
    want, grad = ref_softmax_loss(s.detach().double().numpy(), np.array([2.0, 0.0]), 1, None, "VALID")
    close(float(loss.detach()), want, rtol=1e-6)
    close(s.grad.numpy(), grad, atol=1e-6)
    assert abs(s.grad[0, 2].item() + 0.5) < 1e-6          # the clamped sample's gradient survives


def test_softmax_with_loss_spatial_axis_and_prob_top():
    scores = rand(2, 3, 5, seed=3, low=-2, high=2)
    labels = np.random.default_rng(4).integers(0, 5, (2, 3)).astype(np.float64)
    layer, (loss, prob), _ = run("SoftmaxWithLoss", "softmax_param { axis: 2 }", [scores, labels], nt=2)
    close(loss, ref_softmax_loss(scores, labels, 2, None, "VALID")[0], rtol=1e-5)
    close(prob, np_softmax(scores, 2))
    assert layer.top_shapes == [(), (2, 3, 5)]


def test_softmax_with_loss_labels_out_of_range():
    layer = make_layer("SoftmaxWithLoss", "", 2, 1, [(2, 3), (2,)])
    with pytest.raises(NetError, match="labels must lie in"):
        layer.forward([], [torch.zeros(2, 3), torch.tensor([0.0, 3.0])])


def ref_accuracy(scores, labels, top_k, ignore, axis=1):
    c = scores.shape[axis]
    outer = math.prod(scores.shape[:axis])
    inner = math.prod(scores.shape[axis + 1:])
    s = scores.reshape(outer, c, inner)
    lab = labels.reshape(outer, inner).astype(int)
    correct, count = 0, 0
    per_correct, per_count = np.zeros(c), np.zeros(c)
    for i, j in itertools.product(range(outer), range(inner)):
        if ignore is not None and lab[i, j] == ignore:
            continue
        count += 1
        per_count[lab[i, j]] += 1
        true = s[i, lab[i, j], j]
        better = -1  # Caffe's loop counts the true class too
        for k in range(c):
            better += s[i, k, j] >= true
        if better < top_k:
            correct += 1
            per_correct[lab[i, j]] += 1
    per = np.where(per_count > 0, per_correct / np.maximum(per_count, 1), 0)
    return (correct / count if count else 0.0), per


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("ignore", [None, 1])
def test_accuracy_top_k_ties_and_ignore(top_k, ignore):
    # Integer-valued scores make ties common; a tie with the true class counts against it.
    scores = np.random.default_rng(5).integers(0, 3, (12, 4)).astype(np.float64)
    labels = np.random.default_rng(6).integers(0, 4, 12).astype(np.float64)
    text = f"accuracy_param {{ top_k: {top_k} {'' if ignore is None else f'ignore_label: {ignore}'} }}"
    _, (acc, per), _ = run("Accuracy", text, [scores, labels], nt=2)
    want, want_per = ref_accuracy(scores, labels, top_k, ignore)
    close(acc, want)
    close(per, want_per)


def test_accuracy_tie_counts_against():
    scores = np.array([[1.0, 1.0, 0.0], [2.0, 1.0, 2.0]])
    _, (acc,), _ = run("Accuracy", "", [scores, np.array([0.0, 0.0])])
    assert acc == 0.0
    _, (acc,), _ = run("Accuracy", "accuracy_param { top_k: 2 }", [scores, np.array([0.0, 0.0])])
    assert acc == 1.0


def test_accuracy_spatial_and_all_ignored():
    scores = rand(2, 3, 4, seed=7)
    labels = np.random.default_rng(8).integers(0, 3, (2, 4)).astype(np.float64)
    _, (acc,), _ = run("Accuracy", "", [scores, labels])
    close(acc, ref_accuracy(scores, labels, 1, None)[0])
    _, (acc,), _ = run("Accuracy", "accuracy_param { ignore_label: 0 }", [scores, np.zeros((2, 4))])
    assert acc == 0.0


def test_euclidean_loss():
    a, b = rand(3, 4, seed=1), rand(3, 2, 2, seed=2)
    layer = make_layer("EuclideanLoss", "", 2, 1, [a.shape, b.shape])
    ta = torch.tensor(a, dtype=torch.float32, requires_grad=True)
    (loss,) = layer.forward([], [ta, torch.tensor(b, dtype=torch.float32)])
    close(float(loss.detach()), ((a - b.reshape(3, 4)) ** 2).sum() / (2 * 3))
    loss.backward()
    close(ta.grad.numpy(), (a - b.reshape(3, 4)) / 3)


def ref_sigmoid_ce(x, t, ignore=None, mode="BATCH_SIZE"):
    keep = np.ones_like(t, bool) if ignore is None else t != ignore
    per = -(t * np.log(np_sigmoid(x)) + (1 - t) * np.log(1 - np_sigmoid(x)))
    norm = {"BATCH_SIZE": x.shape[0], "VALID": keep.sum(), "FULL": x.size, "NONE": 1}[mode]
    return (per * keep).sum() / max(1, norm)


@pytest.mark.parametrize("text,ignore,mode", [
    ("", None, "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 }", -1, "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 normalization: VALID }", -1, "VALID"),
    ("loss_param { normalization: FULL }", None, "FULL"),
])
def test_sigmoid_cross_entropy_loss(text, ignore, mode):
    x = rand(4, 3, 2, seed=1, low=-4, high=4)
    t = np.random.default_rng(2).integers(0, 2, (4, 3, 2)).astype(np.float64)
    if ignore is not None:
        t[0, 0, 0] = t[3, 2, 1] = t[1, 1, 1] = ignore
    _, (loss,), _ = run("SigmoidCrossEntropyLoss", text, [x, t])
    close(loss, ref_sigmoid_ce(x, t, ignore, mode), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# fillers


FILLER_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 16 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "xavier" type: "Convolution" bottom: "data" top: "x"
        convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "msra" type: "Convolution" bottom: "data" top: "m"
        convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "msra_out" type: "Convolution" bottom: "data" top: "mo"
        convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "msra" variance_norm: FAN_OUT } } }
layer { name: "gauss" type: "InnerProduct" bottom: "data" top: "g"
        inner_product_param { num_output: 32 weight_filler { type: "gaussian" std: 0.2 }
                              bias_filler { type: "constant" value: 0.3 } } }
layer { name: "up" type: "Deconvolution" bottom: "data" top: "up"
        convolution_param { num_output: 16 group: 16 kernel_size: 4 stride: 2 bias_term: false
                            weight_filler { type: "bilinear" } } }
"""


def test_filler_defaults_and_variances():
    net = Net(parse_net(FILLER_NET), seed=0)
    p = {name: [t.detach().numpy() for t in ts] for name, ts in net.params.items()}
    assert np.all(p["conv"][0] == 0) and np.all(p["conv"][1] == 0)  # no filler: constant 0
    assert np.all(p["scale"][0] == 1) and np.all(p["scale"][1] == 0)
    assert np.all(p["prelu"][0] == np.float32(0.25))
    fan_in = 16 * 9
    assert abs(p["xavier"][0].var() * fan_in - 1.0) < 0.1          # U[-sqrt(3/n), sqrt(3/n)]: variance 1/n
    assert np.abs(p["xavier"][0]).max() <= math.sqrt(3 / fan_in)
    assert abs(p["msra"][0].var() * fan_in / 2 - 1.0) < 0.1        # N(0, 2/n)
    assert abs(p["msra_out"][0].var() * (64 * 9) / 2 - 1.0) < 0.1  # fan_out = count / shape[1]
    assert abs(p["gauss"][0].std() - 0.2) < 0.01 and np.all(p["gauss"][1] == np.float32(0.3))


def test_bilinear_filler_exact():
    net = Net(parse_net(FILLER_NET), seed=0)
    w = net.params["up"][0].detach().numpy()
    assert w.shape == (16, 1, 4, 4)
    row = np.array([0.25, 0.75, 0.75, 0.25])
    for c in range(16):
        np.testing.assert_array_equal(w[c, 0], np.outer(row, row).astype(np.float32))
    from slim.layers.fillers import fill
    k = fill(text_format.Parse('type: "bilinear"', pb.FillerParameter()), (1, 1, 3, 3), None).numpy()[0, 0]
    f = math.ceil(3 / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    want = np.array([[(1 - abs(x / f - c)) * (1 - abs(y / f - c)) for x in range(3)] for y in range(3)])
    close(k, want)


def test_fillers_are_seeded():
    a, b, c = (Net(parse_net(FILLER_NET), seed=s) for s in (5, 5, 6))
    for name in ("xavier", "msra", "gauss"):
        torch.testing.assert_close(a.params[name][0], b.params[name][0], rtol=0, atol=0)
        assert not torch.equal(a.params[name][0], c.params[name][0])


# ----------------------------------------------------------------------------------------------------------------
# every registered type


INPUTS = """
layer { name: "inputs" type: "Input" top: "x" top: "y" top: "v" top: "label" top: "t"
        input_param { shape { dim: 2 dim: 4 dim: 6 dim: 6 } shape { dim: 2 dim: 4 dim: 4 dim: 4 }
                      shape { dim: 2 dim: 5 } shape { dim: 2 } shape { dim: 2 dim: 5 } } }
"""

LAYER_SNIPPETS = {
    "AbsVal": 'bottom: "x" top: "o"',
    "Accuracy": 'bottom: "v" bottom: "label" top: "o"',
    "BNLL": 'bottom: "x" top: "o"',
    "BatchNorm": 'bottom: "x" top: "o"',
    "Bias": 'bottom: "x" top: "o" bias_param { filler { type: "gaussian" } }',
    "Clip": 'bottom: "x" top: "o" clip_param { min: -0.5 max: 0.5 }',
    "Concat": 'bottom: "x" bottom: "x" top: "o"',
    "Convolution": 'bottom: "x" top: "o" convolution_param { num_output: 3 kernel_size: 3 }',
    "Crop": 'bottom: "x" bottom: "y" top: "o" crop_param { offset: 1 }',
    "Deconvolution": 'bottom: "x" top: "o" convolution_param { num_output: 3 kernel_size: 2 stride: 2 }',
    "Dropout": 'bottom: "x" top: "o"',
    "ELU": 'bottom: "x" top: "o"',
    "Eltwise": 'bottom: "x" bottom: "x" top: "o" eltwise_param { coeff: 1 coeff: -0.5 }',
    "EuclideanLoss": 'bottom: "v" bottom: "t" top: "o"',
    "Exp": 'bottom: "x" top: "o"',
    "Flatten": 'bottom: "x" top: "o"',
    "InnerProduct": 'bottom: "x" top: "o" inner_product_param { num_output: 3 }',
    "LRN": 'bottom: "x" top: "o" lrn_param { local_size: 3 }',
    "Log": 'bottom: "x" top: "o" log_param { shift: 10 }',
    "PReLU": 'bottom: "x" top: "o"',
    "Pooling": 'bottom: "x" top: "o" pooling_param { pool: AVE kernel_size: 3 stride: 2 }',
    "Power": 'bottom: "x" top: "o" power_param { power: 2 shift: 1 }',
    "ReLU": 'bottom: "x" top: "o"',
    "Reshape": 'bottom: "x" top: "o" reshape_param { shape { dim: 0 dim: -1 } }',
    "Scale": 'bottom: "x" top: "o" scale_param { bias_term: true }',
    "Sigmoid": 'bottom: "x" top: "o"',
    "SigmoidCrossEntropyLoss": 'bottom: "v" bottom: "t" top: "o"',
    "Silence": 'bottom: "x"',
    "Slice": 'bottom: "x" top: "o" top: "o2"',
    "Softmax": 'bottom: "x" top: "o"',
    "SoftmaxWithLoss": 'bottom: "v" bottom: "label" top: "o"',
    "Split": 'bottom: "x" top: "o" top: "o2"',
    "Swish": 'bottom: "x" top: "o"',
    "TanH": 'bottom: "x" top: "o"',
    "Threshold": 'bottom: "x" top: "o"',
}

DATA_TYPES = {"Input", "DummyData", "Data", "ImageData", "MemoryData", "SlimData"}


def test_every_type_has_a_case():
    assert set(registered_types()) == set(LAYER_SNIPPETS) | DATA_TYPES


@pytest.mark.parametrize("type_name", sorted(LAYER_SNIPPETS))
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_every_registered_type_runs_and_learns(type_name, phase):
    text = INPUTS + f'layer {{ name: "l" type: "{type_name}" {LAYER_SNIPPETS[type_name]} }}'
    net = Net(parse_net(text), phase=phase, seed=1)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 4, 6, 6)), "y": rng.standard_normal((2, 4, 4, 4)),
             "v": rng.standard_normal((2, 5)), "label": rng.integers(0, 5, 2), "t": rng.uniform(0, 1, (2, 5))}
    feeds = {k: torch.tensor(v, dtype=torch.float32, requires_grad=k in "xyv") for k, v in feeds.items()}
    out = net(**feeds)
    produced = [v for k, v in out.items() if k in ("o", "o2")]
    assert len(produced) == len(net.graph.layer("l").tops)
    for v in produced:
        assert torch.isfinite(v).all(), type_name
    objective = sum((v * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))).sum() for v in produced
                    if v.requires_grad)
    learnable = [p for p in net.learnable_params if p.lr_mult != 0]
    if not learnable:
        return
    objective.backward()
    for p in learnable:
        assert p.tensor.grad is not None, f"{type_name}: no gradient on blob {p.index}"
        assert torch.isfinite(p.tensor.grad).all() and p.tensor.grad.abs().sum() > 0, f"{type_name} blob {p.index}"


def test_input_and_dummy_data_layers():
    net = Net(parse_net("""
        layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "dummy" type: "DummyData" top: "c" top: "d"
                dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 }
                                   data_filler { type: "constant" value: 2 } data_filler { type: "gaussian" } } }
    """))
    assert net.inputs == ["a", "b"]
    out = net(a=torch.ones(2, 3), b=torch.zeros(5, 3))  # any batch size
    assert list(out) == ["a", "b", "c", "d"]
    assert torch.equal(out["c"], torch.full((2, 3), 2.0))
    assert out["d"].shape == (4,) and out["d"].std() > 0


def test_slimdata_and_memorydata_layers():
    net = Net(parse_net("""
        layer { name: "d" type: "SlimData" top: "data" top: "label" slim_data_param { dataset: DIGITS batch_size: 4 } }
        layer { name: "m" type: "MemoryData" top: "md" top: "ml"
                memory_data_param { batch_size: 2 channels: 1 height: 3 width: 3 } }
    """), seed=0)
    arrays = np.arange(36, dtype=np.float32).reshape(4, 1, 3, 3)
    net.set_input_arrays(arrays, np.arange(4, dtype=np.float32))
    out = net()
    assert out["data"].shape == (4, 1, 8, 8) and out["label"].shape == (4,)
    assert torch.isfinite(out["data"]).all()
    assert torch.equal(out["md"], torch.from_numpy(arrays[:2]))
    assert torch.equal(out["ml"], torch.tensor([0.0, 1.0]))


def test_data_layer_reads_an_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb", reason="the Data layer needs the optional lmdb package")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    images = np.arange(3 * 2 * 4 * 4, dtype=np.uint8).reshape(3, 2, 4, 4)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            d = pb.Datum(channels=2, height=4, width=4, data=img.tobytes(), label=i)
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()
    net = Net(parse_net(f"""
        layer {{ name: "d" type: "Data" top: "data" top: "label"
                 data_param {{ source: "{tmp_path / 'db'}" backend: LMDB batch_size: 2 }} }}
    """))
    out = net()
    assert torch.equal(out["data"], torch.from_numpy(images[:2].astype(np.float32)))
    assert torch.equal(out["label"], torch.tensor([0.0, 1.0]))


def test_image_data_layer_reads_a_list(tmp_path):
    image = pytest.importorskip("PIL.Image", reason="ImageData decodes with Pillow")
    lines = []
    for i in range(2):
        arr = np.full((5, 6, 3), 40 * (i + 1), np.uint8)
        image.fromarray(arr).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    net = Net(parse_net(f"""
        layer {{ name: "d" type: "ImageData" top: "data" top: "label"
                 image_data_param {{ source: "{tmp_path / 'list.txt'}" root_folder: "{tmp_path}/" batch_size: 2 }} }}
    """))
    out = net()
    assert out["data"].shape == (2, 3, 5, 6)
    assert torch.equal(out["data"][1], torch.full((3, 5, 6), 80.0))
    assert torch.equal(out["label"], torch.tensor([0.0, 1.0]))


# ----------------------------------------------------------------------------------------------------------------
# errors


def build(layer_text, shape=(1, 3, 5, 5)):
    dims = " ".join(f"dim: {d}" for d in shape)
    data = f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}'
    return build_graph(parse_net(data + layer_text))


@pytest.mark.parametrize("layer_text,words", [
    ('layer { name: "conv1" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 '
     'kernel_size: 7 } }', ["conv1", "data", "kernel", "larger than the padded input"]),
    ('layer { name: "pool1" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 9 pad: 1 } }',
     ["pool1", "data", "kernel", "larger than the padded input"]),
    ('layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "data" top: "s" eltwise_param { coeff: 1 } }',
     ["sum", "coeff", "1 values for 2 bottoms"]),
    ('layer { name: "sl" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 1 '
     'slice_point: 2 } }', ["sl", "2 slice points for 2 tops"]),
    ('layer { name: "sl" type: "Slice" bottom: "data" top: "a" top: "b" slice_param { slice_point: 3 } }',
     ["sl", "slice points", "increase"]),
    ('layer { name: "sl" type: "Slice" bottom: "data" top: "a" top: "b" }', ["sl", "evenly", "slice_point"]),
    ('layer { name: "sto" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: STOCHASTIC kernel_size: 2 '
     '} }', ["sto", "STOCHASTIC", "MAX or AVE"]),
    ('layer { name: "pool2" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 2 pad: 2 } }',
     ["pool2", "pad", "smaller than the kernel"]),
    ('layer { name: "g" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 '
     'kernel_size: 1 group: 2 } }', ["'g'", "group 2", "input channels (3)"]),
    ('layer { name: "cat" type: "Concat" bottom: "data" bottom: "data" top: "c" concat_param { axis: 4 } }',
     ["cat", "axis 4", "out of range"]),
    ('layer { name: "wat" type: "Frobnicate" bottom: "data" top: "c" }', ["wat", "Frobnicate", "Convolution"]),
])
def test_errors_name_the_layer_and_explain(layer_text, words):
    with pytest.raises(NetError) as info:
        build(layer_text)
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} missing from: {message}"
