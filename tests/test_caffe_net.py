"""slim.caffe.Net: pycaffe's net interface, checked against slim's own Net and hand computations.

Equivalence is the backbone: what the pycaffe view computes (blob data after forward, blob and parameter diffs after
backward) equals what slim.Net computes with torch autograd on the same weights; the partial runs (start/end) and the
diff semantics (Caffe's need-backward rules, in-place blobs, fan-out sums, accumulation) are checked on tiny nets by
hand.
"""

import sys

import numpy as np
import pytest
import torch

import slim
import slim.caffe as caffe
from slim.caffe._mode import MIRRORS
from slim.errors import NetError, SlimError, WeightsError
from slim.io import read_caffemodel

CONV_NET = """
name: "tiny"
%s
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "uniform" min: -0.2 max: 0.2 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2a" type: "Convolution" bottom: "conv1" top: "conv2a"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "conv2b" type: "Convolution" bottom: "conv1" top: "conv2b"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "sum" type: "Eltwise" bottom: "conv2a" bottom: "conv2b" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
"""

LINEAR_NET = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "gaussian" std: 1 } } }
"""


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def conv_net(tmp_path, force_backward=False):
    path = write(tmp_path, CONV_NET % ("force_backward: true" if force_backward else ""))
    torch.manual_seed(0)
    net = caffe.Net(path, caffe.TEST)
    rng = np.random.default_rng(1)
    mean, var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    bn = net.params["bn1"]
    bn[0].data[...], bn[1].data[...], bn[2].data[...] = mean * 2, var * 2, 2.0    # Caffe stores them times s
    return path, net


def inputs(seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, 3, 6, 6)).astype(np.float32), np.array([0.0, 2.0], np.float32)


def reference(path, weights, x, y):
    """slim's own Net (BatchNorm fused with Scale) on the same weights: every blob's first version, the loss and
    autograd's gradients of the loss w.r.t. those blobs, the input and the parameters."""
    ref = slim.Net(path, phase="TEST", weights=weights)
    xt = torch.tensor(x, requires_grad=True)
    first = {}

    def visit(node, values):
        for t in node.tops:
            first.setdefault(t, values[t])

    values = ref.run_layers({"data": xt, "label": torch.tensor(y)}, visit=visit)
    loss = values["loss"] * 2
    names = ["conv1", "conv2a", "conv2b", "sum", "pool", "ip"]
    params = [(name, i, t) for name, ts in ref.params.items() for i, t in enumerate(ts) if t.requires_grad]
    grads = torch.autograd.grad(loss, [first[n] for n in names] + [xt] + [t for _, _, t in params])
    blob_grads = dict(zip(names + ["data"], grads))
    param_grads = {(name, i): g for (name, i, _), g in zip(params, grads[len(names) + 1:])}
    return values, loss, blob_grads, param_grads


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b.detach() if torch.is_tensor(b) else b), rtol=tol,
                               atol=tol)


# ----- construction and structure ------------------------------------------------------------------------------------
def test_structure_follows_caffe(tmp_path):
    _, net = conv_net(tmp_path)
    assert list(net.blobs) == ["data", "label", "conv1", "conv2a", "conv2b", "sum", "pool", "ip", "loss", "acc"]
    assert net.inputs == ["data", "label"] and net.outputs == ["acc", "loss"]
    assert list(net.params) == ["conv1", "bn1", "scale1", "conv2a", "conv2b", "ip"]
    assert [b.shape for b in net.params["conv1"]] == [(4, 3, 3, 3), (4,)]
    assert net._layer_names == [layer.name for layer in net.layers] == list(net.layer_dict)
    assert net.layer_dict["bn1"].type == "BatchNorm" and len(net.layer_dict["bn1"].blobs) == 3
    assert net.top_names["relu1"] == ["conv1"] and net.bottom_names["sum"] == ["conv2a", "conv2b"]
    assert net.blob_loss_weights["loss"] == 2 and net.blob_loss_weights["ip"] == 0
    blob = net.blobs["data"]
    assert (blob.shape, blob.count, blob.num, blob.channels, blob.height, blob.width) == ((2, 3, 6, 6), 216, 2, 3, 6, 6)
    assert (net.blobs["ip"].height, net.blobs["loss"].num) == (1, 1)       # Caffe's LegacyShape pads with 1
    assert net.blobs["data"].data.dtype == np.float32 and net.blobs["loss"].data.shape == ()
    assert isinstance(net.slim_net, slim.Net)


