"""make_deploy: Caffe's own train/test -> deploy pair, shape derivation per data layer type, label pruning, and
the deploy form of every zoo net."""

from pathlib import Path

import pytest
from google.protobuf import text_format

from slim import proto as pb
from slim.deploy import DATA_LAYER_TYPES, data_shape, make_deploy
from slim.errors import NetError
from slim.graph import build_graph
from slim.io.text import read_net
from slim.zoo import ZOO

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"


def caffe_net(name):
    path = TESTNETS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared Caffe test files are not beside this checkout)")
    return read_net(path)


def parse(text):
    return text_format.Parse(text, pb.NetParameter())


def input_of(deploy):
    layer = deploy.layer[0]
    assert layer.name == "input" and layer.type == "Input"
    return {top: tuple(shape.dim) for top, shape in zip(layer.top, layer.input_param.shape)}


TRAIN_TEST = '''
name: "tiny"
layer { name: "d" type: "SlimData" top: "data" top: "label" include { phase: TRAIN }
        slim_data_param { dataset: CIFAR10 batch_size: 8 } transform_param { crop_size: 32 pad: 4 mirror: true } }
layer { name: "d" type: "SlimData" top: "data" top: "label" include { phase: TEST }
        slim_data_param { dataset: CIFAR10 batch_size: 10 train: false } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: false } }
layer { name: "bn_kept" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true } }
layer { name: "train_only" type: "ReLU" bottom: "conv" top: "conv" include { phase: TRAIN } }
layer { name: "not_in_test" type: "ReLU" bottom: "conv" top: "conv" exclude { phase: TEST } }
layer { name: "staged" type: "ReLU" bottom: "conv" top: "conv" include { stage: "extra" } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" exclude { phase: TRAIN } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "onehot" type: "Power" bottom: "label" top: "scaled_label" }
layer { name: "mix" type: "Eltwise" bottom: "scaled_label" bottom: "scaled_label" top: "mix" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "aux" type: "EuclideanLoss" bottom: "ip" bottom: "ip" top: "aux" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
'''


def test_removes_data_losses_label_consumers_and_rules():
    net = parse(TRAIN_TEST)
    before = net.SerializeToString()
    deploy = make_deploy(net)
    assert net.SerializeToString() == before, "make_deploy must not modify its argument"
    assert [l.name for l in deploy.layer] == ["input", "conv", "bn", "bn_kept", "relu", "ip"]
    assert input_of(deploy) == {"data": (1, 3, 32, 32)}  # the TEST layer's shape: no crop
    assert all(not l.include and not l.exclude for l in deploy.layer)
    assert not deploy.layer[2].HasField("batch_norm_param"), "an explicit use_global_stats: false is dropped"
    assert deploy.layer[3].batch_norm_param.use_global_stats
    assert deploy.name == "tiny" and not deploy.HasField("state")
    graph = build_graph(deploy)
    assert graph.inputs == ["data"] and graph.outputs == ["ip"]


def test_idempotent_and_batch():
    deploy = make_deploy(parse(TRAIN_TEST), batch=7)
    assert input_of(deploy) == {"data": (7, 3, 32, 32)}
    assert make_deploy(deploy, batch=7) == deploy


def test_caffe_lenet_pair():
    """Caffe's lenet_train_test.prototxt derives to its hand-written lenet.prototxt (less the final Softmax)."""
    train_test = caffe_net("examples__mnist__lenet_train_test.prototxt")
    expected = caffe_net("examples__mnist__lenet.prototxt")
    with pytest.raises(NetError, match=r"'mnist'.*--input-shape data:C,H,W"):
        make_deploy(train_test)  # an LMDB without crop_size does not state its image size
    deploy = make_deploy(train_test, input_shapes={"data": (1, 28, 28)}, batch=64)
    assert input_of(deploy) == {"data": tuple(expected.layer[0].input_param.shape[0].dim)}
    assert expected.layer[-1].type == "Softmax"
    assert list(deploy.layer[1:]) == list(expected.layer[1:-1])


