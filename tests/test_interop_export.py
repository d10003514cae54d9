"""slim export --onnx: deploy and train/val nets through torch's two exporters, a dynamic batch, the net's names, the
opset stated and written, ONNX Runtime's check; the optional packages stay optional."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from slim.cli import main
from slim.errors import InteropError
from slim.io import parse_net

NETS = __import__("pathlib").Path(__file__).resolve().parents[1] / "nets"

MIXED = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "slice" type: "Slice" bottom: "pool1" top: "a" top: "b" slice_param { axis: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "up" type: "Deconvolution" bottom: "sum" top: "up"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 weight_filler { type: "xavier" } } }
layer { name: "clip" type: "Clip" bottom: "up" top: "up" clip_param { min: -1 max: 1 } }
# pad 2 > kernel 3 // 2, which torch refuses: slim pads explicitly, and the export follows
layer { name: "pool2" type: "Pooling" bottom: "up" top: "pool2"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "power" type: "Power" bottom: "pool2" top: "power" power_param { scale: 0.5 shift: 1 } }
layer { name: "pool3" type: "Pooling" bottom: "conv1" top: "pool3"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "power" bottom: "pool3" top: "cat" }
layer { name: "drop" type: "Dropout" bottom: "cat" top: "cat" }
layer { name: "fc" type: "InnerProduct" bottom: "cat" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
layer { name: "sig" type: "Sigmoid" bottom: "sum" top: "sig" }
"""

has_onnx = importlib.util.find_spec("onnx") is not None
has_ort = importlib.util.find_spec("onnxruntime") is not None
has_onnxscript = importlib.util.find_spec("onnxscript") is not None
needs_onnx = pytest.mark.skipif(not has_onnx, reason="onnx is not installed (pip install 'slim[onnx]')")


def write_weights(tmp_path, text):
    """The net with random weights and BatchNorm statistics, written as prototxt + caffemodel."""
    import torch

    from slim.io import write_net
    from slim.net import Net

    net = Net(parse_net(text), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, ts in net.params.items():
            for i, t in enumerate(ts):
                if net.graph.layer(name).type == "BatchNorm":   # running sums with factor 2: mean = S / 2
                    t.copy_((torch.randn(t.shape, generator=g) * 0.2, torch.rand(t.shape, generator=g) + 1.0,
                             torch.full(t.shape, 2.0))[i])
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    proto, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    write_net(parse_net(text), proto)
    net.save(weights)
    return str(proto), str(weights)


def assert_dynamic_batch(path, inputs, outputs):
    import onnx

    model = onnx.load(path)
    assert [v.name for v in model.graph.input] == inputs
    assert [v.name for v in model.graph.output] == outputs
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert not first.HasField("dim_value") and first.dim_param, value


@needs_onnx
@pytest.mark.parametrize("exporter,opset", [("legacy", 13), ("legacy", 18)] +
                         ([("dynamo", 18)] if has_onnxscript else []))
def test_export_a_deploy_net(tmp_path, exporter, opset):
    from slim.interop import export_onnx

    proto, weights = write_weights(tmp_path, MIXED)
    result = export_onnx(proto, tmp_path / "mixed.onnx", weights=weights, exporter=exporter, opset=opset)
    assert result.opset == opset and result.exporter == exporter
    assert sorted(result.outputs) == ["prob", "sig"] and result.inputs == ["data"]
    assert_dynamic_batch(result.path, ["data"], result.outputs)
    import onnx

    assert next(e.version for e in onnx.load(result.path).opset_import if e.domain == "") == opset
    if has_ort:
        assert result.check is not None and result.check.batch == 3 and result.check.max_rel <= 1e-4, result.check
        assert set(result.check.outputs) == {"prob", "sig"}
    else:
        assert result.check is None


@needs_onnx
def test_export_a_train_val_net_through_its_deploy_form(tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    assert main(["export", str(NETS / "demo_digits.prototxt"), "--onnx", str(out), "--exporter", "legacy"]) == 0
    text = capsys.readouterr().out
    assert "no --weights" in text and f"wrote {out}: ONNX opset 18 (legacy exporter)" in text
    from slim.deploy import make_deploy
    from slim.io import read_net
    from slim.net import Net

    deploy = Net(make_deploy(read_net(NETS / "demo_digits.prototxt")))
    assert_dynamic_batch(str(out), deploy.inputs, deploy.outputs)   # no label, no loss, no accuracy
    if has_ort:
        assert "largest difference" in text


@needs_onnx
def test_bad_requests_are_refused(tmp_path):
    from slim.interop import export_onnx

    proto, _ = write_weights(tmp_path, MIXED)
    with pytest.raises(InteropError, match="exporter 'tvm'"):
        export_onnx(proto, tmp_path / "x.onnx", exporter="tvm")
    with pytest.raises(InteropError, match="opset 18 or later"):
        export_onnx(proto, tmp_path / "x.onnx", exporter="dynamo", opset=13)
    with pytest.raises(InteropError, match="opset 40"):
        export_onnx(proto, tmp_path / "x.onnx", exporter="legacy", opset=40)
    assert main(["export", proto, "--onnx", str(tmp_path / "x.onnx"), "--exporter", "legacy", "--opset", "40"]) == 2


def test_a_missing_optional_package_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import slim.interop._deps as deps

    real = deps.importlib.import_module

    def refuse(name, *args):
        if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(deps.importlib, "import_module", refuse)
    proto, _ = write_weights(tmp_path, MIXED)
    assert main(["export", proto, "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "'onnx'" in err and "pip install 'slim[onnx]'" in err and "Traceback" not in err
    assert main(["import", str(tmp_path / "x.onnx"), "--output", str(tmp_path / "y")]) == 2
    assert "pip install 'slim[onnx]'" in capsys.readouterr().err


def test_the_core_never_imports_onnx():
    code = ("import sys, slim, slim.net, slim.io, slim.prune, slim.flops, slim.cli, slim.interop; "
            "slim.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_difference_never_lets_nan_or_inf_pass():
    from slim.interop.runtime import difference

    assert difference(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == (0.5, 0.2)
    assert difference(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == (0.0, 0.0)
    assert difference(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))[0] == np.inf
    assert difference(np.array([1.0, 1.0]), np.array([np.nan, 1.0]))[0] == np.inf
    assert difference(np.array([np.inf]), np.array([np.inf])) == (0.0, 0.0)
    assert difference(np.array([np.inf]), np.array([1.0]))[0] == np.inf
