"""The PyTorch user's path, end to end: a plain-torch VGG-, ResNet-18- or MobileNet-v2-style model -> ONNX
(torch.onnx.export) -> slim import -> slim prune -> slim export --onnx -> ONNX Runtime, with the invariants at
each step: the import equals ONNX Runtime, the pruned net equals the masked original, the exported pruned net equals
slim's, and the pruned file is smaller and has fewer multiply-accumulates."""

import importlib.util
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'slim[onnx]')")
if importlib.util.find_spec("onnxruntime") is None:
    pytest.skip("onnxruntime is not installed: the round trip is checked against it", allow_module_level=True)

from slim.cli import main  # noqa: E402
from slim.flops import calflop  # noqa: E402
from slim.interop import export_onnx, import_onnx, write_imported  # noqa: E402
from slim.interop.onnx_import import check_imported  # noqa: E402
from slim.interop.runtime import run_onnxruntime  # noqa: E402
from slim.net import Net  # noqa: E402
from slim.prune import PrunePolicy, prune_net, write_pruned  # noqa: E402
import torch_models  # noqa: E402
from torch_models import MODELS  # noqa: E402

onnxscript_available = importlib.util.find_spec("onnxscript") is not None


def torch_export(model, path, dynamo=False, keep_batchnorm=True):
    """torch.onnx.export with a dynamic batch; keep_batchnorm turns off the exporters' BatchNorm folding."""
    x = torch.randn(2, 3, 32, 32)
    if dynamo:
        kw = dict(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                  optimize=not keep_batchnorm)
    else:
        kw = dict(dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                  do_constant_folding=not keep_batchnorm)
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"], **kw)
    return str(path)


def forward(net_param, blobs, x):
    net = Net(net_param)
    with torch.no_grad():
        for name, arrays in blobs.items():
            for t, a in zip(net.params[name], arrays):
                t.copy_(torch.from_numpy(np.array(a, dtype=np.float32)).reshape(t.shape))
        return net(image=x)["logits"]


def count_batchnorm(model):
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# The dynamo exporter takes ~20 s a model on this CPU: ResNet covers the graphs it writes, MobileNet-v3 the
# HardSwish, HardSigmoid and squeeze-and-excitation products it writes in its own way.
@pytest.mark.parametrize("name,exporter", [("vgg", "legacy"), ("resnet", "legacy"), ("mobilenet", "legacy"),
                                           ("mobilenetv3", "legacy"), ("se", "legacy"), ("resnet", "dynamo"),
                                           ("mobilenetv3", "dynamo")])
def test_round_trip(tmp_path, name, exporter):
    if exporter == "dynamo" and not onnxscript_available:
        pytest.skip("torch's dynamo exporter needs onnxscript")
    model = MODELS[name]()
    path = torch_export(model, tmp_path / f"{name}.onnx", dynamo=exporter == "dynamo")

    imported = import_onnx(path)
    types = [layer.type for layer in imported.net.layer]
    scales = sum(lp.type == "Scale" and len(lp.bottom) == 1 for lp in imported.net.layer)  # not SE's x * weights
    assert types.count("BatchNorm") == scales == count_batchnorm(model)
    # Layers are named after the torch modules that wrote them (what a user reads in the prune report).
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {lp.name for lp in imported.net.layer if lp.type == "Convolution"} == convs
    assert check_imported(imported, path).max_rel <= 1e-4
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(forward(imported.net, imported.blobs, x), model(x), rtol=1e-4, atol=1e-5)
    proto, weights = write_imported(imported, tmp_path / name)

    pruned = prune_net(proto, weights, PrunePolicy(percent=0.3, criterion="l1"))
    assert pruned.report.removed > 0
    want = forward(pruned.analysis.graph.net, pruned.masked_original(), x)
    got = forward(pruned.net, pruned.blobs, x)
    scale = max(1.0, float(want.abs().max()))
    assert float((want - got).abs().max()) <= 1e-5 * scale
    paths = write_pruned(pruned, tmp_path / f"{name}_pruned")

    full = export_onnx(proto, tmp_path / f"{name}_full.onnx", weights=weights, exporter="legacy")
    small = export_onnx(paths["prototxt"], tmp_path / f"{name}_pruned.onnx", weights=paths["caffemodel"],
                        exporter="legacy")
    for result in (full, small):
        assert result.check is not None and result.check.max_rel <= 1e-4, result
        assert result.outputs == ["logits"] and result.inputs == ["image"]
    ours = forward(pruned.net, pruned.blobs, x).numpy()
    theirs = run_onnxruntime(small.path, {"image": x.numpy()})["logits"]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ours).max())))
    assert os.path.getsize(small.path) < os.path.getsize(full.path)
    assert calflop(paths["prototxt"]).macs() < calflop(proto).macs()