def test_caffe_cifar_quick_with_given_shape():
    deploy = make_deploy(caffe_net("examples__cifar10__cifar10_quick_train_test.prototxt"),
                         input_shapes={"data": (3, 32, 32)})
    graph = build_graph(deploy)
    assert graph.inputs == ["data"] and len(graph.outputs) == 1
    assert graph.layers[-1].top_shapes == [(1, 10)]
    assert not {l.type for l in deploy.layer[1:]} & (DATA_LAYER_TYPES | {"Accuracy", "SoftmaxWithLoss"})


def data_layer(text):
    return text_format.Parse(text, pb.LayerParameter())


@pytest.mark.parametrize("text, shape", [
    ('type: "SlimData" top: "data" slim_data_param { dataset: DIGITS }', (1, 8, 8)),
    ('type: "SlimData" top: "data" slim_data_param { dataset: SVHN }', (3, 32, 32)),
    ('type: "SlimData" top: "data" slim_data_param { dataset: CIFAR100 } transform_param { crop_size: 28 }',
     (3, 28, 28)),
    ('type: "SlimData" top: "data" slim_data_param { dataset: IMAGE_FOLDER new_height: 256 new_width: 256 } '
     'transform_param { crop_size: 224 }', (3, 224, 224)),
    ('type: "SlimData" top: "data" slim_data_param { dataset: IMAGE_FOLDER new_height: 64 new_width: 48 }',
     (3, 64, 48)),
    # Image folders are read in colour (force_gray is a Data layer's option), as slim.data reads them.
    ('type: "SlimData" top: "data" slim_data_param { dataset: IMAGE_FOLDER source: "absent" } '
     'transform_param { crop_size: 20 force_gray: true }', (3, 20, 20)),
    ('type: "WindowData" top: "data" transform_param { crop_size: 227 }', (3, 227, 227)),
    ('type: "DummyData" top: "data" top: "label" dummy_data_param { num: 2 channels: 3 height: 5 width: 4 }',
     (3, 5, 4)),
    ('type: "Data" top: "data" transform_param { crop_size: 227 }', (3, 227, 227)),
    ('type: "Data" top: "data" transform_param { crop_size: 28 force_gray: true }', (1, 28, 28)),
    ('type: "ImageData" top: "data" image_data_param { new_height: 40 new_width: 30 is_color: false }', (1, 40, 30)),
    ('type: "ImageData" top: "data" image_data_param { new_height: 40 new_width: 30 } '
     'transform_param { crop_size: 24 }', (3, 24, 24)),
    ('type: "MemoryData" top: "data" memory_data_param { batch_size: 5 channels: 2 height: 6 width: 7 }', (2, 6, 7)),
    ('type: "DummyData" top: "data" dummy_data_param { shape { dim: 5 dim: 4 dim: 3 } }', (4, 3)),
    ('type: "Input" top: "data" input_param { shape { dim: 5 dim: 3 dim: 9 dim: 9 } }', (3, 9, 9)),
])
def test_data_shape(text, shape):
    assert data_shape(data_layer('name: "d" ' + text)) == shape


@pytest.mark.parametrize("text", [
    'type: "Data" top: "data" data_param { source: "x_lmdb" }',
    'type: "ImageData" top: "data" image_data_param { new_height: 40 }',
    'type: "HDF5Data" top: "data" hdf5_data_param { source: "list.txt" }',
    'type: "SlimData" top: "data" slim_data_param { dataset: IMAGE_FOLDER }',
])
def test_underivable_shape_names_layer_and_flag(text):
    with pytest.raises(NetError, match=r"data layer 'd'.*--input-shape data:C,H,W"):
        data_shape(data_layer('name: "d" ' + text))


def test_input_shapes_override_and_errors():
    net = parse(TRAIN_TEST)
    assert input_of(make_deploy(net, input_shapes={"data": (3, 40, 40)}, batch=2)) == {"data": (2, 3, 40, 40)}
    with pytest.raises(NetError, match="'label'"):
        make_deploy(net, input_shapes={"label": (1,)})  # label is not an input of the deploy net
    with pytest.raises(NetError, match="positive"):
        make_deploy(net, input_shapes={"data": (3, 0, 40)})
    with pytest.raises(NetError, match="batch"):
        make_deploy(net, batch=0)


