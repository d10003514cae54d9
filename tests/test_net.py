"""slim.net.Net: outputs, losses, inputs, weights by layer name, sharing, learnable params, phases (REFERENCE §3.1)."""

import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.errors import NetError, WeightsError
from slim.io import parse_net, read_caffemodel, write_caffemodel
from slim.net import Net

CONV_BN = """
name: "convbn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
"""


def make(text=CONV_BN, **kw):
    kw.setdefault("seed", 0)
    return Net(parse_net(text), **kw)


def randomise(net, seed=1):
    """Fill every blob with random values (BatchNorm's scale factor positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, ts in net.params.items():
            for t in ts:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def x_for(net, seed=2, batch=None):
    shape = list(net.graph.shapes[net.inputs[0]])
    if batch is not None:
        shape[0] = batch
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# outputs and losses


def test_outputs_in_alphabetical_order():
    net = make("""
        layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "z" type: "ReLU" bottom: "data" top: "zeta" }
        layer { name: "a" type: "Sigmoid" bottom: "zeta" top: "alpha" }
        layer { name: "m" type: "TanH" bottom: "zeta" top: "mid" }
        layer { name: "b" type: "AbsVal" bottom: "mid" top: "mid" }
    """)
    # zeta is consumed; the in-place chain ends in mid; label is an unconsumed Input top (also an output).
    assert net.outputs == ["alpha", "label", "mid"]
    out = net(data=torch.randn(2, 3), label=torch.zeros(2, 3))
    assert list(out) == ["alpha", "label", "mid"]
    assert out.loss is None
    blobs = net(data=torch.randn(2, 3), label=torch.zeros(2, 3), return_blobs=True)
    assert {"data", "label", "zeta", "alpha", "mid"} == set(blobs)


# ----------------------------------------------------------------------------------------------------------------
# memory: blobs dropped after their last reader


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages that ops create while the mode is on and that are still referenced (views once)."""

    def __init__(self):
        super().__init__()
        self.refs, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.refs.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.refs = {k: (r, n) for k, (r, n) in self.refs.items() if not r.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def chain_net(n=12, in_place_relu=False):
    layers = ['layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }']
    x = "data"
    for i in range(n):
        layers.append(f'layer {{ name: "c{i}" type: "Convolution" bottom: "{x}" top: "c{i}" convolution_param {{ '
                      f'num_output: 4 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}')
        top = f"c{i}" if in_place_relu else f"r{i}"
        layers.append(f'layer {{ name: "r{i}" type: "ReLU" bottom: "c{i}" top: "{top}" }}')
        x = top
    return make("\n".join(layers))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_keeps_only_live_blobs(in_place, grad):
    # A chain of 12 conv + ReLU holds a layer's input and output at once (a forward that kept every blob: 24);
    # under autograd also what autograd saves: each conv's input and the last ReLU's output (13).
    net = chain_net(in_place_relu=in_place)
    x = x_for(net)
    blob = x.numel() * 4
    with torch.set_grad_enabled(grad), LiveBytes() as live:
        out = net(x)
    bound = (3 if not grad else 14) * blob
    assert live.peak <= bound, (live.peak / blob)
    full = net(x, return_blobs=True)
    torch.testing.assert_close(out[net.outputs[0]], full[net.outputs[0]], rtol=0, atol=0)


def test_return_blobs_names_are_kept_and_equal_the_full_forward():
    net = chain_net()
    x = x_for(net)
    full = net(x, return_blobs=True)
    out = net(x, return_blobs=["c3", "r5"])
    assert list(out) == net.outputs + ["c3", "r5"]
    for name in out:
        torch.testing.assert_close(out[name], full[name], rtol=0, atol=0)
    assert list(net(x, return_blobs="c0")) == net.outputs + ["c0"]
    with pytest.raises(NetError, match="'nope'"):
        net(x, return_blobs=["nope"])


def test_freeing_keeps_in_place_chains_and_fan_out():
    # conv1 is rewritten in place (BN, Scale, ReLU) and read by two layers after that; every output as before.
    net = make(CONV_BN.replace('layer { name: "fc"', 'layer { name: "side" type: "TanH" bottom: "conv1" top: "side" }\n'
                               'layer { name: "fc"'))
    randomise(net)
    x = x_for(net)
    full = net(x, return_blobs=True)
    out = net(x)
    assert list(out) == ["fc", "side"]
    for name in out:
        torch.testing.assert_close(out[name], full[name], rtol=0, atol=0)
    torch.testing.assert_close(net(x, return_blobs=["conv1"])["conv1"], full["conv1"], rtol=0, atol=0)


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


ALIASES = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "r0" type: "ReLU" bottom: "data" top: "data" }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "split" type: "Split" bottom: "c" top: "a" top: "b" }
layer { name: "ra" type: "ReLU" bottom: "a" top: "a" }
layer { name: "flat" type: "Flatten" bottom: "b" top: "flat" }
layer { name: "rb" type: "ReLU" bottom: "b" top: "b" }
layer { name: "d" type: "Convolution" bottom: "data" top: "d"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "rd" type: "ReLU" bottom: "d" top: "d" relu_param { negative_slope: 0.1 } }
layer { name: "k" type: "DummyData" top: "k" dummy_data_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 }
        data_filler { type: "constant" value: -1 } } }
