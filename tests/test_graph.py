"""NetGraph: NetState filtering, wiring, outputs, loss weights, shape inference and errors (no torch needed)."""

import subprocess
import sys

import pytest
from google.protobuf import text_format

from slim import proto as pb
from slim.errors import NetError
from slim.graph import build_graph

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: %d dim: %d } } }\n'


def net(text, h=8, w=8, with_input=True):
    return text_format.Parse((INPUT % (h, w) if with_input else "") + text, pb.NetParameter())


def shapes(text, **kw):
    g = build_graph(net(text, **kw))
    return {n.name: n.top_shapes for n in g.layers}


TRAIN_VAL = '''
layer { name: "d" type: "Input" top: "data" top: "label" include { phase: TRAIN }
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "d" type: "Input" top: "data" top: "label" include { phase: TEST }
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "lvl" type: "ReLU" bottom: "ip" top: "lvl" include { min_level: 2 } }
layer { name: "stg" type: "ReLU" bottom: "ip" top: "stg" include { stage: "deploy" } }
layer { name: "nostg" type: "ReLU" bottom: "ip" top: "nostg" exclude { stage: "deploy" } }
'''


def test_phase_filtering_and_inheritance():
    p = text_format.Parse(TRAIN_VAL, pb.NetParameter())
    train = build_graph(p, "TRAIN")
    test = build_graph(p, "TEST")
    assert [n.name for n in train.layers] == ["d", "ip", "drop", "loss", "nostg"]
    assert [n.name for n in test.layers] == ["d", "ip", "drop", "loss", "acc", "nostg"]
    assert train.layers[0].top_shapes == [(4, 3, 8, 8), (4,)]
    assert all(n.param.phase == pb.TRAIN for n in train.layers)
    assert all(n.param.phase == pb.TEST for n in test.layers)
    assert test.outputs == ["accuracy", "loss", "nostg"]  # alphabetical, as Caffe's std::set


def test_levels_and_stages():
    p = text_format.Parse(TRAIN_VAL, pb.NetParameter())
    names = [n.name for n in build_graph(p, "TEST", level=2, stages=["deploy"]).layers]
    assert "lvl" in names and "stg" in names and "nostg" not in names


def test_loss_weights_default_and_explicit():
    p = text_format.Parse(TRAIN_VAL, pb.NetParameter())
    g = build_graph(p, "TEST")
    assert g.layer("loss").loss_weights == [1.0]
    assert g.layer("acc").loss_weights == [0.0]
    assert g.layer("ip").loss_weights == [0.0]
    p.layer[4].loss_weight.extend([1.0, 2.0])
    with pytest.raises(NetError, match="loss_weight"):
        build_graph(p, "TEST")


def test_in_place_versions_and_unconsumed_input_is_output():
    g = build_graph(net('''
layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "data" }
layer { name: "a" type: "AbsVal" bottom: "data" top: "a" }
layer { name: "b" type: "AbsVal" bottom: "data" top: "b" }'''))
    assert g.layer("relu").top_ids == ["data@1"] and g.layer("sig").top_ids == ["data@2"]
    assert g.layer("a").bottom_ids == ["data@2"] and g.layer("b").bottom_ids == ["data@2"]  # fan-out
    assert g.consumers["data@2"] == [(3, 0), (4, 0)]
    assert g.outputs == ["a", "b"]


