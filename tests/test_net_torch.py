"""slim.Net with PyTorch's own tools, no wrapper: torch.export, torch.jit.trace, torch.compile, torch.onnx.export
(both exporters), positional and keyword inputs, NetOutput as a pytree, train()/eval() and print(net)."""

import importlib.util

import numpy as np
import pytest
import torch
from torch.utils import _pytree

from slim.io import parse_net
from slim.net import Net, NetOutput

ONE_INPUT = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

TWO_INPUTS = """
name: "two"
layer { name: "in" type: "Input" top: "a" top: "b"
        input_param { shape { dim: 2 dim: 4 dim: 5 dim: 5 } shape { dim: 2 dim: 4 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "a" top: "ca"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "ca" bottom: "b" top: "sum" eltwise_param { coeff: 1 coeff: -2 } }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "relu" }
layer { name: "gp" type: "Pooling" bottom: "sum" top: "gp" pooling_param { pool: AVE global_pooling: true } }
"""


def make(text=ONE_INPUT, **kw):
    kw.setdefault("seed", 0)
    net = Net(parse_net(text), **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # BatchNorm statistics that are not the identity: the eval path must use them
        for name, blobs in net.params.items():
            if name.startswith("bn"):
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g))
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g) + 0.5)
                blobs[2].fill_(1.0)
    return net


def inputs_for(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch,) + tuple(net.graph.shapes[name][1:]), generator=g) for name in net.inputs]


