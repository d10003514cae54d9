"""slim import, operator by operator: each ONNX operator slim converts gives a net equal to ONNX Runtime (1e-4
relative, at a batch other than the Input layer's), mapped to the Caffe layers it should be; what Caffe cannot
express is one InteropError naming the node and the operator; files that are not models are refused."""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'slim[onnx]')")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from slim.errors import InteropError  # noqa: E402
from slim.interop.onnx_import import import_onnx, imported_net, write_imported  # noqa: E402

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime is not installed: nothing to compare against")
RNG = np.random.default_rng(0)


def rand(*shape, low=None):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + low if low is not None else a


def make_model(nodes, inputs, outputs, inits=None, opset=18, batch="N"):
    """A model: ``inputs`` name -> per-sample shape (the batch axis ``batch`` is prepended), ``inits`` name -> array."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, *s]) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in (inits or {}).items()])
    return with_output_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def with_output_shapes(model):
    """Output types as ONNX's shape inference finds them (the checker wants a shape on every output)."""
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for out in model.graph.output:
        if out.name in inferred:
            out.type.CopyFrom(inferred[out.name].type)
        else:
            out.type.tensor_type.shape.SetInParent()
    return model


def save(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def convert(model, tmp_path, **kw):
    """Import, compare with ONNX Runtime at batch 3 (1e-4 relative), and return the ImportResult."""
    path = save(model, tmp_path)
    result = import_onnx(path, **kw)
    if importlib.util.find_spec("onnxruntime") is not None:
        from slim.interop.runtime import compare_with_onnxruntime

        batch = result.model_batch or 3
        comparison = compare_with_onnxruntime(imported_net(result), path, batch=batch)
        assert comparison.max_rel <= 1e-4, comparison
        assert comparison.outputs == tuple(result.outputs)
    return result


def types(result):
    return [layer.type for layer in result.net.layer[1:]]


def layer(result, type_name):
    found = [lp for lp in result.net.layer if lp.type == type_name]
    assert len(found) == 1, types(result)
    return found[0]


def refused(model, tmp_path, *words, **kw):
    with pytest.raises(InteropError) as e:
        import_onnx(save(model, tmp_path), **kw)
    for word in words:
        assert word in str(e.value), str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# convolution


@needs_ort
@pytest.mark.parametrize("attrs,cin,cout,size", [
    (dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 3, 4, (9, 9)),
    (dict(kernel_shape=[3, 3], strides=[2, 2], dilations=[2, 2], group=2, pads=[2, 2, 2, 2]), 4, 6, (11, 10)),
    (dict(kernel_shape=[3, 1], pads=[1, 0, 1, 0]), 2, 3, (7, 5)),
    (dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0]), 2, 3, (8, 8)),  # asymmetric, same size: Caffe can
    (dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER"), 2, 3, (6, 6)),
    (dict(kernel_shape=[3, 3], auto_pad="VALID", strides=[2, 1]), 2, 3, (9, 6)),
    (dict(kernel_shape=[3, 3], group=4, pads=[1, 1, 1, 1]), 4, 4, (6, 6)),  # depthwise
], ids=["plain", "groups-dilation-stride", "non-square", "asymmetric-expressible", "same-upper", "valid", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv(tmp_path, attrs, cin, cout, size, bias):
    k = attrs["kernel_shape"]
    inits = {"w": rand(cout, cin // attrs.get("group", 1), *k)}
    if bias:
        inits["b"] = rand(cout)
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], **attrs)
    result = convert(make_model([node], {"x": (cin, *size)}, ["y"], inits), tmp_path)
    assert types(result) == ["Convolution"]
    assert layer(result, "Convolution").convolution_param.bias_term == bias


@needs_ort
@pytest.mark.parametrize("spatial", [1, 3])
def test_conv_1d_and_3d(tmp_path, spatial):
    k = [3] * spatial
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=k, pads=[1] * (2 * spatial))
    result = convert(make_model([node], {"x": (2, *[5] * spatial)}, ["y"], {"w": rand(3, 2, *k)}), tmp_path)
    assert types(result) == ["Convolution"]


def test_conv_padding_caffe_cannot_express_is_refused(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c1", kernel_shape=[3, 3], strides=[2, 2],
                            auto_pad="SAME_UPPER")  # 8 -> 4 needs padding 0 before, 1 after
    refused(make_model([node], {"x": (2, 8, 8)}, ["y"], {"w": rand(3, 2, 3, 3)}), tmp_path, "'c1'", "(Conv)",
            "pads both sides equally")


def test_conv_weights_computed_at_run_time_are_refused(tmp_path):
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dyn", kernel_shape=[1, 1])
    model = make_model([node], {"x": (2, 4, 4), "w": (2, 1, 1)}, ["y"], batch=3)
    refused(model, tmp_path, "'dyn'", "weight", "computed at run time")


@needs_ort
@pytest.mark.parametrize("attrs", [dict(strides=[2, 2], pads=[1, 1, 1, 1]), dict(strides=[2, 2], group=2),
                                   dict(dilations=[2, 2], pads=[1, 1, 1, 1])])
def test_conv_transpose(tmp_path, attrs):
    g = attrs.get("group", 1)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs)
    result = convert(make_model([node], {"x": (4, 5, 5)}, ["y"], {"w": rand(4, 6 // g, 3, 3), "b": rand(6)}),
                     tmp_path)
    assert types(result) == ["Deconvolution"]


def test_conv_transpose_output_padding_is_refused(tmp_path):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", kernel_shape=[3, 3], strides=[2, 2],
                            pads=[1, 1, 1, 1], output_padding=[1, 1])
    refused(make_model([node], {"x": (4, 5, 5)}, ["y"], {"w": rand(4, 2, 3, 3)}), tmp_path, "'up'", "output_padding")


# ----------------------------------------------------------------------------------------------------------------
# normalisation and activations


@needs_ort
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_batch_normalization_becomes_batchnorm_and_scale(tmp_path, eps):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], epsilon=eps),
             helper.make_node("Relu", ["n"], ["y"])]
    inits = {"w": rand(4, 3, 1, 1), "g": rand(4), "b": rand(4), "m": rand(4), "v": rand(4, low=0.5)}
    result = convert(make_model(nodes, {"x": (3, 5, 5)}, ["y"], inits), tmp_path)
    assert types(result) == ["Convolution", "BatchNorm", "Scale", "ReLU"]
    bn, scale = layer(result, "BatchNorm"), layer(result, "Scale")
    assert list(scale.bottom) == list(scale.top) == list(bn.top)  # in place: slim fuses it, slimming finds gamma
    assert np.isclose(bn.batch_norm_param.eps, eps)
    from slim.net import Net

    assert list(Net(result.net).scaling_factors()) == [scale.name]


