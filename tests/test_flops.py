"""calflop: MACs under each convention against hand computation and the published figures, parameters, activation
memory, uncounted layers, baseline comparison, latency measurement, and the command's text/JSON/CSV output."""

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slim.cli import main
from slim.errors import NetError
from slim.flops import calflop, compare, measure_latency
from slim.graph import build_graph
from slim.io import parse_net

ROOT = Path(__file__).resolve().parents[1]
TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"
NETS = ROOT / "nets"

# ---------------------------------------------------------------------------------------------------------------
# Inline nets
# ---------------------------------------------------------------------------------------------------------------


def _conv(name, bottom, num_output, kernel=3, pad=1, bias=True):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {num_output} kernel_size: {kernel} pad: {pad} bias_term: {str(bias).lower()} }} }}\n')


def _relu(name, blob):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'


def _pool(name, bottom, method="MAX", kernel=2, stride=2):
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" pooling_param {{ pool: {method} '
            f'kernel_size: {kernel} stride: {stride} }} }}\n')


def _fc(name, bottom, num_output):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" inner_product_param {{ '
            f'num_output: {num_output} }} }}\n')


def vgg_text(cfg, *, batch, size, fcs, batch_norm, final_pool=None, legacy_input=False):
    """A VGG prototxt: ``cfg`` widths and "M" (2x2 max pooling), then ``final_pool`` and InnerProducts ``fcs``."""
    if legacy_input:  # the old deploy header, as in BVLC's model zoo (upgraded to an Input layer on reading)
        text = f'name: "vgg"\ninput: "data"\ninput_dim: {batch}\ninput_dim: 3\ninput_dim: {size}\ninput_dim: {size}\n'
    else:
        text = (f'name: "vgg"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} '
                f'dim: 3 dim: {size} dim: {size} }} }} }}\n')
    x, stage, index, pools = "data", 1, 1, 0
    for item in cfg:
        if item == "M":
            pools += 1
            text += _pool(f"pool{pools}", x)
            x = f"pool{pools}"
            stage, index = stage + 1, 1
            continue
        name = f"conv{stage}_{index}"
        text += _conv(name, x, item, bias=not batch_norm)
        x = name
        if batch_norm:
            text += (f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{x}" top: "{x}" }}\n'
                     f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{x}" top: "{x}" '
                     f'scale_param {{ bias_term: true }} }}\n')
        text += _relu(f"relu{stage}_{index}", x)
        index += 1
    if final_pool:
        text += _pool("pool_final", x, "AVE", final_pool, final_pool)
        x = "pool_final"
    for i, n in enumerate(fcs):
        name = f"fc{i + 1}"
        text += _fc(name, x, n)
        x = name
        if i + 1 < len(fcs):
            text += _relu(f"relu_fc{i + 1}", x)
            text += (f'layer {{ name: "drop{i + 1}" type: "Dropout" bottom: "{x}" top: "{x}" '
                     f'dropout_param {{ dropout_ratio: 0.5 }} }}\n')
    return text


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG19_CIFAR = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


def vgg16(batch=10):
    return parse_net(vgg_text(VGG16, batch=batch, size=224, fcs=[4096, 4096, 1000], batch_norm=False,
                              legacy_input=True), "vgg16_inline")


def vgg19_cifar(batch=1):
    return parse_net(vgg_text(VGG19_CIFAR, batch=batch, size=32, fcs=[10], batch_norm=True, final_pool=2),
                     "vgg19_cifar_inline")