def assert_outputs_equal(expected: dict, got, names, atol=1e-5):
    leaves = list(got.values()) if isinstance(got, dict) else list(got)
    assert len(leaves) == len(names)
    for name, value in zip(names, leaves):
        torch.testing.assert_close(value, expected[name], atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# calling conventions and outputs


def test_positional_inputs_follow_the_net_input_order_and_keywords_name_blobs():
    net = make(TWO_INPUTS)
    a, b = inputs_for(net)
    by_name = net(a=a, b=b)
    assert net.inputs == ["a", "b"]
    for out in (net(a, b), net(a, b=b)):
        assert list(out) == list(by_name)
        for k in by_name:
            assert torch.equal(out[k], by_name[k])
    swapped = net(b, a)
    assert not torch.equal(swapped["gp"], by_name["gp"])


def test_net_output_is_a_pytree_that_keeps_names_and_loss():
    out = NetOutput(x=torch.ones(2), y=torch.zeros(3))
    out.loss = torch.tensor(4.0)
    leaves, spec = _pytree.tree_flatten(out)
    assert [t.shape for t in leaves] == [(2,), (3,), ()]
    back = _pytree.tree_unflatten([t + 1 for t in leaves], spec)
    assert isinstance(back, NetOutput) and list(back) == ["x", "y"]
    assert back.loss.item() == 5.0 and torch.equal(back["y"], torch.ones(3))
    plain = NetOutput(x=torch.ones(1))
    leaves, spec = _pytree.tree_flatten(plain)
    assert len(leaves) == 1 and _pytree.tree_unflatten(leaves, spec).loss is None


def test_return_blobs_keyword_still_returns_every_blob():
    net = make()
    out = net(inputs_for(net)[0], return_blobs=True)
    assert {"data", "conv1", "pool1", "fc", "prob"} <= set(out)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch's tools


@pytest.mark.parametrize("text", [ONE_INPUT, TWO_INPUTS], ids=["one-input", "two-inputs"])
def test_torch_export_with_a_dynamic_batch(text):
    net = make(text)
    args = tuple(inputs_for(net))
    batch = torch.export.Dim("batch", min=1, max=64)
    assert net.batch_dynamic_shapes(batch) == {"args": tuple({0: batch} for _ in args)}
    program = torch.export.export(net, args, dynamic_shapes=net.batch_dynamic_shapes(batch))
    bigger = tuple(inputs_for(net, batch=5, seed=3))
    got = program.module()(*bigger)
    assert isinstance(got, NetOutput) and list(got) == net.outputs
    assert_outputs_equal(net(*bigger), got, net.outputs)


def test_torch_export_with_keyword_inputs():
    net = make(TWO_INPUTS)
    a, b = inputs_for(net)
    program = torch.export.export(net, (), kwargs={"a": a, "b": b})
    a, b = inputs_for(net, seed=7)
    assert_outputs_equal(net(a=a, b=b), program.module()(a=a, b=b), net.outputs)


@pytest.mark.parametrize("text", [ONE_INPUT, TWO_INPUTS], ids=["one-input", "two-inputs"])
def test_torch_jit_trace(text):
    net = make(text)
    traced = torch.jit.trace(net, tuple(inputs_for(net)), strict=False)
    other = inputs_for(net, seed=4)
    got = traced(*other)
    assert list(got) == net.outputs
    assert_outputs_equal(net(*other), got, net.outputs)


@pytest.mark.parametrize("text", [ONE_INPUT, TWO_INPUTS], ids=["one-input", "two-inputs"])
def test_torch_compile_captures_one_graph(text):
    net = make(text)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    x = inputs_for(net)
    assert_outputs_equal(net(*x), compiled(*x), net.outputs)


TRAIN_NET = ONE_INPUT.replace('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 '
                              'dim: 9 } } }',
                              'layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 2 '
                              'dim: 3 dim: 9 dim: 9 } } }') + """
layer { name: "label" type: "MemoryData" top: "label" top: "unused"
        memory_data_param { batch_size: 2 channels: 1 height: 1 width: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" accuracy_param { top_k: 2 } }
"""


def test_a_train_net_compiles_to_one_graph_on_a_batch_read_outside():
    # Solver(compile=True) reads the batch eagerly (Net.next_batch: data sources, random transforms) and compiles
    # the rest, data-fed, losses and label checks included, as one graph.
    from slim.errors import NetError
    net = Net(parse_net(TRAIN_NET), phase="TRAIN", seed=0).eval()
    net.set_input_arrays(np.zeros((4, 1, 1, 1), np.float32), np.array([0, 4, 2, 1], np.float32))
    state = net.data_state()
    want = net()
    net.load_data_state(state)
    batch = net.next_batch()
    assert set(batch) == {"data", "label", "unused"}
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    assert_outputs_equal(want, compiled(**batch), net.outputs)
    assert torch._dynamo.explain(net)(**batch).graph_count == 1
    net.check_labels(batch)
    with pytest.raises(NetError, match="labels must lie in"):
        net.check_labels({"label": torch.tensor([0.0, 5.0])})


onnx_available = importlib.util.find_spec("onnx") is not None
ort_available = importlib.util.find_spec("onnxruntime") is not None
onnxscript_available = importlib.util.find_spec("onnxscript") is not None


@pytest.mark.skipif(not onnx_available, reason="onnx is not installed (pip install slim[onnx])")
@pytest.mark.parametrize("dynamo", [True, False], ids=["default-exporter", "legacy-exporter"])
@pytest.mark.parametrize("text", [ONE_INPUT, TWO_INPUTS], ids=["one-input", "two-inputs"])
def test_torch_onnx_export(tmp_path, text, dynamo):
    if dynamo and not onnxscript_available:
        pytest.skip("the default exporter needs onnxscript (pip install slim[onnx])")
    import onnx

    net = make(text)
    args = tuple(inputs_for(net))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, args, str(path), dynamo=dynamo, input_names=net.inputs, output_names=net.outputs)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == net.inputs
    assert [o.name for o in model.graph.output] == net.outputs
    if not ort_available:
        pytest.skip("onnxruntime is not installed: the file was written, its outputs not checked")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(net.inputs, args)})
    assert_outputs_equal(net(*args), [torch.from_numpy(g) for g in got], net.outputs)


# ----------------------------------------------------------------------------------------------------------------
# train() / eval()


def test_a_net_starts_in_the_mode_of_its_phase():
    assert not make(phase="TEST").training
    assert make(phase="TRAIN").training