layer { name: "rk" type: "ReLU" bottom: "k" top: "k" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" bottom: "d" bottom: "k" top: "sum" }
"""


def test_inference_overwrites_only_blobs_nothing_else_holds():
    # Under no_grad an in-place ReLU overwrites its bottom (as inplace=True in a hand-written model) unless the memory
    # is the caller's input, a Split's shared top, a tensor a view reads (Flatten) or a data layer's cached constant.
    net = make(ALIASES)
    x = x_for(net)
    given = x.clone()
    want = net(x)                                   # autograd on: nothing is overwritten
    assert not torch.equal(want["flat"], torch.relu(want["flat"]))
    with torch.no_grad(), OpNames() as ops:
        got = net(x)
    assert torch.equal(x, given)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert ops.names.count("leaky_relu_.default") == 1 and "relu_.default" not in ops.names
    with torch.no_grad():
        again = net(x)
    torch.testing.assert_close(again["sum"], want["sum"], rtol=0, atol=0)   # DummyData's constant intact


@pytest.mark.parametrize("text", [CONV_BN, None])
def test_inference_relu_in_place_equals_autograd_forward(text):
    net = make(text) if text else chain_net(in_place_relu=True)
    randomise(net) if text else None
    x = x_for(net)
    want = net(x)
    with torch.no_grad(), OpNames() as ops:
        got = net(x)
    assert "relu_.default" in ops.names and "relu.default" not in ops.names
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


LOSS_NET = """
layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" top: "prob"
        loss_weight: 1 loss_weight: 0 }