def test_several_inputs_and_unread_data_tops():
    net = parse('''
    layer { name: "a" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
    layer { name: "b" type: "DummyData" top: "z" top: "w" dummy_data_param { shape { dim: 2 dim: 5 } } }
    layer { name: "e" type: "Eltwise" bottom: "x" bottom: "y" top: "e" }
    layer { name: "r" type: "ReLU" bottom: "w" top: "r" }
    ''')
    # Input tops are all inputs; DummyData's second top is its label, so the ReLU on it goes, and z is not read.
    deploy = make_deploy(net, batch=3)
    assert input_of(deploy) == {"x": (3, 3, 4, 4), "y": (3, 3, 4, 4)}
    assert [l.name for l in deploy.layer] == ["input", "e"]


def test_legacy_header_is_refused():
    with pytest.raises(NetError, match="read_net"):
        make_deploy(parse('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8'))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_deploy(name):
    net = ZOO[name]()
    deploy = make_deploy(net)
    graph = build_graph(deploy)
    assert graph.inputs == ["data"]
    # The TEST data layer's own shape (slim.data.sample_shape), at batch 1; ImageNet LMDBs are not here, so their
    # recipes' 224x224 crops are taken as colour.
    test = build_graph(net, phase="TEST")
    assert graph.layer("input").top_shapes[0] == (1, *test.layer("data").top_shapes[0][1:])
    assert graph.param_count == test.param_count
    if any(l.type == "Data" for l in net.layer):
        assert graph.layer("input").top_shapes[0] == (1, 3, 224, 224)
    loss = next(l for l in net.layer if l.type == "SoftmaxWithLoss")
    assert graph.outputs == [loss.bottom[0]]
    assert not {l.type for l in deploy.layer[1:]} & (DATA_LAYER_TYPES | {"Accuracy", "SoftmaxWithLoss"})
    assert all(not l.include and not l.exclude for l in deploy.layer)
    assert all(not l.batch_norm_param.HasField("use_global_stats") for l in deploy.layer if l.type == "BatchNorm")


def test_softmax_flag_ends_like_bvlcs_deploy_files():
    # BVLC's deploy files end with a Softmax "prob"; slim's default ends at the logits (what calflop and pruning
    # compare), and --softmax gives BVLC's form: LeNet derives to Caffe's own lenet.prototxt exactly.
    train_test = caffe_net("examples__mnist__lenet_train_test.prototxt")
    expected = caffe_net("examples__mnist__lenet.prototxt")
    deploy = make_deploy(train_test, input_shapes={"data": (1, 28, 28)}, batch=64, softmax=True)
    assert list(deploy.layer[1:]) == list(expected.layer[1:])
    assert make_deploy(train_test, input_shapes={"data": (1, 28, 28)}).layer[-1].type == "InnerProduct"


def test_softmax_flag_on_a_net_and_its_errors(tmp_path, capsys):
    import torch

    from slim.cli import main
    from slim.net import Net
    deploy = make_deploy(parse(TRAIN_TEST), softmax=True)
    assert [(l.name, l.type, list(l.bottom)) for l in deploy.layer[-1:]] == [("prob", "Softmax", ["ip"])]
    out = Net(deploy)(data=torch.randn(1, 3, 32, 32))
    assert list(out) == ["prob"] and torch.allclose(out["prob"].sum(1), torch.ones(1))
    no_classifier = parse(TRAIN_TEST.replace('type: "SoftmaxWithLoss"', 'type: "EuclideanLoss"'))
    with pytest.raises(NetError, match="no SoftmaxWithLoss"):
        make_deploy(no_classifier, softmax=True)
    path = tmp_path / "net.prototxt"
    path.write_text(TRAIN_TEST)
    assert main(["deploy", str(path), "--softmax"]) == 0
    assert 'type: "Softmax"' in capsys.readouterr().out
