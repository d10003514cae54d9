"""The pruned net equals the masked original (removed channels silenced), for adversarial small nets and every net
in nets/, within 1e-5 relative to the output's scale."""

from pathlib import Path

import numpy as np
import pytest
import torch

from slim.deploy import make_deploy
from slim.io import parse_net, read_net
from slim.net import Net
from slim.prune import PrunePolicy, prune_net

NETS = Path(__file__).resolve().parents[1] / "nets"
TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"


def random_blobs(net_param, seed=0):
    """Blobs from the net's fillers, then BatchNorm statistics, Scale gamma/beta and biases made non-trivial."""
    net = Net(net_param, seed=seed)
    gen = np.random.default_rng(seed)
    blobs = {}
    for name, tensors in net.params.items():
        node = net.graph.layer(name)
        arrays = [t.detach().numpy().copy() for t in tensors]
        if node.type == "BatchNorm":
            arrays[0] = gen.normal(0, 0.2, arrays[0].shape).astype(np.float32)
            arrays[1] = gen.uniform(0.5, 1.5, arrays[1].shape).astype(np.float32)
            arrays[2] = np.full(arrays[2].shape, 2.0, np.float32)      # a non-unit factor: mean = S / 2
        elif node.type == "Scale" and len(node.bottoms) == 1:
            arrays[0] = gen.uniform(0.05, 1.0, arrays[0].shape).astype(np.float32)
            for i in range(1, len(arrays)):
                arrays[i] = gen.normal(0, 0.2, arrays[i].shape).astype(np.float32)
        else:
            for i in range(1, len(arrays)):  # biases, PReLU slopes stay from their fillers but biases get values
                if node.type != "PReLU":
                    arrays[i] = gen.normal(0, 0.2, arrays[i].shape).astype(np.float32)
        blobs[name] = arrays
    return blobs


def forward(net_param, blobs, x):
    net = Net(net_param, seed=0)
    params = net.params
    with torch.no_grad():
        for name, arrays in blobs.items():
            if name in params:
                assert len(params[name]) == len(arrays), name
                for t, a in zip(params[name], arrays):
                    t.copy_(torch.from_numpy(np.ascontiguousarray(a, np.float32)).reshape(t.shape))
        return net(x)


def assert_exact(net_param, policy, *, seed=0, absorb=False, batch=2, expect_removed=True):
    blobs = random_blobs(net_param, seed)
    result = prune_net(net_param, blobs, policy, absorb_bias=absorb)
    if expect_removed:
        assert result.report.removed > 0, "the test should remove something"
    graph = result.analysis.graph
    shape = graph.shapes[graph.inputs[0]]
    x = torch.from_numpy(np.random.default_rng(seed + 1).normal(0, 1, (batch,) + tuple(shape[1:])).astype(np.float32))
    want = forward(net_param, result.masked_original(), x)
    got = forward(result.net, result.blobs, x)
    assert list(want) == list(got)
    for key in want:
        scale = max(1.0, float(want[key].abs().max()))
        err = float((want[key] - got[key]).abs().max())
        assert err <= 1e-5 * scale, f"{key}: max error {err:g} at scale {scale:g}"
    return result


def conv(name, bottom, n, k=3, pad=None, group=1, bias=False, stride=1, top=None):
    pad = (k - 1) // 2 if pad is None else pad
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride} group: {group} '
            f'bias_term: {"true" if bias else "false"} weight_filler {{ type: "msra" }} }} }}\n')


def bn_scale(name, blob, bias=True):
    return (f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{blob}" top: "{blob}" }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{blob}" top: "{blob}" '
            f'scale_param {{ bias_term: {"true" if bias else "false"} }} }}\n')


def relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def inp(c=3, h=8, w=8, n=2):
    return f'layer {{ name: "input" type: "Input" top: "data" input_param {{ shape {{ dim: {n} dim: {c} dim: {h} ' \
           f'dim: {w} }} }} }}\n'


def ip(name, bottom, n):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "xavier" }} }} }}\n')