def test_train_and_eval_switch_batchnorm_and_dropout_only():
    net = make(phase="TEST")
    x = inputs_for(net, batch=8)[0]
    before = [t.clone() for t in net.params["bn1"]]
    eval_out = net(x, return_blobs=True)
    assert torch.equal(net(x)["prob"], eval_out["prob"])  # eval: deterministic, statistics untouched
    assert all(torch.equal(a, b) for a, b in zip(before, net.params["bn1"]))

    net.train()
    torch.manual_seed(0)
    train_out = net(x, return_blobs=True)
    conv = torch.nn.functional.conv2d(x, *net.params["conv1"], padding=1)
    mean = conv.mean((0, 2, 3), keepdim=True)
    var = conv.var((0, 2, 3), unbiased=False, keepdim=True)
    gamma, beta = (t.reshape(1, -1, 1, 1) for t in net.params["scale1"])
    expected = torch.relu((conv - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
    torch.testing.assert_close(train_out["conv1"], expected, atol=1e-4, rtol=1e-4)  # batch statistics
    assert net.params["bn1"][2].item() == pytest.approx(0.999 * 1.0 + 1.0)  # running sums updated (Caffe's rule)
    pooled = torch.nn.functional.max_pool2d(train_out["conv1"], 3, 2, ceil_mode=True)
    dropped = train_out["pool1"]
    assert ((dropped == 0) | torch.isclose(dropped, 2 * pooled)).all() and (dropped == 0).any()

    net.eval()
    with torch.no_grad():
        for t, b in zip(net.params["bn1"], before):
            t.copy_(b)
    assert torch.equal(net(x)["prob"], eval_out["prob"])
    assert [n.name for n in net.graph.layers] == [n.name for n in make(phase="TEST").graph.layers]


def test_train_mode_never_changes_the_layer_set_and_explicit_settings_win():
    text = ONE_INPUT.replace('layer { name: "prob"', 'layer { name: "only_train" type: "ReLU" bottom: "fc" '
                                                     'top: "t" include { phase: TRAIN } }\nlayer { name: "prob"')
    text = text.replace('top: "conv1" }\nlayer { name: "scale1"',
                        'top: "conv1" batch_norm_param { use_global_stats: true } }\nlayer { name: "scale1"')
    net = make(text, phase="TEST").train()
    assert "only_train" not in [n.name for n in net.graph.layers] and "t" not in net(inputs_for(net)[0])
    x = inputs_for(net, batch=4)[0]
    before = net.params["bn1"][2].clone()
    with torch.no_grad():
        net(x)
    assert torch.equal(net.params["bn1"][2], before)  # use_global_stats: true kept in train mode


def test_train_and_eval_survive_torch_export():
    net = make(phase="TRAIN").eval()
    x = inputs_for(net)[0]
    program = torch.export.export(net, (x,))
    assert_outputs_equal(net(x), program.module()(x), net.outputs)


# ----------------------------------------------------------------------------------------------------------------
# print(net)


def test_print_shows_every_layer_with_shapes():
    net = make()
    text = repr(net)
    lines = text.splitlines()
    assert lines[0].startswith("Net(small [TEST, eval mode]: 9 layers")
    assert len(lines) == 1 + len(net.graph.layers) + 1
    assert "(conv1): Convolution(data -> conv1 2x6x9x9; blobs 6x3x3x3 6)" in text
    assert "(relu1): ReLU(conv1 -> conv1 2x6x9x9)" in text
    assert "train mode" in repr(net.train())
    assert np.all([f"({n.name}):" in text for n in net.graph.layers])


def test_tracing_leaves_no_traced_tensors_behind():
    # pad 2 > kernel 3 // 2, which torch refuses: slim pads explicitly and divides by window sizes it caches; a
    # cached traced tensor would make every later eager output a fake tensor.
    net = make("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 2 dim: 8 dim: 8 } } }
        layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
                pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
    """)
    assert not net.graph.layer("pool").layer.native
    x = inputs_for(net)[0]
    torch.export.export(net, (x,), dynamic_shapes=net.batch_dynamic_shapes())  # traced before any eager call
    torch._dynamo.reset()
    torch.compile(net, backend="eager", fullgraph=True)(x)
    after = net(x)["pool"]
    assert type(after) is torch.Tensor
    fresh = Net(net.graph)  # the same layers, never traced
    assert torch.equal(after, fresh(x)["pool"])


@pytest.mark.parametrize("name,phase", [("demo_digits", "TRAIN"), ("resnet20_cifar10_deploy", "TEST")])
def test_zoo_nets_compile_to_one_graph(name, phase):
    # The demo's train net (data, BatchNorm, loss, Accuracy) and a residual net with option-A shortcuts (Power,
    # Concat); the deeper zoo nets are the same layer types (a minute each to trace on a shared machine).
    from pathlib import Path
    net = Net(Path(__file__).resolve().parents[1] / "nets" / f"{name}.prototxt", phase=phase, seed=0)
    if net.inputs:
        feed = {net.inputs[0]: torch.randn([2] + list(net.graph.shapes[net.inputs[0]])[1:])}
    else:
        feed = net.next_batch()   # a train net: its data layers' batch, read outside the graph
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(**feed)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