def test_folded_batchnorm_imports_as_biased_convolutions_and_prunes(tmp_path):
    model = MODELS["vgg"]()
    path = torch_export(model, tmp_path / "vgg.onnx", keep_batchnorm=False)  # the exporter's default
    imported = import_onnx(path)
    types = [layer.type for layer in imported.net.layer]
    assert "BatchNorm" not in types
    assert all(lp.convolution_param.bias_term for lp in imported.net.layer if lp.type == "Convolution")
    assert check_imported(imported, path).max_rel <= 1e-4
    pruned = prune_net(imported.net, imported.blobs, PrunePolicy(percent=0.3, criterion="l1"))
    assert pruned.report.removed > 0


def test_slimming_finds_the_imported_batchnorm_scales(tmp_path):
    imported = import_onnx(torch_export(MODELS["mobilenet"](), tmp_path / "m.onnx"))
    factors = Net(imported.net).scaling_factors()
    assert len(factors) == count_batchnorm(MODELS["mobilenet"]())
    pruned = prune_net(imported.net, imported.blobs, PrunePolicy(percent=0.2))   # criterion: slimming (|gamma|)
    assert pruned.report.removed > 0


@pytest.mark.parametrize("name", ["se", "mobilenetv3"])
def test_hardswish_and_squeeze_excitation_prune_by_slimming(tmp_path, name):
    # MobileNet-v3's pattern: x * hardsigmoid(x) and x * gate(fc2(...)) import as products (Eltwise PROD, Scale by a
    # second bottom). A removed channel's gate is 0.5, not 0, but the product is 0 again: the padded convolutions
    # after them need not pin it, and the pruned net equals the masked original.
    model = MODELS[name]()
    imported = import_onnx(torch_export(model, tmp_path / f"{name}.onnx"))
    proto, weights = write_imported(imported, tmp_path / name)
    pruned = prune_net(proto, weights, PrunePolicy(percent=0.3))
    assert pruned.report.removed > 0
    for group in pruned.analysis.groups:
        assert not any("would not be exact" in why for why in group.pinned.values()), str(group)
    after = {c.name: c.after for c in pruned.report.layers}
    ses = [n for n, m in model.named_modules() if isinstance(m, torch_models.SqueezeExcitation)]
    assert ses and any(f"{se}.fc2" in after for se in ses)    # the SE weights lose the channels of their map
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = forward(pruned.analysis.graph.net, pruned.masked_original(), x)
    got = forward(pruned.net, pruned.blobs, x)
    assert float((want - got).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_the_commands_as_the_readme_runs_them(tmp_path, capsys):
    onnx_path = torch_export(MODELS["resnet"](), tmp_path / "resnet.onnx")
    out = str(tmp_path / "resnet")
    assert main(["import", onnx_path, "--output", out]) == 0
    text = capsys.readouterr().out
    assert "largest difference" in text and f"wrote {out}.prototxt" in text
    assert main(["prune", "--model", f"{out}.prototxt", "--weights", f"{out}.caffemodel", "--percent", "0.3",
                 "--criterion", "l1", "--output", f"{out}_pruned"]) == 0
    capsys.readouterr()
    assert main(["export", f"{out}_pruned.prototxt", "--weights", f"{out}_pruned.caffemodel", "--onnx",
                 f"{out}_pruned.onnx", "--exporter", "legacy"]) == 0
    text = capsys.readouterr().out
    assert "ONNX opset 18" in text and "dynamic batch" in text and "largest difference" in text
    assert os.path.getsize(f"{out}_pruned.onnx") < os.path.getsize(onnx_path)