# A tiny net for hand computation: batch 2, a grouped strided conv, BN + Scale in place, ReLU in place, pooling, a
# grouped strided Deconvolution, a Flatten (shares its bottom's data), an InnerProduct and a Concat.
TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "pool" top: "deconv"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 7 } }
layer { name: "cat" type: "Concat" bottom: "ip" bottom: "ip" top: "cat" concat_param { axis: 1 } }
layer { name: "silence" type: "Silence" bottom: "deconv" }
"""

# Per image, by hand.
TINY_MACS = {
    "data": 0,
    "conv": 5 * 5 * 6 * (4 // 2) * 3 * 3,          # out 5x5 = (9 + 2 - 3) // 2 + 1; Cin/group = 2
    "bn": 6 * 5 * 5,
    "scale": 6 * 5 * 5,
    "relu": 6 * 5 * 5,
    "pool": 6 * 3 * 3 * 2 * 2,                       # CEIL: ceil((5 - 2) / 2) + 1 = 3; 2x2 window per output
    "deconv": 3 * 3 * 6 * (4 // 2) * 2 * 2,          # H_in W_in Cin (Cout/group) k k: the transposed conv's cost
    "flat": 0,
    "ip": 54 * 7,
    "cat": 0,
    "silence": 0,
}
TINY_PARAMS = {"conv": 6 * 2 * 3 * 3 + 6, "scale": 6 + 6, "deconv": 6 * 2 * 2 * 2 + 4, "ip": 54 * 7 + 7}
TINY_BN_STATS = 6 + 6 + 1
TINY_ACTIVATIONS = {"data": 4 * 81 * 4, "conv": 6 * 25 * 4, "pool": 54 * 4, "deconv": 4 * 6 * 6 * 4, "ip": 7 * 4,
                    "cat": 14 * 4}  # bytes per image; in-place layers and Flatten add nothing


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(argv):
    """slim.cli.main(argv) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Known figures
# ---------------------------------------------------------------------------------------------------------------

def test_vgg16_imagenet_figures_per_image():
    report = calflop(vgg16(batch=10))
    assert report.batch == 10  # the legacy input_dim header's batch; every figure is divided by it
    assert report.macs("conv") == 15_346_630_656
    assert report.macs("conv+fc") == 15_470_264_320
    assert report.flops("conv+fc") == 2 * 15_470_264_320
    assert report.params == 138_357_544
    assert report.macs("all") > report.macs("conv+fc")
    assert calflop(vgg16(batch=1)).macs("all") == report.macs("all")


def test_vgg19_cifar_figures():
    report = calflop(vgg19_cifar(batch=4))
    assert report.macs("conv") == 398_131_200
    assert report.macs("conv+fc") == 398_136_320
    assert report.params == 20_035_018  # BatchNorm statistics excluded
    bn_stats = sum(2 * c + 1 for c in VGG19_CIFAR if c != "M")
    assert report.blob_elements == report.params + bn_stats