layer { name: "act" type: "TanH" bottom: "data" top: "act" loss_weight: 0.25 }
layer { name: "euc" type: "EuclideanLoss" bottom: "fc" bottom: "fc2" top: "euc" loss_weight: 3 }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }
"""


def test_loss_is_the_weighted_sum_of_loss_tops():
    text = LOSS_NET.replace('layer { name: "euc"', 'layer { name: "fc2" type: "Power" bottom: "fc" top: "fc2" '
                            'power_param { scale: 0.5 } }\nlayer { name: "euc"')
    net = make(text)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([0.0, 2.0, 1.0, 2.0])
    out = net(data=x, label=label)
    assert list(out) == ["acc", "act", "euc", "loss", "prob"]
    fc = x @ net.params["fc"][0].detach().T + net.params["fc"][1].detach()
    ce = torch.nn.functional.cross_entropy(fc, label.long())
    euc = ((fc - 0.5 * fc) ** 2).sum() / (2 * 4)
    want = ce + 0.25 * torch.tanh(x).sum() + 3 * euc  # prob has weight 0, Accuracy 0 by default
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["prob"], torch.softmax(fc, 1), rtol=1e-5, atol=1e-6)
    node = net.graph.layer("loss")
    assert node.loss_weights == [1.0, 0.0]
    assert net.graph.layer("acc").loss_weights == [0.0]


def test_loss_weight_count_must_match_tops():
    with pytest.raises(NetError, match="loss_weight"):
        make(LOSS_NET.replace("loss_weight: 1 loss_weight: 0", "loss_weight: 1 loss_weight: 0 loss_weight: 2"))


def test_loss_gradient_scales_with_loss_weight():
    base = """
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" %s
                inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    """
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    grads = []
    for weight in ("loss_weight: 1", "loss_weight: 2.5"):
        net = make(base % weight)
        net(data=x).loss.backward()
        grads.append(net.params["fc"][0].grad.clone())
    torch.testing.assert_close(grads[1], 2.5 * grads[0])


# ----------------------------------------------------------------------------------------------------------------
# inputs


def test_inputs_by_name_and_position():
    net = make()
    randomise(net)
    x = x_for(net)
    a, b = net(data=x), net(x)
    torch.testing.assert_close(a["fc"], b["fc"], rtol=0, atol=0)
    c = net(x.numpy())  # arrays are accepted too
    torch.testing.assert_close(a["fc"], c["fc"], rtol=0, atol=0)
    assert net(x_for(net, batch=5))["fc"].shape == (5, 5)  # any batch size


def test_input_errors():
    net = make()
    with pytest.raises(NetError, match=r"input 'data' has shape \(2, 3, 5, 6\), the net expects \(2, 3, 6, 6\)"):
        net(data=torch.zeros(2, 3, 5, 6))
    with pytest.raises(NetError, match="'data' was not given"):
        net()
    with pytest.raises(NetError, match="image is not an input of the net; its inputs are data"):
        net(image=torch.zeros(2, 3, 6, 6))
    with pytest.raises(NetError, match="2 positional inputs given, the net has 1"):
        net(torch.zeros(2, 3, 6, 6), torch.zeros(2, 3, 6, 6))


# ----------------------------------------------------------------------------------------------------------------
# weights


def test_save_load_round_trip_is_bit_exact(tmp_path):
    a = make(seed=1)
    randomise(a, seed=3)
    path = tmp_path / "a.caffemodel"
    a.save(path)
    stored = read_caffemodel(path)
    assert [l.name for l in stored.layers] == [n.name for n in a.graph.layers]
    b = make(seed=2)
    loaded = b.load_weights(path)
    assert loaded == ["conv1", "bn1", "scale1", "fc"]
    for name, ts in a.params.items():
        for i, t in enumerate(ts):
            assert torch.equal(t, b.params[name][i]), (name, i)
    x = x_for(a)
    assert torch.equal(a(data=x)["fc"], b(data=x)["fc"])
    c = Net(parse_net(CONV_BN), weights=str(path))  # the constructor's weights= argument
    assert torch.equal(c(data=x)["fc"], a(data=x)["fc"])


def test_round_trip_of_scalar_blobs(tmp_path):
    text = """
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
        layer { name: "prelu" type: "PReLU" bottom: "data" top: "p" prelu_param { channel_shared: true } }
        layer { name: "scale" type: "Scale" bottom: "p" top: "s" scale_param { num_axes: 0 bias_term: true } }
    """
    a = make(text)
    randomise(a)
    assert [tuple(t.shape) for t in a.params["prelu"] + a.params["scale"]] == [(), (), ()]
    a.save(tmp_path / "s.caffemodel")
    b = make(text, seed=5)
    b.load_weights(tmp_path / "s.caffemodel")
    for name in ("prelu", "scale"):
        for x, y in zip(a.params[name], b.params[name]):
            assert torch.equal(x, y)


def test_load_ignores_source_layers_not_in_the_net(tmp_path):
    a = make(seed=1)
    randomise(a)
    extra = parse_net(CONV_BN + """
        layer { name: "fc_old" type: "InnerProduct" bottom: "pool1" top: "fc_old"
                inner_product_param { num_output: 7 } }
    """)
    blobs = {name: [t.detach().numpy() for t in ts] for name, ts in a.params.items()}
    blobs["fc_old"] = [np.ones((7, 36), np.float32), np.ones(7, np.float32)]
    path = tmp_path / "extra.caffemodel"
    write_caffemodel(path, extra, blobs)
    b = make(seed=2)
    assert b.load_weights(path) == ["conv1", "bn1", "scale1", "fc"]
    assert torch.equal(b.params["fc"][0], a.params["fc"][0])


def test_weights_of_another_net_are_refused_not_silently_ignored(tmp_path):
    # A caffemodel whose layer names match none of the net's: loading it would leave every blob at its filler.
    other = make("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
        layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 3 } }
    """)
    path = tmp_path / "other.caffemodel"
    other.save(path)
    net = make()
    before = [t.clone() for ts in net.params.values() for t in ts]
    with pytest.raises(WeightsError) as info:
        net.load_weights(path)
    message = str(info.value)
    for words in (str(path), "no weights for any layer", "conv1", "ip1", "another net"):
        assert words in message, message
    assert all(torch.equal(a, b) for a, b in zip(before, (t for ts in net.params.values() for t in ts)))
    with pytest.raises(WeightsError, match="no weights for any layer"):
        Net(parse_net(CONV_BN), weights=str(path))


