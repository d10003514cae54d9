"""slim.caffe.NetSpec, caffe_pb2, draw and Classifier: written prototxt read back by slim, drawings as DOT text,
and the Classifier's predictions against the same preprocessing done by hand on slim's own Net."""

import sys

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import slim
import slim.caffe as caffe
from slim import proto as pb
from slim.caffe import layers as L, params as P
from slim.errors import NetError, SlimError
from slim.io import parse_net

EXPECTED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 pad: 1 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "a" type: "Slice" bottom: "pool" top: "a" top: "b" slice_param { axis: 1 slice_point: 2 } }
layer { name: "cat" type: "Concat" bottom: "b" bottom: "a" top: "cat" }
layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" loss_weight: 0.5
        include { phase: TRAIN } }
layer { name: "Convolution1" type: "Convolution" bottom: "cat" top: "Convolution1"
        convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "sil" type: "Silence" bottom: "Convolution1" }
"""


def build_spec():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv = L.Convolution(n.data, kernel_size=3, num_output=4, pad=1, weight_filler=dict(type="xavier"),
                           param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.a, n.b = L.Slice(n.pool, ntop=2, slice_param=dict(axis=1, slice_point=[2]))
    n.cat = L.Concat(n.b, n.a)
    unnamed = L.Convolution(n.cat, num_output=2, kernel_size=1)
    n.loss = L.EuclideanLoss(n.a, n.b, loss_weight=0.5, include=dict(phase=caffe.TRAIN))
    n.sil = L.Silence(unnamed, ntop=0)
    return n


def test_netspec_writes_caffes_prototxt():
    net = build_spec().to_proto()
    assert isinstance(net, pb.NetParameter)
    assert text_format.MessageToString(net) == text_format.MessageToString(parse_net(EXPECTED))
    back = parse_net(str(net))                                   # str() is the prototxt; slim reads it back
    assert back == net
    built = slim.Net(back, phase="TRAIN")                        # and builds it
    assert built.outputs == ["loss"] and list(built.params) == ["conv", "Convolution1"]


def test_netspec_access_and_subgraphs():
    n = build_spec()
    assert n.keys()[:3] == ["data", "conv", "relu"] and n["pool"] is n.pool
    sub = n.pool.to_proto()             # a top's own subgraph, named as pycaffe names tops outside a NetSpec
    assert [layer.name for layer in sub.layer] == ["Input1", "Convolution1", "Pooling1"]
    assert [layer.top[0] for layer in caffe.to_proto(n.relu).layer] == ["Input1", "Convolution1", "Convolution1"]
    with pytest.raises(AttributeError):
        n.missing


def test_netspec_fields_go_where_caffe_puts_them():
    n = caffe.NetSpec()
    n.data = L.Input(shape=[dict(dim=[1, 2, 4, 4])])
    n.up = L.Deconvolution(n.data, convolution_param=dict(num_output=2, kernel_size=2, stride=2, bias_term=False))
    n.bn = L.BatchNorm(n.up, use_global_stats=True, name="bn_layer")
    layers = n.to_proto().layer
    assert layers[1].convolution_param.stride == [2] and not layers[1].convolution_param.bias_term
    assert layers[2].name == "bn_layer" and layers[2].batch_norm_param.use_global_stats
    with pytest.raises(NetError, match="'kernal_size' is a field of neither convolution_param or LayerParameter"):
        n.bad = L.Convolution(n.data, kernal_size=3)
        n.to_proto()
    with pytest.raises(NetError, match="not a top of another layer"):
        L.ReLU("data")
    with pytest.raises(NetError, match="cannot hold"):
        m = caffe.NetSpec()
        m.x = L.Input(shape=dict(dim=["two"]))
        m.to_proto()
    assert P.Data.LMDB == pb.DataParameter.LMDB and P.Eltwise.MAX == pb.EltwiseParameter.MAX
    with pytest.raises(AttributeError, match="no message NopeParameter"):
        P.Nope


def test_caffe_pb2_is_slims_schema():
    from slim.caffe.proto import caffe_pb2
    assert caffe_pb2.NetParameter is pb.NetParameter and caffe_pb2.Datum is pb.Datum
    assert (caffe_pb2.TRAIN, caffe_pb2.TEST) == (caffe.TRAIN, caffe.TEST) == (0, 1)
    s = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", type="Adam")
    assert slim.io.parse_solver(str(s)) == s


def test_draw_makes_dot_text_and_needs_a_renderer(tmp_path, monkeypatch):
    from slim.caffe import draw
    net = build_spec().to_proto()
    dot = draw.net_to_dot(net, "TB")
    assert dot.startswith('digraph "net" {') and "rankdir=TB;" in dot
    assert '"blob_pool" -> layer4;' in dot and 'layer4 -> "blob_a" [label="a"];' in dot
    assert "kernel size: 3 | stride: 1 | pad: 1" in dot and "pool: MAX" in dot
    assert "layer8" in dot and "layer7" in dot
    assert "EuclideanLoss" not in draw.net_to_dot(net, phase=caffe.TEST)      # the TRAIN-only layer is left out
    with pytest.raises(SlimError, match="rankdir"):
        draw.net_to_dot(net, "UP")
    monkeypatch.setitem(sys.modules, "pydot", None)
    monkeypatch.setitem(sys.modules, "graphviz", None)
    with pytest.raises(SlimError, match=r"pip install slim\[draw\]"):
        draw.draw_net_to_file(net, str(tmp_path / "net.png"))
    with pytest.raises(SlimError, match="needs the optional pydot"):
        draw.get_pydot_graph(net, "LR")


DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def test_classifier_predicts_as_the_preprocessing_says(tmp_path):
    model = tmp_path / "deploy.prototxt"
    model.write_text(DEPLOY)
    torch.manual_seed(0)
    weights = str(tmp_path / "w.caffemodel")
    caffe.Net(str(model), caffe.TEST).save(weights)
    mean = np.array([100.0, 110.0, 120.0], np.float32)
    clf = caffe.Classifier(str(model), weights, image_dims=(8, 8), mean=mean, raw_scale=255, channel_swap=(2, 1, 0))
    rng = np.random.default_rng(3)
    images = [rng.uniform(0, 1, (8, 8, 3)).astype(np.float32) for _ in range(3)]   # already image_dims
    ref = slim.Net(str(model), phase="TEST", weights=weights)

    def by_hand(crop):            # H x W x RGB in [0, 1] -> BGR x H x W in [0, 255] minus the mean
        return crop.transpose(2, 0, 1)[::-1] * 255 - mean[:, None, None]

    def scores(crops):
        with torch.no_grad():
            return np.concatenate([ref(data=torch.tensor(by_hand(c)[None].copy()))["prob"].numpy() for c in crops])

    centre = clf.predict(images, oversample=False)
    np.testing.assert_allclose(centre, scores([im[1:7, 1:7] for im in images]), rtol=1e-5, atol=1e-6)
    ten = clf.predict(images)
    corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for i, im in enumerate(images):
        crops = [im[r:r + 6, c:c + 6] for r, c in corners]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_allclose(ten[i], scores(crops).mean(0), rtol=1e-5, atol=1e-6)
    assert ten.shape == (3, 4) and np.allclose(ten.sum(1), 1, atol=1e-5)