def _resnet50_macs(stride_on_3x3: bool) -> int:
    """ResNet-50 conv+FC MACs at 224 by hand: KaimingHe's Caffe layout strides the first 1x1 of a downsampling block
    (the paper's 3.8 GFLOPs), torchvision's "v1.5" strides the 3x3 (its 4.09 GFLOPs)."""
    total = 112 * 112 * 64 * 3 * 7 * 7
    size, cin = 56, 64
    for blocks, mid, out, stride in ((3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            small = size // s
            total += (size if stride_on_3x3 else small) ** 2 * mid * cin
            total += small ** 2 * mid * mid * 9 + small ** 2 * out * mid
            if b == 0:
                total += small ** 2 * out * cin
            cin, size = out, small
    return total + 2048 * 1000


def _resnet56_macs() -> int:
    """ResNet-56 for CIFAR by hand: 3x3 convolutions only (option-A shortcuts have no parameters), FC 64 -> 10."""
    total = 32 * 32 * 16 * 3 * 9
    for size, width, first_in in ((32, 16, 16), (16, 32, 16), (8, 64, 32)):
        total += size * size * width * first_in * 9 + 17 * size * size * width * width * 9
    return total + 64 * 10


def _zoo_or_file(name):
    """The zoo net from nets/<name>.prototxt if present, else from the generator in slim.zoo."""
    path = NETS / f"{name}.prototxt"
    if path.is_file():
        return str(path)
    zoo = pytest.importorskip("slim.zoo", reason="neither nets/ nor slim.zoo is available")
    if name.removesuffix("_deploy") not in zoo.ZOO:
        pytest.skip(f"{path} is absent and slim.zoo has no {name!r}")
    net = zoo.ZOO[name.removesuffix("_deploy")]()
    if name.endswith("_deploy"):
        from slim.deploy import make_deploy
        net = make_deploy(net)
    return net


def test_resnet56_cifar():
    report = calflop(_zoo_or_file("resnet56_cifar10"))
    assert report.macs("conv+fc") == _resnet56_macs() == 125_485_696  # "about 125.49M"
    assert round(report.macs("conv+fc") / 1e6, 2) == 125.49
    assert report.uncounted == []


def test_resnet50_imagenet():
    net = _zoo_or_file("resnet50_imagenet_deploy")
    report = calflop(net)
    # The Caffe layout (stride 2 on branch2a) is 3.86 G; moving the stride to branch2b gives torchvision's 4.09 G.
    assert report.macs("conv+fc") == _resnet50_macs(stride_on_3x3=False) == 3_857_973_248
    assert report.params == 25_557_032
    net = parse_net(Path(net).read_text()) if isinstance(net, str) else net
    for layer in net.layer:
        if layer.name.endswith("branch2a") and list(layer.convolution_param.stride) == [2]:
            del layer.convolution_param.stride[:]
            twin = next(l for l in net.layer if l.name == layer.name[:-1] + "b")
            twin.convolution_param.stride[:] = [2]
    v15 = calflop(net).macs("conv+fc")
    assert v15 == _resnet50_macs(stride_on_3x3=True) == 4_089_184_256
    assert round(v15 / 1e9, 2) == 4.09


@pytest.mark.parametrize("name,conv,conv_fc", [("vgg16_imagenet_deploy", 15_346_630_656, 15_470_264_320),
                                               ("vgg19_cifar10", 398_131_200, 398_136_320),
                                               ("resnet50v15_imagenet_deploy", 4_087_136_256, 4_089_184_256)])
def test_zoo_vgg_files(name, conv, conv_fc):
    path = NETS / f"{name}.prototxt"
    if not path.is_file():
        pytest.skip(f"{path} has not been generated (python tools/zoo.py)")
    report = calflop(path)
    assert (report.macs("conv"), report.macs("conv+fc")) == (conv, conv_fc)


def test_every_zoo_file_is_fully_counted():
    files = sorted(NETS.glob("*.prototxt"))
    if not files:
        pytest.skip(f"no nets in {NETS} (python tools/zoo.py writes them)")
    reports = {}
    for path in files:
        if any(layer.type == "Data" for layer in parse_net(path.read_text()).layer):
            continue  # Caffe's Data layer shapes its tops from the LMDB's first record, which tests do not have
        report = reports[path.name] = calflop(path)
        assert report.uncounted == [], path.name
        assert report.params == build_graph(path).param_count, path.name
    for name, report in reports.items():  # a train/test net and its deploy net cost the same per image
        deploy = reports.get(name.replace(".prototxt", "_deploy.prototxt"))
        if deploy is not None and deploy is not report:
            assert (deploy.macs("conv"), deploy.macs("conv+fc"), deploy.params) == \
                (report.macs("conv"), report.macs("conv+fc"), report.params), name


@pytest.mark.parametrize("name", ["models__bvlc_alexnet__deploy.prototxt", "v1__models__bvlc_alexnet__deploy.prototxt"])
def test_real_alexnet_deploy(name):
    path = TESTNETS / name
    if not path.is_file():
        pytest.skip(f"real Caffe file {path} not found")
    report = calflop(path)
    assert report.batch == 10
    # Grouped conv2, conv4 and conv5 by hand: 105,415,200 + 223,948,800 + 149,520,384 + 112,140,288 + 74,760,192.
    assert report.macs("conv") == 665_784_864
    assert report.macs("conv+fc") == 665_784_864 + 9216 * 4096 + 4096 * 4096 + 4096 * 1000 == 724_406_816
    assert report.params == 60_965_224


# ---------------------------------------------------------------------------------------------------------------
# Per-layer rules, params, memory
# ---------------------------------------------------------------------------------------------------------------

def test_tiny_net_by_hand():
    report = calflop(parse_net(TINY))
    assert report.batch == 2
    assert {l.name: l.macs for l in report.layers} == TINY_MACS
    assert report.macs("conv") == TINY_MACS["conv"] + TINY_MACS["deconv"]
    assert report.macs("conv+fc") == report.macs("conv") + TINY_MACS["ip"]
    assert report.macs("all") == sum(TINY_MACS.values())
    assert {l.name: l.params for l in report.layers if l.params} == TINY_PARAMS
    assert report.params == sum(TINY_PARAMS.values()) == build_graph(parse_net(TINY)).param_count
    assert report.blob_elements == report.params + TINY_BN_STATS
    assert {l.name: l.activation_bytes for l in report.layers if l.activation_bytes} == TINY_ACTIVATIONS
    assert report.activation_bytes == sum(TINY_ACTIVATIONS.values())
    share = report.share(report.layers[1])
    assert share == pytest.approx(TINY_MACS["conv"] / sum(TINY_MACS.values()))
    assert all(l.flops == 2 * l.macs for l in report.layers)


def test_shared_params_counted_once():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 5 } } }
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 5 } }
    layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { name: "b" }
            inner_product_param { num_output: 5 } }
    """
    report = calflop(parse_net(text))
    assert report.params == report.blob_elements == 5 * 5 + 5
    assert report.macs("conv+fc") == 2 * 25  # the cost is paid twice, the parameters stored once


def test_zero_cost_types_and_dropout_phase():
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 dim: 6 dim: 6 } } }
    layer { name: "split" type: "Split" bottom: "data" top: "s1" top: "s2" }
    layer { name: "slice" type: "Slice" bottom: "s1" top: "p" top: "q" slice_param { axis: 1 } }
    layer { name: "cat" type: "Concat" bottom: "p" bottom: "q" top: "cat" }
    layer { name: "reshape" type: "Reshape" bottom: "cat" top: "r" reshape_param { shape { dim: 0 dim: -1 } } }
    layer { name: "crop" type: "Crop" bottom: "s2" bottom: "data" top: "crop" crop_param { axis: 2 } }
    layer { name: "drop" type: "Dropout" bottom: "r" top: "d" }
    layer { name: "silence" type: "Silence" bottom: "crop" bottom: "d" }
    """
    test = calflop(parse_net(text))
    assert test.uncounted == []
    assert all(l.macs == 0 for l in test.layers)
    # Split and Reshape share their bottom's data; Slice, Concat, Crop and Dropout allocate new tops.
    assert {l.name for l in test.layers if l.activation_bytes} == {"data", "slice", "cat", "crop", "drop"}
    train = calflop(parse_net(text), phase="TRAIN")
    assert train.layers[-2].macs == 4 * 6 * 6  # TRAIN dropout multiplies by the scaled mask