def test_batch_normalization_in_training_mode_is_refused(tmp_path):
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y", "rm", "rv"], name="bn",
                            training_mode=1)
    inits = {"g": rand(3), "b": rand(3), "m": rand(3), "v": rand(3, low=0.5)}
    refused(make_model([node], {"x": (3, 4, 4)}, ["y"], inits), tmp_path, "'bn'", "training mode", "model.eval()")


UNARY = {
    "Relu": ("ReLU", {}), "LeakyRelu": ("ReLU", dict(alpha=0.2)), "Elu": ("ELU", dict(alpha=0.7)),
    "Sigmoid": ("Sigmoid", {}), "Tanh": ("TanH", {}), "Softplus": ("BNLL", {}), "Abs": ("AbsVal", {}),
    "Exp": ("Exp", {}),
}


@needs_ort
@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_activations(tmp_path, op):
    caffe_type, attrs = UNARY[op]
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    assert types(convert(make_model([node], {"x": (3, 4, 4)}, ["y"]), tmp_path)) == [caffe_type]


@needs_ort
def test_log_of_a_positive_tensor(tmp_path):
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Add", ["a", "one"], ["p"]),
             helper.make_node("Log", ["p"], ["y"])]
    result = convert(make_model(nodes, {"x": (3, 4)}, ["y"], {"one": np.float32(1.0)}), tmp_path)
    assert types(result) == ["AbsVal", "Power", "Log"]