def test_constructor_forms(tmp_path):
    path = write(tmp_path, LINEAR_NET)
    torch.manual_seed(0)
    caffe.Net(path, caffe.TEST).save(str(tmp_path / "w.caffemodel"))
    weights = str(tmp_path / "w.caffemodel")
    want = read_caffemodel(weights).blobs_by_name()["ip2"].blobs[0]
    for net in (caffe.Net(path, weights, caffe.TEST), caffe.Net(path, caffe.TEST, weights=weights),
                caffe.Net(path, phase=caffe.TEST, weights=weights)):
        np.testing.assert_array_equal(net.params["ip2"][0].data, want)
    with pytest.raises(NetError, match="no phase given"):
        caffe.Net(path)
    with pytest.raises(NetError, match="given both positionally and by keyword"):
        caffe.Net(path, caffe.TEST, phase=caffe.TRAIN)


def test_level_and_stages_choose_layers(tmp_path):
    text = LINEAR_NET + """
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" include { stage: "deploy" } }
layer { name: "sig" type: "Sigmoid" bottom: "ip2" top: "sig" include { min_level: 2 } }
"""
    path = write(tmp_path, text)
    assert caffe.Net(path, caffe.TEST).outputs == ["ip2"]
    assert caffe.Net(path, caffe.TEST, stages=["deploy"]).outputs == ["prob"]
    assert caffe.Net(path, caffe.TEST, level=2).outputs == ["sig"]


def test_python_layer_is_refused(tmp_path):
    path = write(tmp_path, LINEAR_NET + 'layer { name: "py" type: "Python" bottom: "ip2" top: "py" '
                                        'python_param { module: "evil" layer: "Evil" } }')
    with pytest.raises(NetError, match="Python layer. slim refuses to execute code"):
        caffe.Net(path, caffe.TEST)
    assert "Python" not in caffe.layer_type_list() and "Convolution" in caffe.layer_type_list()


# ----- forward and backward against slim's own Net -----------------------------------------------------------------
@pytest.mark.parametrize("force_backward", [False, True])
def test_forward_backward_equal_slim_and_autograd(tmp_path, force_backward):
    path, net = conv_net(tmp_path, force_backward)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    x, y = inputs()
    out = net.forward(data=x, label=y)
    values, loss, blob_grads, param_grads = reference(path, weights, x, y)
    assert list(out) == ["acc", "loss"]
    close(out["loss"] * 2, loss)
    for name in ("conv1", "sum", "pool", "ip", "acc"):
        close(net.blobs[name].data, values[name])
    diffs = net.backward()
    assert list(diffs) == ["data", "label"]
    for name, g in blob_grads.items():
        if name == "data" and not force_backward:
            assert not net.blobs["data"].diff.any()             # Caffe computes no input gradient by default
        else:
            close(net.blobs[name].diff, g)                      # conv1: the sum over its two consumers
    for (layer, i), g in param_grads.items():
        close(net.params[layer][i].diff, g)
    assert not net.blobs["label"].diff.any()                    # a label never gets a gradient (Caffe's LossLayer)
    assert not net.params["bn1"][0].diff.any()                  # BatchNorm statistics: lr_mult 0, no diff


def test_param_diffs_accumulate_until_cleared(tmp_path):
    _, net = conv_net(tmp_path)
    x, y = inputs()
    net.forward(data=x, label=y)
    net.backward()
    once = net.params["ip"][0].diff.copy()
    net.backward()
    close(net.params["ip"][0].diff, 2 * once)
    net.clear_param_diffs()
    assert not net.params["ip"][0].diff.any() and not net.params["conv1"][1].diff.any()