def test_errors_name_layer_and_blob():
    with pytest.raises(NetError, match=r"'x'.*unknown bottom blob 'nope'"):
        build_graph(net('layer { name: "x" type: "ReLU" bottom: "nope" top: "y" }'))
    with pytest.raises(NetError, match=r"blob 'z' is produced by layer 'y' and also by 'x'"):
        build_graph(net('layer { name: "x" type: "AbsVal" bottom: "data" top: "z" }'
                        'layer { name: "y" type: "AbsVal" bottom: "data" top: "z" }'))
    with pytest.raises(NetError, match=r"only produced later by layer 'b'.*cycle"):
        build_graph(net('layer { name: "a" type: "ReLU" bottom: "y" top: "x" }'
                        'layer { name: "b" type: "ReLU" bottom: "data" top: "y" }'))
    with pytest.raises(NetError, match=r"unknown type 'Frobnicate'.*Supported types: .*Convolution"):
        build_graph(net('layer { name: "x" type: "Frobnicate" bottom: "data" top: "y" }'))
    with pytest.raises(NetError, match=r"Python layer.*refuses to execute"):
        build_graph(net('layer { name: "x" type: "Python" bottom: "data" top: "y" '
                        'python_param { module: "os" layer: "system" } }'))
    with pytest.raises(NetError, match=r"layer 'c'.*kernel extent 11 is larger than the padded input 8.*'data'"):
        build_graph(net('layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                        'convolution_param { num_output: 2 kernel_size: 11 } }'))
    with pytest.raises(NetError, match=r"both include and exclude"):
        build_graph(net('layer { name: "c" type: "ReLU" bottom: "data" top: "c" include { phase: TEST } '
                        'exclude { phase: TRAIN } }'))
    with pytest.raises(NetError, match=r"two layers are named 'c'"):
        build_graph(net('layer { name: "c" type: "ReLU" bottom: "data" top: "c" }'
                        'layer { name: "c" type: "ReLU" bottom: "c" top: "d" }'))
    with pytest.raises(NetError, match=r"expects exactly 1 bottoms, found 2"):
        build_graph(net('layer { name: "c" type: "ReLU" bottom: "data" bottom: "data" top: "c" }'))


@pytest.mark.parametrize("h,k,s,p,ceil,expected", [
    (6, 1, 2, 0, True, 4),      # Caffe keeps a last window starting at the border when pad == 0 (torch: 3)
    (112, 3, 2, 0, True, 56),
    (113, 3, 2, 0, True, 56),
    (112, 3, 2, 1, True, 57),   # the ResNet stem: Caffe 57 where torchvision-style floor gives 56
    (7, 3, 2, 1, True, 4),
    (32, 1, 2, 0, False, 16),   # FLOOR
    (5, 2, 2, 1, True, 3),
    (6, 3, 3, 2, True, 3),
])
def test_pooling_output_size(h, k, s, p, ceil, expected):
    mode = "" if ceil else "round_mode: FLOOR"
    out = shapes(f'layer {{ name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param {{ pool: MAX '
                 f'kernel_size: {k} stride: {s} pad: {p} {mode} }} }}', h=h, w=h)["p"][0]
    assert out == (2, 3, expected, expected)


def test_shape_rules_of_the_structural_layers():
    s = shapes('''
layer { name: "g" type: "Pooling" bottom: "data" top: "g" pooling_param { pool: AVE global_pooling: true } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 6 group: 3 kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "dil" type: "Convolution" bottom: "data" top: "dil" convolution_param { num_output: 4 kernel_size: 3 dilation: 2 } }
layer { name: "dc" type: "Deconvolution" bottom: "data" top: "dc" convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 7 axis: 2 } }
layer { name: "r" type: "Reshape" bottom: "data" top: "r" reshape_param { shape { dim: 0 dim: -1 dim: 4 } } }
layer { name: "r2" type: "Reshape" bottom: "data" top: "r2" reshape_param { axis: 2 shape { dim: 64 } } }
layer { name: "sl" type: "Slice" bottom: "data" top: "s1" top: "s2" slice_param { slice_point: 1 } }
layer { name: "cat" type: "Concat" bottom: "s2" bottom: "data" top: "cat" }
layer { name: "cat2" type: "Concat" bottom: "data" bottom: "data" top: "cat2" concat_param { axis: -1 } }
layer { name: "fl" type: "Flatten" bottom: "data" top: "fl" }
layer { name: "fl2" type: "Flatten" bottom: "data" top: "fl2" flatten_param { axis: 2 } }
layer { name: "cr" type: "Crop" bottom: "data" bottom: "g" top: "cr" crop_param { axis: 2 offset: 3 } }
''')
    assert s["g"] == [(2, 3, 1, 1)]
    assert s["c"] == [(2, 6, 4, 8)]
    assert s["dil"] == [(2, 4, 4, 4)]
    assert s["dc"] == [(2, 4, 16, 16)]
    assert s["ip"] == [(2, 3, 7)]
    assert s["r"] == [(2, 48, 4)]
    assert s["r2"] == [(2, 3, 64)]
    assert s["sl"] == [(2, 1, 8, 8), (2, 2, 8, 8)]
    assert s["cat"] == [(2, 5, 8, 8)]
    assert s["cat2"] == [(2, 3, 8, 16)]
    assert s["fl"] == [(2, 192)]
    assert s["fl2"] == [(2, 3, 64)]
    assert s["cr"] == [(2, 3, 1, 1)]


def test_param_count_and_weight_sharing():
    g = build_graph(net('''
layer { name: "a" type: "Convolution" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" param { name: "w" } param { name: "b" }
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "b" top: "b" }
layer { name: "sc" type: "Scale" bottom: "b" top: "b" scale_param { bias_term: true } }'''))
    assert g.layer("b").blob_specs[0].owner == ("a", 0)
    assert g.param_count == 3 * 3 * 9 + 3 + 6  # shared conv counted once, BatchNorm statistics not at all
    assert [s.lr_mult for s in g.layer("bn").blob_specs] == [0, 0, 0]
    with pytest.raises(NetError, match=r"shares param 'w' with layer 'a'"):
        build_graph(net('''
layer { name: "a" type: "Convolution" bottom: "data" top: "a" param { name: "w" } convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "b" type: "Convolution" bottom: "a" top: "b" param { name: "w" } convolution_param { num_output: 3 kernel_size: 1 } }'''))
    with pytest.raises(NetError, match=r"lr_mult 0"):
        build_graph(net('layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" param { lr_mult: 1 } }'))


def test_graph_does_not_import_torch():
    code = ("import sys; from google.protobuf import text_format; from slim import proto as pb; "
            "from slim.graph import build_graph; "
            "n = text_format.Parse('layer { name: \"d\" type: \"Input\" top: \"d\" input_param { shape { dim: 1 "
            "dim: 3 dim: 8 dim: 8 } } } layer { name: \"c\" type: \"Convolution\" bottom: \"d\" top: \"c\" "
            "convolution_param { num_output: 4 kernel_size: 3 } }', pb.NetParameter()); "
            "g = build_graph(n); assert g.layers[1].top_shapes == [(1, 4, 6, 6)]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