def cbr(name, bottom, n, **kw):
    return conv(name, bottom, n, **kw) + bn_scale(name, name) + relu(f"{name}/relu", name)


RESIDUAL = inp() + cbr("conv1", "data", 8) + conv("conv2", "conv1", 8) + bn_scale("conv2", "conv2") + """
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "conv1" top: "sum" }
layer { name: "sum/relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
""" + cbr("conv3", "pool", 6, k=1, bias=True) + ip("fc", "conv3", 5)

CONCAT_SLICE = inp() + cbr("a", "data", 6) + cbr("b", "data", 5) + """
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" slice_param { slice_point: 4 } }
""" + cbr("c", "s1", 3) + cbr("one", "s2", 1) + """
layer { name: "cat2" type: "Concat" bottom: "s2" bottom: "c" bottom: "one" bottom: "s1" top: "cat2" }
layer { name: "flat" type: "Flatten" bottom: "cat2" top: "flat" }
""" + ip("fc", "flat", 5)

GROUPED = inp(4) + cbr("conv1", "data", 8) + cbr("dw", "conv1", 8, group=8) + cbr("g2", "dw", 12, group=2) + \
    cbr("dwm", "g2", 24, group=12) + """
layer { name: "up" type: "Deconvolution" bottom: "dwm" top: "up"
        convolution_param { num_output: 6 kernel_size: 2 stride: 2 weight_filler { type: "msra" } } }
layer { name: "up/bn" type: "BatchNorm" bottom: "up" top: "up" }
layer { name: "up/scale" type: "Scale" bottom: "up" top: "up" scale_param { bias_term: true } }
layer { name: "up/prelu" type: "PReLU" bottom: "up" top: "up" }
layer { name: "pool" type: "Pooling" bottom: "up" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "pool" top: "flat" reshape_param { shape { dim: 0 dim: -1 } } }
""" + ip("fc", "flat", 3)

SHORTCUT_A = inp() + cbr("conv1", "data", 4) + """
layer { name: "sub" type: "Pooling" bottom: "conv1" top: "sub"
        pooling_param { pool: MAX kernel_size: 1 stride: 2 round_mode: FLOOR } }
layer { name: "zeros" type: "Power" bottom: "sub" top: "zeros" power_param { scale: 0 } }
layer { name: "short" type: "Concat" bottom: "sub" bottom: "zeros" top: "short" }
""" + conv("conv2", "conv1", 8, stride=2) + bn_scale("conv2", "conv2") + """
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "short" top: "sum" }
layer { name: "sum/relu" type: "ReLU" bottom: "sum" top: "sum" }
""" + cbr("conv3", "sum", 6) + """
layer { name: "gap" type: "Pooling" bottom: "conv3" top: "gap" pooling_param { pool: AVE global_pooling: true } }
""" + ip("fc", "gap", 4)

# No Scale layers: l1 ranks; the Sigmoid makes a removed channel 0.5, folded into the 1x1 convolution's bias.
SIGMOID = inp() + conv("conv1", "data", 6, bias=True) + """
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sig1" type: "Sigmoid" bottom: "conv1" top: "conv1" }
""" + conv("conv2", "conv1", 5, k=1, bias=True) + """
layer { name: "sig2" type: "Sigmoid" bottom: "conv2" top: "conv2" }
""" + conv("conv3", "conv2", 4, bias=True) + ip("fc", "conv3", 3)



def hard_sigmoid(name, x):
    """ONNX's HardSigmoid as slim imports it: Power (x / 6 + 0.5), then Clip(0, 1); f(0) = 0.5."""
    return (f'layer {{ name: "{name}/affine" type: "Power" bottom: "{x}" top: "{name}/affine" '
            f'power_param {{ scale: 0.16666667 shift: 0.5 }} }}\n'
            f'layer {{ name: "{name}/clip" type: "Clip" bottom: "{name}/affine" top: "{name}/affine" '
            f'clip_param {{ min: 0 max: 1 }} }}\n')