def test_lr_mult_zero_and_propagate_down(tmp_path):
    text = LINEAR_NET.replace("force_backward: true", "") + """
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 3 dim: 2 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
    frozen = text.replace('bottom: "data" top: "ip1"', 'bottom: "data" top: "ip1" param { lr_mult: 0 } '
                                                       'param { lr_mult: 0 }')
    net = caffe.Net(write(tmp_path, frozen), caffe.TRAIN)
    x, t = np.ones((3, 4), np.float32), np.zeros((3, 2), np.float32)
    net.forward(data=x, label=t)
    net.backward()
    assert not net.params["ip1"][0].diff.any()                  # lr_mult 0: Caffe computes no diff
    assert net.params["ip2"][0].diff.any()
    assert not net.blobs["ip1"].diff.any()                      # nothing below ip2 wants a gradient
    stopped = text.replace('bottom: "ip1" top: "ip2"', 'bottom: "ip1" top: "ip2" propagate_down: false')
    net = caffe.Net(write(tmp_path, stopped, "b.prototxt"), caffe.TRAIN)
    net.forward(data=x, label=t)
    net.backward()
    assert net.params["ip2"][0].diff.any() and not net.params["ip1"][0].diff.any()


# ----- partial runs and hand computations ---------------------------------------------------------------------------
def linear(tmp_path):
    torch.manual_seed(3)
    net = caffe.Net(write(tmp_path, LINEAR_NET), caffe.TEST)
    w1, b1 = (p.data.astype(np.float64) for p in net.params["ip1"])
    w2, b2 = (p.data.astype(np.float64) for p in net.params["ip2"])
    return net, w1, b1, w2, b2


def test_forward_start_end_and_blob_writes(tmp_path):
    net, w1, b1, w2, b2 = linear(tmp_path)
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    net.blobs["data"].data[...] = x                             # a write before forward is what the net reads
    out = net.forward(end="ip1")
    assert list(out) == ["ip1"]
    close(out["ip1"], x @ w1.T + b1)
    assert not net.blobs["ip2"].data.any()                      # not run yet
    z = np.full((3, 5), 0.5, np.float32)
    net.blobs["ip1"].data[...] = z
    out = net.forward(start="ip2", blobs=["ip1"])
    close(out["ip2"], z @ w2.T + b2)
    assert out["ip1"] is not None and np.array_equal(out["ip1"], z)
    net.params["ip2"][1].data[...] = 7                          # parameter writes take effect too
    close(net.forward(start="ip2")["ip2"], z @ w2.T + 7)
    with pytest.raises(NetError, match="start='nope' is not a layer"):
        net.forward(start="nope")
    with pytest.raises(NetError, match="does not have"):
        net.forward(blobs=["nope"])


def test_backward_from_a_top_diff(tmp_path):
    net, w1, b1, w2, b2 = linear(tmp_path)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    net.forward(data=x)
    h = x @ w1.T + b1
    g = np.array([[1, 0], [0, 2], [-1, 1]], np.float32)
    diffs = net.backward(ip2=g)                                 # the output's diff, then the whole backward
    close(diffs["data"], g @ w2 @ w1, 1e-4)
    close(net.blobs["ip1"].diff, g @ w2)
    close(net.params["ip2"][0].diff, g.T @ h, 1e-4)
    close(net.params["ip2"][1].diff, g.sum(0))
    net.clear_param_diffs()
    net.blobs["ip1"].diff[...] = 0
    out = net.backward(start="ip2", end="ip2")                  # only ip2's backward: ip1's diff, not data's
    assert list(out) == ["ip1"]
    close(out["ip1"], g @ w2)
    close(diffs["data"], g @ w2 @ w1, 1e-4)                     # data's diff was not touched again
    with pytest.raises(NetError, match="do not match the net's outputs"):
        net.backward(ip1=g)


def test_reshape_carries_input_shapes(tmp_path):
    path, net = conv_net(tmp_path)
    net.blobs["data"].reshape(5, 3, 10, 10)
    net.blobs["label"].reshape(5)
    net.reshape()
    assert net.blobs["conv1"].shape == (5, 4, 10, 10) and net.blobs["ip"].shape == (5, 3)
    x = np.random.default_rng(4).normal(size=(5, 3, 10, 10)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0], np.float32)
    out = net.forward(data=x, label=y)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    text = (CONV_NET % "").replace("dim: 2 dim: 3 dim: 6 dim: 6", "dim: 5 dim: 3 dim: 10 dim: 10")
    ref = slim.Net(write(tmp_path, text.replace("shape { dim: 2 }", "shape { dim: 5 }"), "big.prototxt"),
                   phase="TEST", weights=weights)            # the same net built for the new shapes
    net.blobs["data"].reshape(1, 3, 8, 8)                       # forward carries a new shape by itself
    net.blobs["label"].reshape(1)
    assert net.forward()["loss"].shape == () and net.blobs["pool"].shape == (1, 4, 1, 1)
    values = ref.run_layers({"data": torch.tensor(x), "label": torch.tensor(y)})
    close(out["loss"], values["loss"])
    lin = caffe.Net(write(tmp_path, LINEAR_NET, "lin.prototxt"), caffe.TEST)
    lin.blobs["data"].reshape(3, 6)
    with pytest.raises(NetError, match="layer 'ip1' would need parameters of shape"):
        lin.reshape()
    with pytest.raises(NetError, match="is a layer parameter"):
        lin.params["ip1"][0].reshape(1, 1)


def test_forward_all_and_forward_backward_all(tmp_path):
    net, w1, b1, w2, b2 = linear(tmp_path)
    x = np.random.default_rng(5).normal(size=(7, 4)).astype(np.float32)        # batch 3: 3 + 3 + 1 padded
    out = net.forward_all(data=x, blobs=["ip1"])
    assert out["ip2"].shape == (7, 2) and out["ip1"].shape == (7, 5)
    close(out["ip2"], (x @ w1.T + b1) @ w2.T + b2, 1e-4)
    g = np.random.default_rng(6).normal(size=(7, 2)).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=x, ip2=g)
    close(outs["ip2"], out["ip2"])
    close(diffs["data"], g @ w2 @ w1, 1e-4)
    with pytest.raises(NetError, match="different lengths"):
        caffe.Net(write(tmp_path, CONV_NET % "", "c.prototxt"), caffe.TEST).forward_all(
            data=np.zeros((4, 3, 6, 6)), label=np.zeros(3))


def test_forward_argument_errors(tmp_path):
    net, *_ = linear(tmp_path)
    with pytest.raises(NetError, match="do not match the net's inputs"):
        net.forward(image=np.zeros((3, 4)))
    with pytest.raises(NetError, match="batch of 3 items"):
        net.forward(data=np.zeros((2, 4)))
    with pytest.raises(NetError, match="reshape the blob"):
        net.forward(data=np.zeros((3, 5)))


# ----- weights ----------------------------------------------------------------------------------------------------
def test_save_copy_from_share_with(tmp_path):
    path, net = conv_net(tmp_path)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    stored = read_caffemodel(weights).blobs_by_name()
    for layer, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_array_equal(stored[layer].blobs[i], blob.data)
    torch.manual_seed(9)
    other = caffe.Net(path, caffe.TEST)
    assert not np.array_equal(other.params["conv1"][0].data, net.params["conv1"][0].data)
    other.copy_from(weights)
    x, y = inputs()
    close(other.forward(data=x, label=y)["loss"], net.forward(data=x, label=y)["loss"])
    torch.manual_seed(10)
    third = caffe.Net(path, caffe.TEST)
    third.share_with(net)
    net.params["ip"][1].data[...] += 1                          # one memory: the sharer sees the change
    np.testing.assert_array_equal(third.params["ip"][1].data, net.params["ip"][1].data)
    with pytest.raises(WeightsError):
        caffe.Net(write(tmp_path, LINEAR_NET, "lin.prototxt"), caffe.TEST, weights=weights)


def test_hdf5_round_trip(tmp_path):
    pytest.importorskip("h5py")
    path, net = conv_net(tmp_path)
    net.save_hdf5(str(tmp_path / "w.h5"))
    torch.manual_seed(11)
    other = caffe.Net(path, caffe.TEST)
    other.copy_from(str(tmp_path / "w.h5"))                     # .h5 goes through load_hdf5, as in Caffe
    for layer, blobs in net.params.items():
        for a, b in zip(blobs, other.params[layer]):
            np.testing.assert_array_equal(a.data, b.data)
    import h5py
    with h5py.File(tmp_path / "w.h5", "r") as f:              # Caffe's layout: data/<layer>/<blob index>
        assert list(f["data"]) == sorted(net._layer_names)     # a group per layer, blobs or not
        np.testing.assert_array_equal(f["data/conv1/0"][()], net.params["conv1"][0].data)
        assert sorted(f["data/bn1"]) == ["0", "1", "2"] and not list(f["data/relu1"])
    with h5py.File(tmp_path / "bad.h5", "w") as f:             # written as Caffe's ToHDF5 would, wrong shape
        f.create_dataset("data/ip/0", data=np.zeros((3, 5), np.float32))
    with pytest.raises(WeightsError, match="layer 'ip' blob 0 has shape \\(3, 5\\), the net expects \\(3, 4\\)"):
        other.load_hdf5(str(tmp_path / "bad.h5"))


def test_hdf5_without_h5py_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    _, net = conv_net(tmp_path)
    with pytest.raises(SlimError, match="pip install h5py"):
        net.save_hdf5(str(tmp_path / "w.h5"))
    with pytest.raises(SlimError, match="optional h5py"):
        net.load_hdf5(str(tmp_path / "w.h5"))


def test_set_input_arrays_feeds_memory_data(tmp_path):
    text = """
