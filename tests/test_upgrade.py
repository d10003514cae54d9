"""Caffe's upgrades: V0 -> V1 -> V2 nets (text and binary), input headers, BatchNorm params, solver fields."""

import os
import warnings

import pytest

from slim import proto as pb
from slim.errors import ParseError, SolverError
from slim.io.text import parse_net, parse_solver, read_solver
from slim.io.upgrade import V0_LAYER_TYPES, V1_LAYER_TYPES, UpgradeWarning, upgrade_net, upgrade_solver


def _v2(text):
    """A hand-written expected V2 net, parsed without any upgrade."""
    return parse_net(text, upgrade=False)


def _upgraded(text, source="t.prototxt"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse_net(text, source)


# ---------------------------------------------------------------------------------------------------------------
# V0


# LeNet in the V0 format of BVLC's examples/lenet/lenet.prototxt (2014), with a separate padding layer in front of
# conv1 and a few more V0 types.
V0_LENET = """
name: "LeNet"
input: "data"
input_dim: 64 input_dim: 1 input_dim: 28 input_dim: 28
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer {
    name: "conv1" type: "conv" num_output: 20 kernelsize: 5 stride: 1 group: 1 biasterm: false
    weight_filler { type: "xavier" } bias_filler { type: "constant" }
    blobs_lr: 1. blobs_lr: 2. weight_decay: 1 weight_decay: 0
  }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "pool1" type: "pool" kernelsize: 2 stride: 2 pool: AVE } bottom: "conv1" top: "pool1" }
layers { layer { name: "ip1" type: "innerproduct" num_output: 500 weight_filler { type: "gaussian" std: 0.01 } }
         bottom: "pool1" top: "ip1" }
layers { layer { name: "relu1" type: "relu" } bottom: "ip1" top: "ip1" }
layers { layer { name: "drop1" type: "dropout" dropout_ratio: 0.3 } bottom: "ip1" top: "ip1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.1 beta: 0.5 k: 2 } bottom: "ip1" top: "norm1" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "norm1" bottom: "ip1" top: "cat" }
layers { layer { name: "prob" type: "softmax" } bottom: "cat" top: "prob" }
"""

V0_LENET_EXPECTED = """
name: "LeNet"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } } }
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 20 bias_term: false pad: 2 kernel_size: 5 group: 1 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" }
  }
}
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "norm1" type: "LRN" bottom: "ip1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.5 k: 2 } }
layer { name: "cat" type: "Concat" bottom: "norm1" bottom: "ip1" top: "cat" concat_param { concat_dim: 1 } }
layer { name: "prob" type: "Softmax" bottom: "cat" top: "prob" }
"""


def test_v0_net_upgrades_to_v2():
    assert _upgraded(V0_LENET) == _v2(V0_LENET_EXPECTED)


def test_v0_data_layers():
    net = _upgraded("""
        layers { layer { name: "mnist" type: "data" source: "train_lmdb" batchsize: 64 scale: 0.00390625
                         meanfile: "mean.binaryproto" cropsize: 24 mirror: true rand_skip: 5 } top: "data" }
        layers { layer { name: "img" type: "images" source: "list.txt" batchsize: 8 shuffle_images: true
                         new_height: 32 new_width: 30 } top: "im" }
        layers { layer { name: "win" type: "window_data" source: "w.txt" det_fg_threshold: 0.6 det_context_pad: 16
                         det_crop_mode: "square" } top: "w" }
        layers { layer { name: "h5" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" } } bottom: "w" }
    """)
    assert net == _v2("""
        layer { name: "mnist" type: "Data" top: "data"
                transform_param { scale: 0.00390625 mean_file: "mean.binaryproto" crop_size: 24 mirror: true }
                data_param { source: "train_lmdb" batch_size: 64 rand_skip: 5 } }
        layer { name: "img" type: "ImageData" top: "im"
                image_data_param { source: "list.txt" batch_size: 8 shuffle: true new_height: 32 new_width: 30 } }
        layer { name: "win" type: "WindowData" top: "w"
                window_data_param { source: "w.txt" fg_threshold: 0.6 context_pad: 16 crop_mode: "square" } }
        layer { name: "h5" type: "HDF5Output" bottom: "w" hdf5_output_param { file_name: "out.h5" } }
    """)


def test_v0_settings_without_meaning_are_dropped_with_one_warning():
    text = ('layers { layer { name: "r" type: "relu" num_output: 3 kernelsize: 2 } bottom: "x" top: "x" } '
            'input: "x"')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = parse_net(text, "old.prototxt")
    assert len(caught) == 1 and caught[0].category is UpgradeWarning
    message = str(caught[0].message)
    assert message.startswith("old.prototxt: ") and "num_output" in message and "kernelsize" in message
    assert net == _v2('layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')  # bare `input:` dropped


def test_v0_unknown_type_and_misplaced_padding():
    with pytest.raises(ParseError, match=r'^v0: V0 layer "x" has type "convolution", .*Known V0 types: .*conv'):
        parse_net('layers { layer { name: "x" type: "convolution" } }', "v0")
    with pytest.raises(ParseError, match=r'^v0: V0 padding layer "p" feeds layer "r" of type "relu"'):
        parse_net('input: "d" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" top: "p" } '
                  'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }', "v0")
    with pytest.raises(ParseError, match=r'^v0: V0 layer "c" reads blob "nowhere"'):
        parse_net('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }', "v0")


def test_every_v0_type_maps_to_a_v1_type():
    assert set(V0_LAYER_TYPES.values()) <= set(V1_LAYER_TYPES)
    for v0_type, v1_type in V0_LAYER_TYPES.items():
        net = _upgraded(f'layers {{ layer {{ name: "l" type: "{v0_type}" }} }}')
        assert net.layer[0].type == V1_LAYER_TYPES[v1_type] != ""


# ---------------------------------------------------------------------------------------------------------------
# V1


def test_every_v1_layer_type_maps_to_its_v2_string():
    enum = pb.V1LayerParameter.LayerType
    assert set(V1_LAYER_TYPES) == set(enum.values())
    spot = {"SOFTMAX_LOSS": "SoftmaxWithLoss", "CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct",
            "HDF5_DATA": "HDF5Data", "IM2COL": "Im2col", "TANH": "TanH", "ABSVAL": "AbsVal", "NONE": "",
            "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "DECONVOLUTION": "Deconvolution"}
    for name, string in spot.items():
        assert V1_LAYER_TYPES[enum.Value(name)] == string
    for name in enum.keys():
        assert _upgraded(f"layers {{ type: {name} }}").layer[0].type == V1_LAYER_TYPES[enum.Value(name)]


V1_FULL = """
name: "v1"
layers {
  name: "data" type: DATA top: "data" top: "label"
  data_param { source: "train_lmdb" batch_size: 64 scale: 0.5 mean_file: "m.binaryproto" crop_size: 3 mirror: true }
  include { phase: TRAIN stage: "s" }
}
layers {
  name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1
  param: "w_shared" param: "" param: "extra"
  blob_share_mode: PERMISSIVE
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } }
  transform_param { scale: 2 }
  exclude { phase: TEST }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "label" top: "loss" top: "prob"
         loss_weight: 1 loss_weight: 0 loss_param { ignore_label: 255 normalization: FULL }
         softmax_param { axis: 1 } }
layers { name: "acc" type: ACCURACY bottom: "conv" bottom: "label" top: "acc" accuracy_param { top_k: 5 } }
"""

V1_FULL_EXPECTED = """
name: "v1"
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TRAIN stage: "s" }
  transform_param { scale: 0.5 mean_file: "m.binaryproto" crop_size: 3 mirror: true }
  data_param { source: "train_lmdb" batch_size: 64 }
}
layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { name: "w_shared" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
  param { name: "" lr_mult: 2 }
  param { name: "extra" }
  exclude { phase: TEST }
  transform_param { scale: 2 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "conv" bottom: "label" top: "loss" top: "prob"
        loss_weight: 1 loss_weight: 0 loss_param { ignore_label: 255 normalization: FULL }
        softmax_param { axis: 1 } }
layer { name: "acc" type: "Accuracy" bottom: "conv" bottom: "label" top: "acc" accuracy_param { top_k: 5 } }
"""


def test_v1_net_upgrades_every_field():
    # Also the data transformation step: scale/mean_file/crop_size/mirror leave data_param for transform_param.
    assert _upgraded(V1_FULL) == _v2(V1_FULL_EXPECTED)


def test_v1_upgrade_returns_true_and_is_idempotent():
    net = parse_net(V1_FULL, upgrade=False)
    assert len(net.layers) == 4
    assert upgrade_net(net, "x") is True
    again = pb.NetParameter()
    again.CopyFrom(net)
    assert upgrade_net(again, "x") is False and again == net


def test_modern_net_is_unchanged():
    net = _v2(V1_FULL_EXPECTED)
    before = net.SerializeToString()
    assert upgrade_net(net, "x") is False
    assert net.SerializeToString() == before


def test_mixing_layer_and_layers_is_a_parse_error():
    text = 'layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }\n'
    with pytest.raises(ParseError, match=r"^nets/mixed\.prototxt: the net has both V2 `layer \{\}` entries \(1\) "
                                         r"and V1 `layers \{\}` entries \(1\)"):
        parse_net(text, "nets/mixed.prototxt")
    assert len(parse_net(text, upgrade=False).layers) == 1  # upgrade=False leaves the mix for the caller


def _blob(values, legacy_dims=None, dims=None):
    blob = pb.BlobProto()
    blob.data.extend(values)
    if legacy_dims:
        blob.num, blob.channels, blob.height, blob.width = legacy_dims
    if dims:
        blob.shape.dim.extend(dims)
    return blob


def test_v1_caffemodel_keeps_its_blobs():
    # A binary V1 .caffemodel: layers carry blobs with legacy 4-D dims; the header is a bare `input:`.
    old = pb.NetParameter(name="m")
    old.input.append("data")
    conv = old.layers.add(name="conv1", type=pb.V1LayerParameter.CONVOLUTION, bottom=["data"], top=["conv1"])
    conv.blobs.append(_blob([0.5, -1.25, 3.0, 4.0], legacy_dims=(2, 1, 1, 2)))
    conv.blobs.append(_blob([0.1, 0.2], legacy_dims=(1, 1, 1, 2)))
    conv.blobs_lr.extend([1, 2])
    ip = old.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT, bottom=["conv1"], top=["ip"])
    ip.blobs.append(_blob([1.0, 2.0], dims=[1, 2]))
    net = pb.NetParameter.FromString(old.SerializeToString())
    assert upgrade_net(net, "old.caffemodel") is True
    assert not net.layers and not net.input
    assert [layer.name for layer in net.layer] == ["conv1", "ip"]  # no Input layer for a bare `input:`
    assert list(net.layer[0].blobs) == list(conv.blobs) and list(net.layer[1].blobs) == list(ip.blobs)
    first = net.layer[0].blobs[0]
    assert (first.num, first.channels, first.height, first.width) == (2, 1, 1, 2) and not first.HasField("shape")
    assert [p.lr_mult for p in net.layer[0].param] == [1, 2]


def test_v0_caffemodel_keeps_its_blobs():
    old = pb.NetParameter()
    v1 = old.layers.add(bottom=["data"], top=["conv1"])
    v1.layer.name, v1.layer.type, v1.layer.num_output = "conv1", "conv", 2
    v1.layer.blobs.append(_blob([1.0, 2.0, 3.0, 4.0], legacy_dims=(2, 2, 1, 1)))
    old.input.append("data")
    net = pb.NetParameter.FromString(old.SerializeToString())
    assert upgrade_net(net, "v0.caffemodel")
    assert net.layer[0].type == "Convolution" and net.layer[0].convolution_param.num_output == 2
    assert list(net.layer[0].blobs) == list(v1.layer.blobs)


def test_any_v0_layer_sends_the_whole_net_through_the_v0_upgrade():
    # As in Caffe, one nested V0 `layer` makes the net V0: every layer is rebuilt from its V0 part.
    net = pb.NetParameter()
    net.layers.add(name="v1_name", type=pb.V1LayerParameter.RELU).layer.name = "old"
    net.layers[0].layer.type = "relu"
    assert upgrade_net(net, "x")
    assert [(layer.name, layer.type) for layer in net.layer] == [("old", "ReLU")]


# ---------------------------------------------------------------------------------------------------------------
# Input header


def test_input_dim_header_becomes_an_input_layer_first():
    net = _upgraded('input: "data" input: "label" input_dim: 10 input_dim: 3 input_dim: 32 input_dim: 32 '
                    'input_dim: 10 input_dim: 1 input_dim: 1 input_dim: 1 '
                    'layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }')
    assert net == _v2('layer { name: "input" type: "Input" top: "data" top: "label" input_param { '
                      'shape { dim: [10, 3, 32, 32] } shape { dim: [10, 1, 1, 1] } } } '
                      'layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }')


def test_input_shape_header():
    net = _upgraded('name: "n" input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 } '
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" } force_backward: true')
    assert net == _v2('name: "n" force_backward: true layer { name: "input" type: "Input" top: "data" '
                      'input_param { shape: { dim: [1, 3, 8, 8] } } } '
                      'layer { name: "c" type: "Convolution" bottom: "data" top: "c" }')


def test_v1_with_input_dim_header():
    net = _upgraded('input: "data" input_dim: [1, 3, 4, 4] layers { name: "r" type: RELU bottom: "data" top: "r" }')
    assert [(layer.name, layer.type) for layer in net.layer] == [("input", "Input"), ("r", "ReLU")]


@pytest.mark.parametrize("header, words", [
    ('input: "a" input_dim: 1 input_dim: 2 input_dim: 3', "3 input_dim values"),
    ('input: "a" input: "b" input_shape { dim: 1 }', "1 input_shape(s)"),
    ('input: "a" input_shape { dim: 1 } input_dim: [1, 2, 3, 4]', "both input_shape and input_dim"),
])
def test_inconsistent_input_headers(header, words):
    with pytest.raises(ParseError) as info:
        parse_net(header, "h.prototxt")
    assert str(info.value).startswith("h.prototxt: ") and words in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm


def test_batchnorm_with_three_params_is_frozen():
    net = _upgraded('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 name: "m" } param { decay_mult: 3 } '
                    'param { } } '
                    'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } } '
                    'layer { name: "conv" type: "Convolution" param { } param { } param { } }')
    assert net == _v2('layer { name: "bn" type: "BatchNorm" param { name: "m" lr_mult: 0 decay_mult: 0 } '
                      'param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 } } '
                      'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } } '
                      'layer { name: "conv" type: "Convolution" param { } param { } param { } }')
    assert upgrade_net(net, "x") is False  # already frozen: nothing changes


# ---------------------------------------------------------------------------------------------------------------
# Solver


@pytest.mark.parametrize("enum, string", [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
                                          ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_becomes_type(enum, string):
    solver = parse_solver(f"base_lr: 0.1 solver_type: {enum}")
    assert solver.type == string and not solver.HasField("solver_type")


def test_solver_type_and_type_together_is_an_error():
    with pytest.raises(SolverError, match=r'^solvers/s\.prototxt: the solver sets both the deprecated solver_type '
                                          r'\(NESTEROV\) and type \("Adam"\)'):
        parse_solver('solver_type: NESTEROV type: "Adam"', "solvers/s.prototxt")


def test_upgrade_solver_return_value():
    solver = pb.SolverParameter(type="Adam")
    assert upgrade_solver(solver, "x") is False and solver.type == "Adam"
    solver = pb.SolverParameter(solver_type=pb.SolverParameter.ADAM)
    assert upgrade_solver(solver, "x") is True and solver.type == "Adam"


def test_inline_nets_in_a_solver_are_not_upgraded():
    # Caffe upgrades only nets it reads from files; BVLC's lenet_consolidated_solver embeds a stale V1 net.
    solver = parse_solver('net_param { layers { name: "r" type: RELU } input: "x" input_dim: [1, 1, 1, 1] }')
    assert len(solver.net_param.layers) == 1 and not solver.net_param.layer


def test_snapshot_prefix_unset_becomes_the_solver_path_without_extension(tmp_path):
    path = tmp_path / "lenet_solver.prototxt"
    path.write_text('net: "nets/lenet.prototxt" base_lr: 0.01\n')
    assert read_solver(path).snapshot_prefix == str(tmp_path / "lenet_solver")
    assert read_solver(str(path)).snapshot_prefix == str(tmp_path / "lenet_solver")
    assert parse_solver(path.read_text()).snapshot_prefix == ""  # only solvers read from files get the rule


def test_snapshot_prefix_directory_gets_the_solver_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Caffe tests the prefix as a path from the working directory
    (tmp_path / "snaps").mkdir()
    (tmp_path / "solvers").mkdir()
    path = tmp_path / "solvers" / "vgg.prototxt"
    path.write_text('net: "nets/vgg.prototxt" snapshot_prefix: "snaps"\n')
    assert read_solver(path).snapshot_prefix == os.path.join("snaps", "vgg")
    path.write_text('net: "nets/vgg.prototxt" snapshot_prefix: "snaps/"\n')
    assert read_solver(path).snapshot_prefix == "snaps/vgg"
    path.write_text('net: "nets/vgg.prototxt" snapshot_prefix: "snaps/vgg_sparse"\n')
    solver = read_solver(path)
    assert solver.snapshot_prefix == "snaps/vgg_sparse"  # not a directory: kept as written
    assert solver.net == "nets/vgg.prototxt"  # and net paths are never resolved