def hard_swish(name, x):
    """x * hardsigmoid(x): f(0) = 0, through a gate that is 0.5 on a silenced channel."""
    return hard_sigmoid(name, x) + (f'layer {{ name: "{name}" type: "Eltwise" bottom: "{x}" bottom: "{name}/affine" '
                                    f'top: "{name}" eltwise_param {{ operation: PROD }} }}\n')


def squeeze_excite(name, x, c, gate="Sigmoid"):
    """x * gate(fc2(relu(fc1(avgpool(x))))) as slim imports it: the (N, C, 1, 1) weights flattened to (N, C) and
    multiplied in by a Scale with a second bottom (axis 0)."""
    text = (f'layer {{ name: "{name}/pool" type: "Pooling" bottom: "{x}" top: "{name}/pool" '
            f'pooling_param {{ pool: AVE global_pooling: true }} }}\n'
            + conv(f"{name}/fc1", f"{name}/pool", max(c // 2, 4), k=1, bias=True) + relu(f"{name}/relu", f"{name}/fc1")
            + conv(f"{name}/fc2", f"{name}/fc1", c, k=1, bias=True))
    if gate == "Sigmoid":
        text += f'layer {{ name: "{name}/gate" type: "Sigmoid" bottom: "{name}/fc2" top: "{name}/fc2" }}\n'
        w = f"{name}/fc2"
    else:
        text += hard_sigmoid(f"{name}/gate", f"{name}/fc2")
        w = f"{name}/gate/affine"
    return text + (f'layer {{ name: "{name}/flatten" type: "Flatten" bottom: "{w}" top: "{name}/w" }}\n'
                   f'layer {{ name: "{name}" type: "Scale" bottom: "{x}" bottom: "{name}/w" top: "{name}" '
                   f'scale_param {{ axis: 0 }} }}\n')


# MobileNet-v3's pattern: conv-BN-HardSwish, squeeze-and-excitation (sigmoid and hard-sigmoid gates), padded 3x3
# convolutions after both. A silenced channel is 0 * 0.5 at each product: zero, so the padded readers take it.
HSWISH_SE = (inp() + conv("c1", "data", 8) + bn_scale("c1", "c1") + hard_swish("c1/hs", "c1")
             + squeeze_excite("se1", "c1/hs", 8)
             + conv("c2", "se1", 12, stride=2) + bn_scale("c2", "c2") + hard_swish("c2/hs", "c2")
             + squeeze_excite("se2", "c2/hs", 12, gate="HardSigmoid")
             + conv("c3", "se2", 6) + bn_scale("c3", "c3") + hard_swish("c3/hs", "c3") + """
layer { name: "gap" type: "Pooling" bottom: "c3/hs" top: "gap" pooling_param { pool: AVE global_pooling: true } }
""" + ip("fc", "gap", 4))

CASES = {"residual": RESIDUAL, "concat_slice": CONCAT_SLICE, "grouped": GROUPED, "shortcut_a": SHORTCUT_A,
         "hswish_se": HSWISH_SE}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("criterion", ["slimming", "l1"])
def test_adversarial_nets_equal_their_masked_original(name, criterion):
    net = parse_net(CASES[name], name)
    assert_exact(net, PrunePolicy(min_channels=1, percent=0.5, criterion=criterion))


@pytest.mark.parametrize("tie_rule", ["max", "mean", "sum"])
def test_tie_rules_stay_exact(tie_rule):
    assert_exact(parse_net(SHORTCUT_A), PrunePolicy(min_channels=1, percent=0.6, tie_rule=tie_rule))


def test_spec_masking_gamma_and_beta_zeroed_equals_pruned_vgg_style_chain():
    # The issue's wording: the original with the removed channels' gamma AND beta set to zero, nothing else.
    net = parse_net(inp() + cbr("conv1", "data", 8) + cbr("conv2", "conv1", 8) + ip("fc", "conv2", 4))
    blobs = random_blobs(net, 3)
    result = prune_net(net, blobs, PrunePolicy(min_channels=1, percent=0.5))
    spec = {k: [np.array(a) for a in v] for k, v in blobs.items()}
    for group in result.analysis.groups:
        for gs in group.slots:
            if gs.slot.type == "Scale":
                gone = ~result.plan.keep[gs.slot.channels]
                for arr in spec[gs.slot.layer]:
                    arr[gone] = 0
    x = torch.randn(2, 3, 8, 8)
    want, got = forward(net, spec, x), forward(result.net, result.blobs, x)
    torch.testing.assert_close(got["fc"], want["fc"], rtol=1e-5, atol=1e-6)


def test_sigmoid_constant_is_folded_into_the_next_bias():
    net = parse_net(SIGMOID)
    result = assert_exact(net, PrunePolicy(min_channels=1, percent=0.5, criterion="l1"))
    # conv1's channels reach a 1x1 convolution through a Sigmoid: removable, their 0.5 folded into conv2's bias.
    assert result.report.folded > 0 and result.report.dropped == 0
    # conv2's channels reach a padded 3x3 convolution through a Sigmoid: pinned, so conv2 keeps all 5.
    assert {c.name: c.after for c in result.report.layers}["conv2"] == 5


def test_hardswish_and_squeeze_excitation_products_keep_silenced_channels_zero():
    # HardSwish's gate and the SE weights of a silenced channel are 0.5, not 0; the products make it 0 again, so
    # nothing is pinned by the padded convolutions that read them.
    from slim.prune.constants import channel_constants

    net = parse_net(HSWISH_SE, "hswish_se")
    result = assert_exact(net, PrunePolicy(min_channels=1, percent=0.5))
    for layer in ("c1", "c2", "c3"):
        assert all(g.prunable == g.size for g in result.analysis.group_of_layer(layer)), layer
    after = {c.name: c.after for c in result.report.layers}
    assert after["c1"] < 8 and after["c2"] < 12 and after["c3"] < 6
    assert after["se1/fc2"] == after["c1"] and after["se2/fc2"] == after["c2"]
    # The constants, one value per channel, through the SE Scale whose second bottom is (N, C) against (N, C, H, W).
    values = channel_constants(result.analysis, result.plan.keep, result.masked_original())
    gone = ~result.plan.keep[result.analysis.blob_channels["se1"]]
    np.testing.assert_array_equal(values["c1/hs/affine@1"][gone], 0.5)
    np.testing.assert_array_equal(values["se1/w"][gone], 0.5)
    np.testing.assert_array_equal(values["se1"][gone], 0.0)
    assert np.isnan(values["se1"][~gone]).all()


def test_absorb_bias_through_squeeze_excitation_drops_what_the_gate_makes_uneven():
    # Only gamma zeroed: a removed channel is hardswish(beta), a constant the SE pooling hands to its 1x1 fc1 (folded),
    # but the SE weights of that channel still depend on the image, so the padded c2 reads a field (dropped).
    net = parse_net(HSWISH_SE, "hswish_se")
    result = prune_net(net, random_blobs(net), PrunePolicy(min_channels=1, percent=0.5), absorb_bias=True)
    assert result.report.folded > 0 and result.report.dropped > 0


def test_absorb_bias_folds_beta_through_relu_exactly():
    # Only gamma zeroed (what sparse training leaves): beta -> ReLU -> 1x1 conv (bias-free, then BatchNorm) and the
    # InnerProduct: the constants go into the BatchNorm mean and the InnerProduct bias.
    net = parse_net(inp() + cbr("conv1", "data", 8) + cbr("conv2", "conv1", 6, k=1, pad=0) + """
layer { name: "gap" type: "Pooling" bottom: "conv2" top: "gap" pooling_param { pool: AVE global_pooling: true } }
""" + ip("fc", "gap", 4))
    result = assert_exact(net, PrunePolicy(min_channels=1, percent=0.5), absorb=True)
    assert result.report.folded > 0 and result.report.dropped == 0
    assert result.absorb_bias
    ref = result.masked_original()
    # gamma zeroed, beta kept, for the removed channels of conv1/scale
    gone = ~result.plan.keep[result.analysis.blob_channels["conv1"]]
    assert np.all(ref["conv1/scale"][0][gone] == 0)
    np.testing.assert_array_equal(ref["conv1/scale"][1], random_blobs(net, 0)["conv1/scale"][1])


def test_absorb_bias_gives_a_bias_to_a_bias_free_reader():
    net = parse_net(inp() + cbr("conv1", "data", 8) + conv("conv2", "conv1", 6, k=1, pad=0) + ip("fc", "conv2", 4))
    result = assert_exact(net, PrunePolicy(min_channels=1, percent=0.5, protect=("conv2",)), absorb=True)
    assert result.report.biased == ["conv2"]
    layer = next(l for l in result.net.layer if l.name == "conv2")
    assert layer.convolution_param.bias_term


def test_absorb_bias_drops_what_padding_makes_inexact():
    net = parse_net(inp() + cbr("conv1", "data", 8) + cbr("conv2", "conv1", 6) + ip("fc", "conv2", 4))
    blobs = random_blobs(net)
    result = prune_net(net, blobs, PrunePolicy(min_channels=1, percent=0.5, protect=("conv2",)), absorb_bias=True)
    assert result.report.dropped > 0          # conv2 pads: beta's contribution cannot be folded exactly


def _small(path: Path, size: int):
    net = read_net(path)
    first = net.layer[0]
    assert first.type == "Input"
    first.input_param.shape[0].dim[0] = 1
    dims = first.input_param.shape[0].dim
    if dims[2] > size:
        dims[2:] = [size, size]
        for layer in net.layer:  # a fixed 7x7 average pooling becomes global at the reduced size
            p = layer.pooling_param
            if layer.type == "Pooling" and p.kernel_size == 7 and not p.global_pooling:
                p.ClearField("kernel_size")
                p.ClearField("stride")
                p.global_pooling = True
    return net


def _zoo_deploy_nets():
    found = sorted(NETS.glob("*_deploy.prototxt"))
    return [pytest.param(p, id=p.stem) for p in found]


@pytest.mark.parametrize("path", _zoo_deploy_nets() or [pytest.param(None, marks=pytest.mark.skip(
    reason="nets/ has no *_deploy.prototxt files (generate them with python tools/zoo.py)"))])
def test_every_zoo_net_equals_its_masked_original(path):
    net = _small(path, 64 if "vgg" not in path.stem else 32)
    has_scale = any(l.type == "Scale" for l in net.layer)
    assert_exact(net, PrunePolicy(min_channels=1, percent=0.5, criterion="slimming" if has_scale else "l1"), batch=1)


def test_real_caffe_sigmoid_net_is_pruned_exactly_with_its_constants_folded():
    path = TESTNETS / "examples__cifar10__cifar10_full_sigmoid_train_test_bn.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared Caffe test nets are not beside this checkout)")
    net = make_deploy(read_net(path), input_shapes={"data": (3, 32, 32)})
    result = assert_exact(net, PrunePolicy(min_channels=1, percent=0.5, criterion="l1"))
    # Only conv3 may lose channels (conv1 and conv2 feed padded convolutions through a Sigmoid); the Sigmoid of a
    # silenced conv3 channel, averaged by pool3, reaches ip1 as a constant that goes into ip1's bias.
    after = {c.name: c.after for c in result.report.layers}
    assert after["conv1"] == 32 and after["conv2"] == 32 and after["conv3"] < 64
    assert result.report.folded == 64 - after["conv3"] and result.report.dropped == 0


# --- Streaming: write_pruned computes the cut blobs block by block into reused buffers; the file must hold exactly
# what the materialised blobs hold.

STREAM_CASES = {**CASES, "sigmoid": SIGMOID}


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("name", sorted(STREAM_CASES))
def test_streamed_caffemodel_is_byte_identical_to_the_materialised_blobs(name, absorb, tmp_path, monkeypatch):
    import slim.prune.rewrite as rewrite
    from slim.io import read_caffemodel, write_caffemodel
    from slim.prune import write_pruned

    monkeypatch.setattr(rewrite, "_BLOCK_BYTES", 40)  # many blocks per blob, a partial one at the end
    net = parse_net(STREAM_CASES[name], name)
    blobs = random_blobs(net, 5)
    criterion = "l1" if name == "sigmoid" else "slimming"
    streamed = prune_net(net, blobs, PrunePolicy(min_channels=1, percent=0.5, criterion=criterion), absorb_bias=absorb)
    paths = write_pruned(streamed, tmp_path / "s")
    assert not streamed.blobs._read, "writing must not have computed and kept the pruned blobs"
    whole = prune_net(net, blobs, PrunePolicy(min_channels=1, percent=0.5, criterion=criterion), absorb_bias=absorb)
    write_caffemodel(tmp_path / "m.caffemodel", whole.net, dict(whole.blobs.items()))
    assert paths["caffemodel"].read_bytes() == (tmp_path / "m.caffemodel").read_bytes()
    model = read_caffemodel(paths["caffemodel"])
    assert {layer.name for layer in model.layers if layer.blobs} == set(whole.blobs)
    for layer in filter(lambda layer: layer.blobs, model.layers):
        assert len(layer.blobs) == len(whole.blobs[layer.name])
        for got, want in zip(layer.blobs, whole.blobs[layer.name]):
            np.testing.assert_array_equal(got, np.asarray(want).reshape(got.shape))


def test_pruned_blobs_reads_as_a_dict_and_keeps_changes(tmp_path):
    from slim.io import read_caffemodel
    from slim.prune import PrunedBlobs, write_pruned

    net = parse_net(RESIDUAL)
    result = prune_net(net, random_blobs(net), PrunePolicy(min_channels=1, percent=0.5))
    blobs = result.blobs
    assert isinstance(blobs, PrunedBlobs)
    assert "conv3" in blobs and "nope" not in blobs and not blobs._read   # membership computes nothing
    assert blobs.shapes("conv3") == [a.shape for a in blobs["conv3"]]
    assert blobs["conv3"] is blobs["conv3"]                               # computed once, the same list after
    blobs["conv3"][1] = np.full(blobs["conv3"][1].shape, 7, np.float32)   # a change made to it is written
    blobs["extra"] = [np.ones(1, np.float32)]
    assert list(blobs)[-1] == "extra" and len(blobs) == len(list(blobs))
    del blobs["extra"]
    with pytest.raises(KeyError):
        blobs["nope"]
    write_pruned(result, tmp_path / "p")
    stored = read_caffemodel(tmp_path / "p.caffemodel").blobs_by_name()
    np.testing.assert_array_equal(stored["conv3"].blobs[1], 7)



def test_streamed_transplant_from_a_mapped_caffemodel_with_unaligned_blobs(tmp_path, monkeypatch):
    # Blob data in a .caffemodel starts at any byte, so the mapped arrays are often unaligned (numpy's slow paths);
    # the rows are gathered by runs of consecutive indices. Same bytes as from in-memory arrays.
    import slim.prune.rewrite as rewrite
    from slim.io import read_caffemodel, write_caffemodel
    from slim.prune import write_pruned

    monkeypatch.setattr(rewrite, "_BLOCK_BYTES", 100)
    net = parse_net(GROUPED, "grouped")
    blobs = random_blobs(net, 9)
    write_caffemodel(tmp_path / "w.caffemodel", net, blobs)
    mapped = read_caffemodel(tmp_path / "w.caffemodel")
    assert not all(b.flags.aligned for layer in mapped.layers for b in layer.blobs)
    policy = PrunePolicy(min_channels=1, percent=0.5)
    write_pruned(prune_net(net, mapped, policy), tmp_path / "from_file")
    write_pruned(prune_net(net, blobs, policy), tmp_path / "from_memory")
    assert (tmp_path / "from_file.caffemodel").read_bytes() == (tmp_path / "from_memory.caffemodel").read_bytes()
    whole = prune_net(net, mapped, policy).blobs                          # read, not streamed: indexing path
    again = prune_net(net, blobs, policy).blobs
    for name in whole:
        for a, b in zip(whole[name], again[name]):
            np.testing.assert_array_equal(a, b)