@needs_ort
@pytest.mark.parametrize("shared", [True, False])
def test_prelu(tmp_path, shared):
    slope = rand(1) if shared else rand(3, 1, 1)
    node = helper.make_node("PRelu", ["x", "s"], ["y"])
    result = convert(make_model([node], {"x": (3, 4, 4)}, ["y"], {"s": slope}), tmp_path)
    assert layer(result, "PReLU").prelu_param.channel_shared == shared


@needs_ort
@pytest.mark.parametrize("bounds,caffe", [((0.0, 6.0), "Clip"), ((0.0, None), "ReLU"), ((-1.0, 1.0), "Clip"),
                                          ((None, 0.5), "Clip")], ids=["relu6", "relu", "symmetric", "max-only"])
def test_clip(tmp_path, bounds, caffe):
    inits = {n: np.float32(v) for n, v in zip(("lo", "hi"), bounds) if v is not None}
    names = ["lo" if bounds[0] is not None else "", "hi" if bounds[1] is not None else ""]
    while names and not names[-1]:
        names.pop()
    node = helper.make_node("Clip", ["x", *names], ["y"])
    assert types(convert(make_model([node], {"x": (3, 4, 4)}, ["y"], inits), tmp_path)) == [caffe]


@needs_ort
def test_clip_opset_6_attributes(tmp_path):
    node = helper.make_node("Clip", ["x"], ["y"], min=0.0, max=6.0)
    assert types(convert(make_model([node], {"x": (3, 4)}, ["y"], opset=6), tmp_path)) == ["Clip"]


@needs_ort
def test_hard_sigmoid_and_hard_swish(tmp_path):
    nodes = [helper.make_node("HardSigmoid", ["x"], ["s"], alpha=0.3, beta=0.4),
             helper.make_node("HardSwish", ["x"], ["w"])]
    result = convert(make_model(nodes, {"x": (3, 4, 4)}, ["s", "w"]), tmp_path)
    assert types(result) == ["Power", "Clip", "Power", "Clip", "Eltwise"]


@needs_ort
@pytest.mark.parametrize("opset,axis,shape", [(18, 1, (5,)), (18, -1, (3, 4)), (18, 1, (3, 4)), (11, 1, (5,))])
def test_softmax(tmp_path, opset, axis, shape):
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    assert types(convert(make_model([node], {"x": shape}, ["y"], opset=opset), tmp_path)) == ["Softmax"]


def test_old_softmax_over_several_axes_is_refused(tmp_path):
    node = helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=1)
    refused(make_model([node], {"x": (3, 4)}, ["y"], opset=11), tmp_path, "'sm'", "opset 13")


@needs_ort
def test_dropout_identity_and_cast_keep_values(tmp_path):
    nodes = [helper.make_node("Dropout", ["x", "r"], ["d"]), helper.make_node("Identity", ["d"], ["i"]),
             helper.make_node("Cast", ["i"], ["c"], to=TensorProto.FLOAT), helper.make_node("Relu", ["c"], ["y"])]
    result = convert(make_model(nodes, {"x": (3, 4)}, ["y"], {"r": np.float32(0.3)}), tmp_path)
    assert types(result) == ["Dropout", "ReLU"]
    assert np.isclose(layer(result, "Dropout").dropout_param.dropout_ratio, 0.3)


# ----------------------------------------------------------------------------------------------------------------
# pooling: every combination either maps exactly or is refused, and refused only where Caffe differs


def pool_model(op, n, k, s, p, ceil, cip, pads=None):
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=pads or [p] * 4, ceil_mode=ceil)
    if op == "AveragePool":
        attrs["count_include_pad"] = cip
    return make_model([helper.make_node(op, ["x"], ["y"], name="pool", **attrs)], {"x": (2, n, n)}, ["y"], opset=19)


@needs_ort
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("n", [7, 8])
def test_pooling_sweep(tmp_path, op, n):
    converted = 0
    for k in (1, 2, 3):
        for s in (1, 2, 3):
            for p in range(k):
                if p > 1:
                    continue
                for ceil in (0, 1):
                    for cip in ((0, 1) if op == "AveragePool" else (0,)):
                        model = pool_model(op, n, k, s, p, ceil, cip)
                        if op == "AveragePool" and p > 0 and not cip:
                            refused(model, tmp_path, "'pool'", "count_include_pad")
                            continue
                        result = convert(model, tmp_path)
                        assert types(result) == ["Pooling"]
                        converted += 1
    assert converted > 20


