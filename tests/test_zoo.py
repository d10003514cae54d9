"""The model zoo: every generated net wires in both phases, has the published parameter count, is written the way
Caffe users write nets, and nets/ holds exactly what the generators produce."""

from pathlib import Path

import pytest

from slim import proto as pb
from slim.deploy import make_deploy
from slim.errors import NetError
from slim.graph import build_graph
from slim.io.text import net_to_text, parse_net, read_net
from slim.zoo import ABOUT, VGG_CFGS, ZOO, densenet_cifar, preresnet_bottleneck_cifar, resnet_cifar, \
    stale_zoo_files, zoo_header

NETS = Path(__file__).resolve().parents[1] / "nets"


# ----- independent references for the parameter counts ----------------------------------------------------------

def _conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c):  # Scale's gamma and beta; BatchNorm's three statistics blobs are not learnable
    return 2 * c


def _fc(cin, cout):
    return cin * cout + cout


def vgg_cifar_reference(cfg, classes, channels=3):
    total, c = 0, channels
    for v in cfg:
        if v != "M":
            total += _conv(c, v, 3) + _bn(v)
            c = v
    return total + _fc(c, classes)


def resnet_cifar_reference(depth, classes=10, channels=3):
    # Option-A shortcuts have no parameters: only the convolutions, their BatchNorms and the classifier.
    n = (depth - 2) // 6
    total, c = _conv(channels, 16, 3) + _bn(16), 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += _conv(c, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            c = w
    return total + _fc(64, classes)


def preresnet164_reference(classes=10):
    total, c = _conv(3, 16, 3), 16
    for w in (16, 32, 64):
        for i in range(18):
            total += _bn(c) + _conv(c, w, 1) + _bn(w) + _conv(w, w, 3) + _bn(w) + _conv(w, 4 * w, 1)
            if i == 0:
                total += _conv(c, 4 * w, 1)  # the projection shortcut, without BatchNorm
            c = 4 * w
    return total + _bn(c) + _fc(c, classes)


def densenet40_reference(classes=10):
    total, c = _conv(3, 16, 3), 16
    for block in range(3):
        for _ in range(12):
            total += _bn(c) + _conv(c, 12, 3)
            c += 12
        total += _bn(c) + (_conv(c, c, 1) if block < 2 else 0)
    return total + _fc(c, classes)


# name -> (exact count, the table's figure in millions or None where the table gives the exact count)
EXPECTED = {
    "vgg19_cifar10": (20_035_018, None),
    "vgg19_cifar100": (vgg_cifar_reference(VGG_CFGS[19], 100), 20.08),
    "resnet164_cifar10": (preresnet164_reference(), 1.70),
    "densenet40_cifar10": (densenet40_reference(), 1.02),
    "resnet164_cifar100": (preresnet164_reference(100), None),
    "densenet40_cifar100": (densenet40_reference(100), None),
    "resnet20_cifar10": (resnet_cifar_reference(20), 0.27),
    "resnet32_cifar10": (resnet_cifar_reference(32), 0.46),
    "resnet56_cifar10": (resnet_cifar_reference(56), 0.85),
    "resnet110_cifar10": (resnet_cifar_reference(110), 1.73),
    "vgg16_imagenet": (138_357_544, None),
    "resnet50_imagenet": (25_557_032, None),
    "resnet50v15_imagenet": (25_557_032, 25.56),
    "resnet18_imagenet": (11_689_512, None),
    "mobilenet_v1_imagenet": (4_231_976, None),
    "mobilenet_v2_imagenet": (3_504_872, None),
    "vgg7_fashion": (vgg_cifar_reference([16, 16, "M", 32, 32, "M", 64, 64], 10, channels=1), None),
    "resnet20_fashion": (resnet_cifar_reference(20, channels=1), None),
    "demo_digits": (_conv(1, 32, 3) + _conv(32, 32, 3) + _conv(32, 64, 3) + _conv(64, 64, 3) + _conv(64, 128, 3)
                    + _bn(32 + 32 + 64 + 64 + 128) + _fc(128, 10), None),
}


def test_references_agree_with_the_published_figures():
    assert vgg_cifar_reference(VGG_CFGS[19], 10) == 20_035_018
    assert (resnet_cifar_reference(20), resnet_cifar_reference(56)) == (269_722, 853_018)
    assert (preresnet164_reference(), densenet40_reference()) == (1_703_258, 1_019_722)


def test_registry_is_complete():
    assert set(EXPECTED) == set(ZOO) == set(ABOUT)


def offline(net):
    """The net with each LMDB Data layer replaced by an Input layer of the same name, tops, rules and shapes.

    A Data layer learns its image shape from the database's first record, and the ImageNet LMDBs are not here;
    everything else (phase rules, wiring, shapes, parameters) is checked on the real layers.
    """
    out = pb.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type == "Data":
            batch, crop = layer.data_param.batch_size, layer.transform_param.crop_size
            layer.type = "Input"
            layer.ClearField("data_param")
            layer.ClearField("transform_param")
            layer.input_param.shape.add().dim.extend([batch, 3, crop, crop])
            layer.input_param.shape.add().dim.extend([batch])
    return out


def graph_of(net, phase="TEST"):
    return build_graph(offline(net), phase=phase)


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_net(request):
    return request.param, ZOO[request.param]()


def test_parameter_count(zoo_net):
    name, net = zoo_net
    exact, millions = EXPECTED[name]
    for phase in ("TRAIN", "TEST"):
        assert graph_of(net, phase).param_count == exact, (name, phase)
    if millions is not None:
        assert round(exact / 1e6, 2) == millions


def test_wiring_and_phases(zoo_net):
    name, net = zoo_net
    for phase in (pb.TRAIN, pb.TEST):
        data = [l for l in net.layer if l.type in ("SlimData", "Data") and l.include[0].phase == phase]
        assert len(data) == 1 and list(data[0].top) == ["data", "label"], (name, phase)
    train, test = graph_of(net, "TRAIN"), graph_of(net, "TEST")
    assert [n.name for n in train.loss_layers] == ["loss"] and train.layer("loss").type == "SoftmaxWithLoss"
    assert "accuracy" in test.outputs and "accuracy" not in train.outputs
    logits = test.layer("loss").bottom_shapes[0]
    assert logits == (test.layer("data").top_shapes[0][0], EXPECTED_CLASSES(name))


def EXPECTED_CLASSES(name):
    return 1000 if "imagenet" in name else 100 if "cifar100" in name else 10


def test_batchnorm_is_caffe_style(zoo_net):
    """Bias-free conv -> BatchNorm (no param{}) -> Scale(bias_term) in place; no in-place layer clobbers a blob that
    another layer also reads."""
    name, net = zoo_net
    graph = graph_of(net)
    nodes = graph.layers
    for i, node in enumerate(nodes):
        if node.type == "BatchNorm":
            assert not node.param.param, node.name
            assert not node.param.batch_norm_param.HasField("use_global_stats"), node.name
            scale = nodes[i + 1]
            assert scale.type == "Scale" and scale.param.scale_param.bias_term, node.name
            assert scale.bottoms == scale.tops == node.tops, node.name
            producer = nodes[graph.producer[node.bottom_ids[0]][0]]
            if producer.type == "Convolution":
                assert not producer.param.convolution_param.bias_term, producer.name
        if node.type == "Convolution":
            assert node.param.convolution_param.weight_filler.type == "msra", node.name
        if node.type == "InnerProduct":
            assert node.param.inner_product_param.weight_filler.type in ("xavier", "gaussian"), node.name
        if node.in_place:
            readers = graph.consumers[node.bottom_ids[0]]
            assert readers == [(node.index, 0)], f"{name}: {node.name} overwrites a blob that {readers} read"


def test_text_round_trip(zoo_net):
    _, net = zoo_net
    assert parse_net(net_to_text(net)) == net


def test_cifar_recipe():
    net = ZOO["vgg19_cifar10"]()
    train, test = (l for l in net.layer if l.type == "SlimData")
    assert train.slim_data_param.dataset == pb.SlimDataParameter.CIFAR10 and train.slim_data_param.train
    assert (train.slim_data_param.batch_size, test.slim_data_param.batch_size) == (64, 100)
    assert not test.slim_data_param.train
    t = train.transform_param
    assert (t.mirror, t.crop_size, t.pad, t.scale) == (True, 32, 4, 1 / 64) and len(t.mean_value) == 3
    assert not (test.transform_param.mirror or test.transform_param.crop_size or test.transform_param.pad)
    assert list(test.transform_param.mean_value) == list(t.mean_value)


def test_imagenet_recipe():
    net = ZOO["resnet50_imagenet"]()
    train, test = (l for l in net.layer if l.type == "Data")
    assert train.data_param.backend == pb.DataParameter.LMDB and train.data_param.source == "data/ilsvrc12_train_lmdb"
    assert (train.data_param.batch_size, test.data_param.batch_size) == (32, 50)
    assert list(train.transform_param.mean_value) == [104, 117, 123] and train.transform_param.crop_size == 224
    assert train.transform_param.mirror and not test.transform_param.mirror


def test_option_a_shortcut_is_stock_caffe():
    graph = build_graph(ZOO["resnet20_cifar10"](), phase="TEST")
    sub = graph.layer("res3_1/subsample")
    assert sub.param.pooling_param.round_mode == pb.PoolingParameter.FLOOR
    assert sub.param.pooling_param.kernel_size == 1 and sub.param.pooling_param.stride == 2
    assert graph.layer("res3_1/zeros").param.power_param.scale == 0
    assert graph.layer("res3_1/shortcut").top_shapes == graph.layer("res3_1/conv2").top_shapes == [(100, 32, 16, 16)]
    assert graph.layer("res4_1/shortcut").top_shapes == [(100, 64, 8, 8)]


def test_resnet50_is_kaiminghe_layout():
    graph = graph_of(ZOO["resnet50_imagenet"]())
    # The stride sits in the 1x1 branch2a, as in the released Caffe model; projections on each stage's first block.
    assert list(graph.layer("res3a_branch2a").param.convolution_param.stride) == [2]
    assert not graph.layer("res3a_branch2b").param.convolution_param.stride
    projections = sorted(n.name for n in graph.layers if n.name.endswith("_branch1") and n.type == "Convolution")
    assert projections == ["res2a_branch1", "res3a_branch1", "res4a_branch1", "res5a_branch1"]
    assert graph.layer("pool1").top_shapes == [(50, 64, 56, 56)]
    assert graph.layer("fc1000").bottom_shapes == [(50, 2048, 1, 1)]


def test_mobilenet_depthwise_groups():
    graph = graph_of(ZOO["mobilenet_v1_imagenet"]())
    for node in graph.layers:
        if node.name.endswith("/dw") and node.type == "Convolution":
            assert node.param.convolution_param.group == node.bottom_shapes[0][1] == node.top_shapes[0][1]


def test_depth_is_checked():
    for make, depth in ((resnet_cifar, 21), (preresnet_bottleneck_cifar, 100), (densenet_cifar, 41)):
        with pytest.raises(NetError, match="depth"):
            make(depth=depth)


def test_header_states_input_and_count():
    net = ZOO["resnet20_cifar10"]()
    header = zoo_header("resnet20_cifar10", net)
    assert all(line.startswith("# ") for line in header.splitlines())
    assert "data 3x32x32" in header and "269,722" in header and "He et al." in header


def test_nets_folder_is_up_to_date():
    if not NETS.is_dir():
        pytest.skip(f"{NETS} is absent; run python tools/zoo.py")
    assert stale_zoo_files(NETS) == [], "nets/ is stale: run python tools/zoo.py"


def test_nets_files_read_back():
    if not NETS.is_dir():
        pytest.skip(f"{NETS} is absent; run python tools/zoo.py")
    for name in ZOO:
        assert read_net(NETS / f"{name}.prototxt") == ZOO[name]()
        assert read_net(NETS / f"{name}_deploy.prototxt") == make_deploy(ZOO[name]())


def test_tiny_forward_through_slim_net():
    """The CIFAR ResNet deploy net runs, and its option-A shortcut is x[:, :, ::2, ::2] padded with zero channels."""
    torch = pytest.importorskip("torch")
    from slim.net import Net

    # TRAIN phase: fresh BatchNorm statistics are zero, and Caffe's TEST phase would divide by sqrt(eps) at each of
    # the 19 BatchNorms until the activations overflow; batch statistics keep an untrained net finite.
    net = Net(make_deploy(ZOO["resnet20_cifar10"](), batch=2), phase="TRAIN", seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = net(data=x, return_blobs=True)
    assert out["fc"].shape == (2, 10) and torch.isfinite(out["fc"]).all()
    inp, shortcut = out["res2_3"], out["res3_1/shortcut"]
    expected = torch.cat([inp[:, :, ::2, ::2], torch.zeros_like(inp[:, :, ::2, ::2])], dim=1)
    assert torch.equal(shortcut, expected)


def test_fashion_recipe():
    """Fashion-MNIST nets read the Debian package's IDX folder; the TEST layer states the whole 28x28 image as its
    crop, so the net's shapes are known without the data; TRAIN shifts (pad 2, random crop) and flips."""
    from slim.data import sample_shape

    for name in ("vgg7_fashion", "resnet20_fashion"):
        train, test = (l for l in ZOO[name]().layer if l.type == "SlimData")
        for layer in (train, test):
            p = layer.slim_data_param
            assert p.dataset == pb.SlimDataParameter.IDX and p.source == "/usr/share/datasets/fashion-mnist"
            assert layer.transform_param.crop_size == 28 and list(layer.transform_param.mean_value) == [73]
        assert train.slim_data_param.train and not test.slim_data_param.train and not test.slim_data_param.shuffle
        assert (train.transform_param.pad, train.transform_param.mirror) == (2, True)
        fractions = [l.batch_norm_param.moving_average_fraction for l in ZOO[name]().layer if l.type == "BatchNorm"]
        assert fractions and fractions == pytest.approx([0.99] * len(fractions))  # statistics of ~100 batches
        assert not (test.transform_param.pad or test.transform_param.mirror)
        absent = pb.LayerParameter()
        absent.CopyFrom(test)
        absent.slim_data_param.source = "/nonexistent/fashion-mnist"
        assert sample_shape(absent) == (1, 28, 28)
    graph = build_graph(ZOO["resnet20_fashion"](), phase="TEST")
    assert graph.layer("res3_1/shortcut").top_shapes == graph.layer("res3_1/conv2").top_shapes == [(100, 32, 14, 14)]
    assert graph.layer("res4_1/shortcut").top_shapes == [(100, 64, 7, 7)]