def test_uncounted_layers_are_listed(monkeypatch, tmp_path):
    from slim.layers.pooling import Pooling
    monkeypatch.setattr(Pooling, "macs", lambda self: None)
    report = calflop(parse_net(TINY))
    assert [(l.name, l.type) for l in report.uncounted] == [("pool", "Pooling")]
    assert report.macs("all") == sum(TINY_MACS.values()) - TINY_MACS["pool"]
    path = _write(tmp_path, "tiny.prototxt", TINY)
    code, out, _ = _run(["calflop", path])
    assert code == 0
    assert "Uncounted layers (no cost rule; all-ops is a lower bound): pool (Pooling)" in out
    code, out, _ = _run(["calflop", path, "--json"])
    assert json.loads(out)["uncounted"] == [{"name": "pool", "type": "Pooling"}]
    code, out, _ = _run(["calflop", path, "--csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert next(r for r in rows if r["name"] == "pool")["macs"] == ""
    assert next(r for r in rows if r["name"] == "uncounted_layers")["value"] == "1"


def test_unknown_convention():
    with pytest.raises(NetError, match="conv\\+fc"):
        calflop(parse_net(TINY)).macs("convs")


# ---------------------------------------------------------------------------------------------------------------
# The command: text, JSON, CSV, baseline, errors
# ---------------------------------------------------------------------------------------------------------------

def test_cli_text(tmp_path):
    path = _write(tmp_path, "vgg19.prototxt", vgg_text(VGG19_CIFAR, batch=8, size=32, fcs=[10], batch_norm=True,
                                                       final_pool=2))
    code, out, err = _run(["calflop", path])
    assert code == 0 and err == ""
    assert "every figure is per image" in out and "batch 8" in out
    assert "conv-only MACs  398,131,200" in out
    assert "conv+FC MACs    398,136,320" in out
    assert "FLOPs = 2 x MACs" in out and "FLOPs 796.27 M" in out
    assert "Learnable params: 20,035,018" in out
    assert "Uncounted layers: none" in out
    assert "conv1_1" in out and "8x64x32x32" in out


def test_cli_json_and_csv_agree_with_the_report(tmp_path):
    path = _write(tmp_path, "tiny.prototxt", TINY)
    report = calflop(path)
    code, out, _ = _run(["calflop", path, "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["batch"] == 2 and data["per_image"] is True
    assert {k: v["macs"] for k, v in data["conventions"].items()} == {
        "conv": report.macs("conv"), "conv+fc": report.macs("conv+fc"), "all": report.macs("all")}
    assert data["conventions"]["all"]["flops"] == 2 * sum(TINY_MACS.values())
    assert {l["name"]: l["macs"] for l in data["layers"]} == TINY_MACS
    assert data["params"] == sum(TINY_PARAMS.values())
    assert data["activation_bytes"] == sum(TINY_ACTIVATIONS.values())
    assert data["uncounted"] == [] and data["baseline"] is None and data["measurement"] is None

    code, out, _ = _run(["calflop", path, "--csv"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    layers = [r for r in rows if r["kind"] == "layer"]
    assert {r["name"]: int(r["macs"]) for r in layers} == TINY_MACS
    assert {r["name"]: int(r["params"]) for r in layers if int(r["params"])} == TINY_PARAMS
    totals = {r["name"]: r for r in rows if r["kind"] == "total"}
    assert int(totals["macs:conv"]["value"]) == report.macs("conv")
    assert int(totals["flops:conv+fc"]["value"]) == 2 * report.macs("conv+fc")
    assert int(totals["params"]["value"]) == report.params
    assert int(totals["activation_bytes"]["value"]) == report.activation_bytes


def _widths(tmp_path, name, widths):
    cfg = [widths[0], "M", widths[1], "M"]
    return _write(tmp_path, name, vgg_text(cfg, batch=2, size=8, fcs=[10], batch_norm=True))


def test_cli_baseline_reductions(tmp_path):
    base = _widths(tmp_path, "base.prototxt", (8, 16))
    pruned = _widths(tmp_path, "pruned.prototxt", (4, 8))
    # conv1 8x8 x Cout x 3 x 9, conv2 4x4 x Cout x Cin x 9, fc 2x2xC2 -> 10
    base_conv = 64 * 8 * 27 + 16 * 16 * 8 * 9
    pruned_conv = 64 * 4 * 27 + 16 * 8 * 4 * 9
    base_params = 8 * 27 + 16 + 16 * 8 * 9 + 32 + 64 * 10 + 10
    pruned_params = 4 * 27 + 8 + 8 * 4 * 9 + 16 + 32 * 10 + 10
    code, out, _ = _run(["calflop", pruned, "--baseline", base, "--json"])
    assert code == 0
    data = json.loads(out)
    changes = {c["metric"]: c for c in data["baseline"]["changes"]}
    assert (changes["macs:conv"]["value"], changes["macs:conv"]["baseline"]) == (pruned_conv, base_conv)
    assert changes["macs:conv"]["reduction_percent"] == pytest.approx(100 * (1 - pruned_conv / base_conv))
    assert data["baseline"]["speedup"]["conv"] == pytest.approx(base_conv / pruned_conv)
    assert (changes["params"]["value"], changes["params"]["baseline"]) == (pruned_params, base_params)
    assert changes["params"]["reduction_percent"] == pytest.approx(100 * (1 - pruned_params / base_params))
    comparison = compare(calflop(pruned), calflop(base))
    for name in ("conv", "conv+fc", "all"):
        assert comparison.speedup(name) == pytest.approx(data["baseline"]["speedup"][name])
    code, out, _ = _run(["calflop", pruned, "--baseline", base])
    assert f"{100 * (1 - pruned_conv / base_conv):.2f}%" in out and f"{base_conv / pruned_conv:.2f}x" in out
    code, out, _ = _run(["calflop", pruned, "--baseline", base, "--csv"])
    totals = {r["name"]: r for r in csv.DictReader(io.StringIO(out)) if r["kind"] == "total"}
    assert int(totals["macs:conv"]["baseline"]) == base_conv
    assert float(totals["macs:conv"]["speedup"]) == pytest.approx(base_conv / pruned_conv)


def test_a_baseline_of_another_architecture_is_flagged(tmp_path, caplog):
    # The first hour of a real user: reductions printed against an unrelated net, without a word.
    base = _widths(tmp_path, "base.prototxt", (8, 16))
    pruned = _widths(tmp_path, "pruned.prototxt", (4, 8))
    tiny = _write(tmp_path, "tiny.prototxt", TINY)
    bigger = _write(tmp_path, "big.prototxt", vgg_text([8, "M", 16, "M"], batch=2, size=16, fcs=[10],
                                                       batch_norm=True))
    assert compare(calflop(pruned), calflop(base)).mismatch is None
    with caplog.at_level("WARNING", logger="slim.flops"):
        other = compare(calflop(pruned), calflop(tiny))
    assert "not the same architecture" in other.mismatch and "of the baseline's" in other.mismatch
    assert [r.getMessage() for r in caplog.records] == [other.mismatch]
    resized = compare(calflop(pruned), calflop(bigger)).mismatch
    assert "another input size" in resized and "8x8" in resized and "16x16" in resized
    code, out, _ = _run(["calflop", pruned, "--baseline", tiny])
    assert code == 0 and "WARNING: The baseline" in out
    code, out, _ = _run(["calflop", pruned, "--baseline", tiny, "--json"])
    assert "not the same architecture" in json.loads(out)["baseline"]["mismatch"]
    code, out, _ = _run(["calflop", pruned, "--baseline", base, "--json"])
    assert json.loads(out)["baseline"]["mismatch"] is None


def test_cli_measure(tmp_path):
    base = _widths(tmp_path, "base.prototxt", (8, 16))
    pruned = _widths(tmp_path, "pruned.prototxt", (4, 8))
    code, out, err = _run(["calflop", pruned, "--baseline", base, "--measure", "--device", "cpu", "--warmup", "1",
                           "--repeats", "3", "--batch", "4", "--json"])
    assert code == 0, err
    m = json.loads(out)["measurement"]
    for side in ("net", "baseline"):
        lat = m[side]
        assert lat["device"] == "cpu" and lat["batch"] == 4 and lat["repeats"] == 3 and lat["warmup"] == 1
        assert len(lat["times_s"]) == 3 and lat["median_s"] > 0
        assert lat["min_s"] <= lat["q1_s"] <= lat["median_s"] <= lat["q3_s"] <= lat["max_s"]
    assert m["measured_speedup"] == m["baseline"]["median_s"] / m["net"]["median_s"]
    assert m["theoretical_speedup"] == pytest.approx(json.loads(out)["baseline"]["speedup"]["conv+fc"])
    code, out, _ = _run(["calflop", pruned, "--measure", "--device", "cpu", "--warmup", "0", "--repeats", "2"])
    assert code == 0 and "Measured:" in out and "ms per image" in out


def test_measure_latency_with_weights(tmp_path):
    from slim.deploy import make_deploy
    from slim.net import Net
    path = _widths(tmp_path, "net.prototxt", (4, 8))
    weights = str(tmp_path / "net.caffemodel")
    Net(make_deploy(parse_net(Path(path).read_text())), seed=1).save(weights)
    latency = measure_latency(path, weights=weights, batch=1, warmup=0, repeats=1, device="cpu")
    assert latency.batch == 1 and len(latency.times) == 1 and latency.median > 0
    assert latency.quartiles == (latency.median, latency.median)


def test_cli_errors(tmp_path):
    missing = str(tmp_path / "missing.prototxt")
    code, out, err = _run(["calflop", missing])
    assert code == 2 and out == ""
    assert missing in err and "no such file" in err
    path = _write(tmp_path, "tiny.prototxt", TINY)
    code, _, err = _run(["calflop", path, "--weights", "w.caffemodel"])
    assert code == 2 and "--weights" in err and "--measure" in err
    code, _, err = _run(["calflop", path, "--baseline", missing])
    assert code == 2 and missing in err
    code, _, err = _run(["calflop", path, "--measure", "--repeats", "0"])
    assert code == 2 and "--repeats" in err


def test_tool_script(tmp_path):
    path = _write(tmp_path, "tiny.prototxt", TINY)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "calflop.py"), path, "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["conventions"]["conv"]["macs"] == TINY_MACS["conv"] + TINY_MACS["deconv"]


def test_cli_nets_whose_data_is_absent(tmp_path):
    # A train/val net and its pruned twin read an LMDB that is not here: the size is only in the database, so
    # --input-shape gives it (to both nets, timed too); one warning line per layer says so.
    def net(widths):
        return ("name: \"n\"\nlayer { name: \"d\" type: \"Data\" top: \"data\" top: \"label\"\n"
                "  data_param { source: \"absent/val_lmdb\" batch_size: 2 backend: LMDB } }\n"
                + _conv("conv1", "data", widths[0]) + _conv("conv2", "conv1", widths[1])
                + 'layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip" inner_product_param { '
                'num_output: 10 } }\nlayer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" '
                'top: "loss" }\n')

    base, pruned = _write(tmp_path, "base.prototxt", net((8, 4))), _write(tmp_path, "pruned.prototxt", net((4, 4)))
    code, out, err = _run(["calflop", pruned, "--baseline", base])
    assert code == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1
    assert "'absent/val_lmdb' (data_param.source) does not exist" in err and "--input-shape data:C,H,W" in err
    code, out, err = _run(["calflop", pruned, "--baseline", base, "--input-shape", "data:3,6,6", "--json"])
    assert code == 0, err
    assert err == ("slim calflop: warning: Layer \"d\" (Data): data_param.source 'absent/val_lmdb' does not exist "
                   "here; it stands as an Input layer with top data 3x6x6 per sample (--input-shape).\n")
    report = json.loads(out)
    assert report["conventions"]["conv"]["macs"] == 36 * (4 * 27 + 4 * 4 * 9)
    assert report["baseline"]["conventions"]["conv"]["macs"] == 36 * (8 * 27 + 4 * 8 * 9)
    code, out, err = _run(["calflop", pruned, "--baseline", base, "--input-shape", "data:3,6,6", "--measure",
                           "--device", "cpu", "--warmup", "0", "--repeats", "1", "--phase", "TRAIN"])
    assert code == 0 and "Measured speed-up" in out and err.count("\n") == 1, err