@needs_ort
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling_with_tf_same_padding(tmp_path, op):
    # pads 0 before, 1 after: Caffe's CEIL rounding without padding gives the same windows.
    model = pool_model(op, 7, 2, 2, 0, 0, 0, pads=[0, 0, 1, 1])
    result = convert(model, tmp_path)
    assert result.net.layer[1].pooling_param.pad == 0


def test_pooling_floor_is_written_only_when_needed(tmp_path):
    ceil = import_onnx(save(pool_model("MaxPool", 8, 2, 2, 0, 0, 0), tmp_path))  # sizes agree: CEIL, the default
    assert not ceil.net.layer[1].pooling_param.HasField("round_mode")
    floor = import_onnx(save(pool_model("MaxPool", 7, 2, 2, 0, 0, 0), tmp_path))
    from slim import proto as pb

    assert floor.net.layer[1].pooling_param.round_mode == pb.PoolingParameter.FLOOR


@needs_ort
@pytest.mark.parametrize("op,keepdims", [("GlobalAveragePool", 1), ("GlobalMaxPool", 1), ("ReduceMean", 0),
                                         ("ReduceMean", 1), ("ReduceMax", 0)])
def test_global_pooling(tmp_path, op, keepdims):
    if op.startswith("Reduce"):
        node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
        inits = {"axes": np.array([2, 3], np.int64)}
    else:
        node, inits = helper.make_node(op, ["x"], ["y"]), {}
    result = convert(make_model([node], {"x": (3, 5, 4)}, ["y"], inits), tmp_path)
    assert types(result) == ["Pooling"] + ([] if keepdims else ["Flatten"])
    assert result.net.layer[1].pooling_param.global_pooling


def test_reduce_over_channels_is_refused(tmp_path):
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")
    refused(make_model([node], {"x": (3, 5, 4)}, ["y"], {"axes": np.array([1], np.int64)}), tmp_path, "'rm'",
            "[1]")


# ----------------------------------------------------------------------------------------------------------------
# fully connected and arithmetic


@needs_ort
@pytest.mark.parametrize("trans_b,alpha,beta,bias_shape", [(1, 1.0, 1.0, (5,)), (0, 0.5, 2.0, (1, 5)),
                                                           (1, 1.0, 1.0, None)])
def test_gemm(tmp_path, trans_b, alpha, beta, bias_shape):
    w = rand(5, 6) if trans_b else rand(6, 5)
    inits = {"w": w}
    inputs = ["x", "w"]
    if bias_shape:
        inits["c"] = rand(*bias_shape)
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=alpha, beta=beta)
    result = convert(make_model([node], {"x": (6,)}, ["y"], inits), tmp_path)
    assert types(result) == ["InnerProduct"]


@needs_ort
def test_matmul_add_becomes_one_inner_product(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    result = convert(make_model(nodes, {"x": (6,)}, ["y"], {"w": rand(6, 4), "b": rand(4)}), tmp_path)
    assert types(result) == ["InnerProduct"]
    assert layer(result, "InnerProduct").inner_product_param.bias_term


@needs_ort
def test_matmul_over_the_last_axis(tmp_path):
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    result = convert(make_model([node], {"x": (3, 6)}, ["y"], {"w": rand(6, 4)}), tmp_path)
    assert layer(result, "InnerProduct").inner_product_param.axis == 2


def test_gemm_with_transposed_input_is_refused(tmp_path):
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)
    refused(make_model([node], {"x": (6,)}, ["y"], {"w": rand(5, 6)}, batch=6), tmp_path, "'fc'", "transA")