def test_partial_weights_log_ignored_layers_and_layers_left_at_fillers(tmp_path, caplog):
    a = make(seed=1)
    randomise(a)
    renamed = parse_net(CONV_BN.replace('name: "fc"', 'name: "fc_old"'))
    blobs = {("fc_old" if name == "fc" else name): [t.detach().numpy() for t in ts] for name, ts in a.params.items()}
    path = tmp_path / "renamed.caffemodel"
    write_caffemodel(path, renamed, blobs)
    b = make(seed=2)
    with caplog.at_level("INFO", logger="slim.net"):
        assert b.load_weights(path) == ["conv1", "bn1", "scale1"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "Ignoring source layer fc_old" in infos
    assert len(warnings_) == 1 and "1 of the net's 4 layers" in warnings_[0] and warnings_[0].endswith(": fc")


def test_a_source_layer_with_blobs_for_a_net_layer_without_any_is_a_mismatch(tmp_path):
    text = CONV_BN.replace('name: "relu1"', 'name: "fc_twin"')
    path = _model_with(tmp_path, "fc_twin", [np.zeros((5, 36), np.float32), np.zeros(5, np.float32)])
    with pytest.raises(WeightsError, match="'fc_twin' has 2 blobs, the net's layer \\(ReLU\\) has none"):
        make(text).load_weights(path)


def _model_with(tmp_path, name, blobs):
    net = pb.NetParameter()
    layer = net.layer.add()
    layer.name, layer.type = name, "InnerProduct"
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, net, {name: blobs})
    return path


def test_load_weights_shape_mismatch_names_everything(tmp_path):
    net = make()
    path = _model_with(tmp_path, "fc", [np.zeros((5, 40), np.float32), np.zeros(5, np.float32)])
    with pytest.raises(WeightsError) as info:
        net.load_weights(path)
    message = str(info.value)
    for words in ("'fc'", "blob 0", "(5, 40)", "(5, 36)", "Rename the layer", str(path)):
        assert words in message, message
    path = _model_with(tmp_path, "fc", [np.zeros((5, 36), np.float32), np.zeros(6, np.float32)])
    with pytest.raises(WeightsError, match=r"blob 1 has shape \(6,\), the net expects \(5,\)"):
        net.load_weights(path)


def test_load_weights_blob_count_mismatch(tmp_path):
    net = make()
    path = _model_with(tmp_path, "fc", [np.zeros((5, 36), np.float32)])
    with pytest.raises(WeightsError) as info:
        net.load_weights(path)
    message = str(info.value)
    for words in ("'fc'", "1 blobs", "expects 2", "rename it"):
        assert words in message, message


def test_legacy_4d_blobs_load_into_inner_product(tmp_path):
    # Old caffemodels store an IP weight N x K as num 1, channels 1, height N, width K (and the bias as 1x1x1xN).
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 36)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    net_param = pb.NetParameter()
    layer = net_param.layer.add()
    layer.name, layer.type = "fc", "InnerProduct"
    for arr, dims in ((w, (1, 1, 5, 36)), (b, (1, 1, 1, 5))):
        blob = layer.blobs.add()
        blob.num, blob.channels, blob.height, blob.width = dims
        blob.data.extend(arr.ravel().tolist())
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(net_param.SerializeToString())
    net = make()
    assert net.load_weights(path) == ["fc"]
    assert torch.equal(net.params["fc"][0], torch.from_numpy(w))
    assert torch.equal(net.params["fc"][1], torch.from_numpy(b))
    # A legacy shape that does not pad to the target still fails.
    blob = net_param.layer[0].blobs[0]
    blob.height, blob.width = 36, 5
    path.write_bytes(net_param.SerializeToString())
    with pytest.raises(WeightsError, match=r"blob 0 has shape \(1, 1, 36, 5\), the net expects \(5, 36\)"):
        net.load_weights(path)


# ----------------------------------------------------------------------------------------------------------------
# sharing