layer { name: "data" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 1 } }
"""
    net = caffe.Net(write(tmp_path, text), caffe.TEST)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data, [2, 3])


# ----- the GPU rule, exercised on the CPU ----------------------------------------------------------------------------
def test_host_copies_follow_caffes_synced_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(MIRRORS, "always", True)    # blobs behave as on a GPU: host copies, pushed before computing
    net, w1, b1, w2, b2 = linear(tmp_path)
    x = np.ones((3, 4), np.float32)
    data = net.blobs["data"].data
    assert not np.shares_memory(data, net._runner.data["data"].numpy())
    data[...] = x                                   # written to the host copy ...
    kept = net.blobs["ip1"].data                    # not an output: forward() does not read it back
    net.params["ip2"][1].data[...] = 3              # ... and a parameter's host copy
    net.forward()                                   # both pushed before the forward
    assert not kept.any()                           # an array kept across a computation is stale, as in Caffe,
    fresh = net.blobs["ip1"].data                   # until .data is read again (the same host memory, refreshed)
    close(fresh, x @ w1.T + b1, 1e-4)
    assert fresh is kept
    close(net.blobs["ip2"].data, (x @ w1.T + b1) @ w2.T + 3, 1e-4)
    g = np.ones((3, 2), np.float32)
    net.backward(ip2=g)
    close(net.blobs["data"].diff, g @ w2 @ w1, 1e-4)
    close(net.params["ip2"][1].diff, g.sum(0))


def test_set_mode_gpu_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SlimError, match="torch sees no CUDA device"):
        caffe.set_mode_gpu()
    caffe.set_mode_cpu()


@pytest.mark.parametrize("loss_type, target_gets_diff", [("EuclideanLoss", True), ("SigmoidCrossEntropyLoss", False)])
def test_force_backward_reaches_the_bottoms_caffe_allows(tmp_path, loss_type, target_gets_diff):
    # Caffe's LossLayer never sends a gradient to bottom 1 (the label), even under force_backward; EuclideanLoss
    # allows it: its target's diff is -(a - b) / N.
    text = f"""
force_backward: true
layer {{ name: "in" type: "Input" top: "a" top: "b" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
layer {{ name: "loss" type: "{loss_type}" bottom: "a" bottom: "b" top: "loss" }}
"""
    net = caffe.Net(write(tmp_path, text), caffe.TRAIN)
    a = np.array([[0.5, -1, 2], [1, 0, -0.5]], np.float32)
    b = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    net.forward(a=a, b=b)
    diffs = net.backward()
    if target_gets_diff:
        close(diffs["a"], (a - b) / 2)
        close(diffs["b"], -(a - b) / 2)
    else:
        close(diffs["a"], (1 / (1 + np.exp(-a)) - b) / 2)       # sigmoid(a) - t over the batch size
        assert not diffs["b"].any()