@needs_ort
def test_add_constant_after_conv_is_folded_into_its_bias(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Add", ["bias", "c"], ["y"])]
    result = convert(make_model(nodes, {"x": (3, 4, 4)}, ["y"], {"w": rand(5, 3, 1, 1), "bias": rand(1, 5, 1, 1)}),
                     tmp_path)
    assert types(result) == ["Convolution"] and layer(result, "Convolution").convolution_param.bias_term


@needs_ort
@pytest.mark.parametrize("op,const,expected", [
    ("Add", rand(3, 1, 1), "Bias"), ("Add", rand(3, 4, 4), "Bias"), ("Add", np.float32(0.5), "Power"),
    ("Sub", rand(3, 1, 1), "Bias"), ("Mul", rand(3, 1, 1), "Scale"), ("Mul", rand(1, 4), "Scale"),
    ("Mul", np.float32(-2.0), "Power"), ("Div", rand(3, 1, 1, low=0.5), "Scale"), ("Div", np.float32(4.0), "Power"),
], ids=["add-channel", "add-full", "add-scalar", "sub-channel", "mul-channel", "mul-width", "mul-scalar",
        "div-channel", "div-scalar"])
def test_arithmetic_with_a_constant(tmp_path, op, const, expected):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r", "c"], ["y"])]
    result = convert(make_model(nodes, {"x": (3, 4, 4)}, ["y"], {"c": const}), tmp_path)
    assert types(result) == ["ReLU", expected]


@needs_ort
def test_constant_minus_tensor(tmp_path):
    node = helper.make_node("Sub", ["c", "x"], ["y"])
    assert types(convert(make_model([node], {"x": (3, 4)}, ["y"], {"c": np.float32(1.5)}), tmp_path)) == ["Power"]


@needs_ort
@pytest.mark.parametrize("op,n", [("Add", 2), ("Sub", 2), ("Sum", 3), ("Max", 2), ("Mul", 2)])
def test_eltwise_of_computed_tensors(tmp_path, op, n):
    names = [f"x{i}" for i in range(n)]
    nodes = [helper.make_node(op, names, ["y"])]
    result = convert(make_model(nodes, {name: (3, 4, 4) for name in names}, ["y"]), tmp_path)
    assert types(result) == ["Eltwise"]


@needs_ort
def test_squeeze_and_excitation_multiply(tmp_path):
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Sigmoid", ["p"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    result = convert(make_model(nodes, {"x": (3, 4, 4)}, ["y"]), tmp_path)
    assert types(result) == ["Pooling", "Sigmoid", "Flatten", "Scale"]
    assert layer(result, "Scale").scale_param.axis == 0


def test_broadcast_between_computed_tensors_is_refused(tmp_path):
    node = helper.make_node("Add", ["a", "b"], ["y"], name="bcast")
    refused(make_model([node], {"a": (3, 4, 4), "b": (1, 4, 4)}, ["y"]), tmp_path, "'bcast'", "equal shapes")


# ----------------------------------------------------------------------------------------------------------------
# structure


@needs_ort
def test_concat_and_split(tmp_path):
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Split", ["c", "sizes"], ["s0", "s1", "s2"], axis=1),
             helper.make_node("Relu", ["s2"], ["y"])]
    result = convert(make_model(nodes, {"a": (2, 3), "b": (4, 3)}, ["s0", "y"], {"sizes": np.array([1, 3, 2])}),
                     tmp_path)
    assert types(result) == ["Concat", "Slice", "Silence", "ReLU"]  # the unused part is silenced, not an output
    assert list(layer(result, "Slice").slice_param.slice_point) == [1, 4]


@needs_ort
def test_split_evenly(tmp_path):
    node = helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)
    result = convert(make_model([node], {"x": (4, 3)}, ["a", "b"]), tmp_path)
    assert types(result) == ["Slice"] and result.outputs == ["a", "b"]


@needs_ort
def test_flatten_reshape_squeeze_unsqueeze(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Reshape", ["f", "shape"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
             helper.make_node("Squeeze", ["u", "ax"], ["y"])]
    inits = {"shape": np.array([0, 4, -1], np.int64), "ax": np.array([3], np.int64)}
    result = convert(make_model(nodes, {"x": (2, 3, 4)}, ["y"], inits), tmp_path)
    assert types(result) == ["Flatten", "Reshape", "Reshape", "Reshape"]


@needs_ort
def test_shape_arithmetic_is_folded(tmp_path):
    # x.view(x.size(0), -1) as the legacy exporter writes it, with a dynamic batch.
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "ax0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    result = convert(make_model(nodes, {"x": (2, 3, 4)}, ["y"], inits), tmp_path)
    assert types(result) == ["Flatten"] and result.folded == 4