def test_share_from_shares_storage_including_bn_stats():
    train = make(phase="TRAIN", seed=1)
    test = make(phase="TEST", seed=2)
    test.share_from(train)
    for name, ts in train.params.items():
        for a, b in zip(ts, test.params[name]):
            assert a is b
    x = x_for(train)
    before = train.params["bn1"][2].item()
    train(data=x)  # a TRAIN forward updates the running sums, which the test net sees
    assert test.params["bn1"][2].item() == pytest.approx(0.999 * before + 1)
    with torch.no_grad():
        train.params["fc"][0].mul_(2)
    assert torch.equal(test.params["fc"][0], train.params["fc"][0])
    ref = make(phase="TEST", seed=9)
    with torch.no_grad():
        for name, ts in train.params.items():
            for a, b in zip(ts, ref.params[name]):
                b.copy_(a)
    assert torch.equal(test(data=x)["fc"], ref(data=x)["fc"])


def test_share_from_shape_mismatch():
    a = make()
    b = make(CONV_BN.replace("num_output: 5", "num_output: 6"))
    with pytest.raises(WeightsError, match="'fc'"):
        b.share_from(a)


SHARED = """
layer { name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 4 } } }
layer { name: "fa" type: "InnerProduct" bottom: "a" top: "fa"
        param { name: "w" lr_mult: 2 decay_mult: 0.5 } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "fb" type: "InnerProduct" bottom: "b" top: "fb" param { name: "w" } param { name: "bias" }
        inner_product_param { num_output: 3 weight_filler { type: "constant" value: 7 } } }
"""


def test_params_shared_by_name_are_one_parameter_and_gradients_sum():
    net = make(SHARED)
    assert net.params["fa"][0] is net.params["fb"][0]
    assert net.params["fa"][1] is net.params["fb"][1]
    assert [(p.layer, p.index) for p in net.learnable_params] == [("fa", 0), ("fa", 1)]
    assert net.learnable_params[0].lr_mult == 2 and net.learnable_params[0].decay_mult == 0.5
    assert len(list(net.parameters())) == 2
    a = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    out = net(a=a, b=b)
    (out["fa"].sum() + 2 * out["fb"].sum()).backward()
    w = net.params["fa"][0]
    torch.testing.assert_close(w.grad, (a.sum(0) + 2 * b.sum(0)).expand(3, 4))
    torch.testing.assert_close(net.params["fa"][1].grad, torch.full((3,), 2.0 + 4.0))


def test_shared_param_strict_shape_mismatch():
    two_shapes = 'input_param { shape { dim: 2 dim: 4 } shape { dim: 2 dim: %s } }'
    net = make(SHARED.replace('input_param { shape { dim: 2 dim: 4 } }', two_shapes % "2 dim: 2"))
    assert net.params["fa"][0] is net.params["fb"][0]  # b flattens to K = 4: the same (3, 4) weight
    with pytest.raises(NetError) as info:
        make(SHARED.replace('input_param { shape { dim: 2 dim: 4 } }', two_shapes % "5"))
    message = str(info.value)
    for words in ("'fb'", "'w'", "'fa'", "shape", "(3, 5)", "(3, 4)"):
        assert words in message, message


def test_shared_param_permissive_counts():
    text = """
        layer { name: "in" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 dim: 6 } shape { dim: 2 dim: 3 } } }
        layer { name: "fa" type: "InnerProduct" bottom: "a" top: "fa" param { name: "w" }
                inner_product_param { num_output: 3 bias_term: false weight_filler { type: "gaussian" } } }
        layer { name: "fb" type: "InnerProduct" bottom: "b" top: "fb" param { name: "w" share_mode: PERMISSIVE }
                inner_product_param { num_output: 6 bias_term: false } }
    """
    net = make(text)
    a, b = torch.randn(2, 6), torch.randn(2, 3)
    out = net(a=a, b=b)
    w = net.params["fa"][0].detach()
    # Caffe's PERMISSIVE sharing keeps each layer's own shape over the same data.
    torch.testing.assert_close(out["fb"], b @ w.reshape(6, 3).T)
    assert net.params["fb"][0].shape == (6, 3)
    out["fb"].sum().backward()  # the gradient reaches the owner's (3, 6) blob through the sharer's view
    torch.testing.assert_close(net.params["fa"][0].grad, b.sum(0).expand(6, 3).reshape(3, 6))
    bad = text.replace("num_output: 6", "num_output: 5")
    with pytest.raises(NetError, match="element count"):
        make(bad)