def test_reshape_that_moves_the_batch_axis_is_refused(tmp_path):
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")
    refused(make_model([node], {"x": (2, 3)}, ["y"], {"shape": np.array([-1], np.int64)}), tmp_path, "'rs'",
            "batch axis")


# ----------------------------------------------------------------------------------------------------------------
# inputs, names, batch


@needs_ort
def test_dynamic_spatial_axes_need_a_shape(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = with_output_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    message = refused(model, tmp_path, "axis 2", "'x'", "--input-shape x:")
    assert "dynamic" in message
    result = convert(model, tmp_path, input_shapes={"x": (3, 6, 5)})
    assert list(result.net.layer[0].input_param.shape[0].dim) == [1, 3, 6, 5]


def test_fixed_batch_is_kept_and_can_be_changed(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    model = make_model([node], {"x": (3, 4)}, ["y"], batch=5)
    assert list(import_onnx(save(model, tmp_path)).net.layer[0].input_param.shape[0].dim) == [5, 3, 4]
    assert list(import_onnx(save(model, tmp_path), batch=2).net.layer[0].input_param.shape[0].dim) == [2, 3, 4]


def test_integer_inputs_are_refused(tmp_path):
    node = helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    refused(with_output_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), tmp_path,
            "'ids'", "INT64")


@needs_ort
def test_outputs_keep_their_names_and_an_output_copy_of_another(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["out1"]),
             helper.make_node("Identity", ["r"], ["out2"])]
    result = convert(make_model(nodes, {"x": (3,)}, ["out1", "out2"]), tmp_path)
    assert result.outputs == ["out1", "out2"]
    from slim.net import Net

    assert Net(result.net).outputs == ["out1", "out2"]


@needs_ort
def test_an_output_that_later_layers_also_read(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["features"]), helper.make_node("Sigmoid", ["features"], ["s"]),
             helper.make_node("Relu", ["s"], ["logits"])]
    result = convert(make_model(nodes, {"x": (3, 4)}, ["features", "logits"]), tmp_path)
    from slim.net import Net

    assert sorted(Net(result.net).outputs) == ["features", "logits"]


def test_written_files_read_back(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    result = import_onnx(save(make_model(nodes, {"x": (2, 5, 5)}, ["y"], {"w": rand(3, 2, 3, 3), "b": rand(3)}),
                              tmp_path))
    proto, weights = write_imported(result, tmp_path / "out")
    from slim.net import Net

    net = Net(proto, weights=weights)
    np.testing.assert_array_equal(net.params[result.net.layer[1].name][0].detach().numpy(),
                                  result.blobs[result.net.layer[1].name][0])


# ----------------------------------------------------------------------------------------------------------------
# what is not a model, or not expressible


def test_unsupported_operator_names_node_and_operator(tmp_path):
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="upsample1", mode="nearest")
    model = make_model([node], {"x": (3, 4, 4)}, ["y"], {"scales": np.array([1, 1, 2, 2], np.float32)})
    message = refused(model, tmp_path, "'upsample1'", "(Resize)", "cannot express", "Conv", "BatchNormalization")
    assert "Replace it" in message


def test_custom_domain_is_refused(tmp_path):
    node = helper.make_node("FusedConv", ["x"], ["y"], name="fc1", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InteropError) as e:
        import_onnx(model)  # the checker cannot know com.microsoft's schema; the converter refuses it by domain
    assert "'fc1'" in str(e.value) and "com.microsoft" in str(e.value)


def test_a_file_that_is_not_a_model(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(InteropError, match="not .*ONNX model"):
        import_onnx(str(text))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InteropError, match="not an ONNX model"):
        import_onnx(str(empty))
    with pytest.raises(InteropError, match="no such"):
        import_onnx(str(tmp_path / "missing.onnx"))


def test_a_truncated_file(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])]
    path = save(make_model(nodes, {"x": (2, 9, 9)}, ["y"], {"w": rand(16, 2, 3, 3)}), tmp_path)
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 7):
        truncated = tmp_path / f"cut{cut}.onnx"
        truncated.write_bytes(data[:cut])
        with pytest.raises(InteropError, match="cut"):
            import_onnx(str(truncated))