# ----------------------------------------------------------------------------------------------------------------
# learnable params and multipliers


def test_learnable_params_order_and_multipliers():
    text = CONV_BN.replace('top: "conv1"\n        convolution_param', 'top: "conv1" param { lr_mult: 1 decay_mult: 1 } '
                           'param { lr_mult: 2 decay_mult: 0 }\n        convolution_param')
    net = make(text)
    got = [(p.layer, p.index, p.lr_mult, p.decay_mult) for p in net.learnable_params]
    assert got == [("conv1", 0, 1, 1), ("conv1", 1, 2, 0), ("bn1", 0, 0, 0), ("bn1", 1, 0, 0), ("bn1", 2, 0, 0),
                   ("scale1", 0, 1, 1), ("scale1", 1, 1, 1), ("fc", 0, 1, 1), ("fc", 1, 1, 1)]
    for p in net.learnable_params:
        assert p.tensor.requires_grad == (p.layer != "bn1")
    assert net.graph.param_count == 4 * 27 + 4 + 8 + 5 * 36 + 5


def test_batchnorm_lr_mult_rules():
    old_style = CONV_BN.replace('layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }',
                                'layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" '
                                'param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } }')
    assert all(p.lr_mult == 0 for p in make(old_style).learnable_params if p.layer == "bn1")
    bad = old_style.replace("param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }",
                            "param { lr_mult: 0 } param { lr_mult: 1 }")
    with pytest.raises(NetError) as info:
        make(bad)
    message = str(info.value)
    for words in ("'bn1'", "blob 1", "lr_mult 0", "found 1"):
        assert words in message, message


def test_scaling_factors_are_scales_after_batchnorm():
    text = CONV_BN + """
        layer { name: "scale_free" type: "Scale" bottom: "fc" top: "fc2" }
        layer { name: "bn2" type: "BatchNorm" bottom: "fc2" top: "bn2" }
        layer { name: "scale2" type: "Scale" bottom: "bn2" top: "s2" scale_param { bias_term: true } }
        layer { name: "two" type: "Scale" bottom: "bn2" bottom: "bn2" top: "s3" scale_param { axis: 0 } }
    """
    net = make(text)
    sf = net.scaling_factors()
    assert list(sf) == ["scale1", "scale2"]
    assert sf["scale1"] is net.params["scale1"][0] and sf["scale2"] is net.params["scale2"][0]


# ----------------------------------------------------------------------------------------------------------------
# phases


PHASED = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 64 dim: 32 } } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "d" dropout_param { dropout_ratio: 0.5 } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" }
layer { name: "train_only" type: "AbsVal" bottom: "data" top: "t" include { phase: TRAIN } }
"""


def test_phase_decides_dropout_and_batchnorm():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    test = make(PHASED, phase="TEST")
    out = test(data=x)
    assert "t" not in out
    assert torch.equal(out["d"], x)
    torch.testing.assert_close(out["b"], x / np.sqrt(1e-5))  # s == 0: zero mean and variance
    assert test.params["bn"][2].item() == 0

    train = make(PHASED, phase="TRAIN")
    torch.manual_seed(0)
    out = train(data=x)
    assert torch.equal(out["t"], x.abs())
    assert 0.4 < (out["d"] == 0).float().mean() < 0.6
    torch.testing.assert_close(out["b"], (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5),
                               rtol=1e-4, atol=1e-5)
    assert train.params["bn"][2].item() == 1


def test_a_layer_phase_overrides_the_net_phase():
    text = PHASED.replace('dropout_param { dropout_ratio: 0.5 }', 'dropout_param { dropout_ratio: 0.5 } phase: TEST')
    text = text.replace('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" }',
                        'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "b" phase: TEST }')
    net = make(text, phase="TRAIN")
    x = torch.randn(64, 32)
    out = net(data=x)
    assert torch.equal(out["d"], x)
    assert net.params["bn"][2].item() == 0
    net = make(PHASED.replace('dropout_param { dropout_ratio: 0.5 }', 'dropout_param { dropout_ratio: 0.5 } '
                                                                       'phase: TRAIN'), phase="TEST")
    torch.manual_seed(1)
    assert (net(data=x)["d"] == 0).any()
