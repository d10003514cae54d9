"""``slim prune`` end to end: files written all or nothing, the JSON report and its replay, errors, OpenCV."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slim.cli import main
from slim.io import parse_net, read_caffemodel
from slim.net import Net
from slim.prune import PrunePolicy, PruneReport, prune_net

ROOT = Path(__file__).resolve().parents[1]

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" }
layer { name: "sc1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "pool" type: "Pooling" bottom: "c1" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "c2" type: "Convolution" bottom: "pool" top: "c2"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "c2" top: "c2" }
layer { name: "sc2" type: "Scale" bottom: "c2" top: "c2" scale_param { bias_term: true } }
layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" }
layer { name: "fc" type: "InnerProduct" bottom: "c2" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
"""


@pytest.fixture
def files(tmp_path):
    """The net as a prototxt and random non-trivial weights as a .caffemodel."""
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    net = Net(parse_net(NET), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensors in net.params.items():
            if name.startswith("bn"):
                tensors[0].normal_(0, 0.3, generator=gen)
                tensors[1].uniform_(0.5, 1.5, generator=gen)
                tensors[2].fill_(1)
            elif name.startswith("sc"):
                tensors[0].uniform_(0.01, 1, generator=gen)
                tensors[1].normal_(0, 0.3, generator=gen)
            elif len(tensors) > 1:
                tensors[1].normal_(0, 0.3, generator=gen)
    weights = tmp_path / "net.caffemodel"
    net.save(weights)
    return model, weights


def run_cli(*argv):
    return main(["prune", *map(str, argv)])


def test_cli_writes_a_net_that_equals_the_masked_original(files, tmp_path, capsys):
    model, weights = files
    out = tmp_path / "pruned"
    assert run_cli("--model", model, "--weights", weights, "--percent", 0.5, "--output", out) == 0
    printed = capsys.readouterr().out
    assert "removed 7 of the 14 prunable channels (50.00%; asked 7)" in printed and "wrote" in printed
    text = (tmp_path / "pruned.prototxt").read_text()
    assert text.startswith("# Pruned by `slim prune`")
    pruned = Net(tmp_path / "pruned.prototxt", weights=tmp_path / "pruned.caffemodel")
    result = prune_net(model, weights, PrunePolicy(percent=0.5))
    reference = Net(model)
    with torch.no_grad():
        for name, arrays in result.masked_original().items():
            for t, a in zip(reference.params[name], arrays):
                t.copy_(torch.from_numpy(np.array(a)).reshape(t.shape))
        x = torch.randn(1, 3, 8, 8)
        torch.testing.assert_close(pruned(x)["fc"], reference(x)["fc"], rtol=1e-5, atol=1e-6)
    report = PruneReport.read(tmp_path / "pruned.json")
    assert report == result.report.__class__.from_dict(result.report.to_dict())
    assert report.removed == 7 and sum(c.after for c in report.layers) == report.channels_after
    widths = {c.name: len(c.kept) for c in report.layers}
    assert widths["c1"] + widths["c2"] == 14 - 7 and widths["fc"] == 5


def test_apply_report_replays_the_same_pruning(files, tmp_path):
    model, weights = files
    assert run_cli("--model", model, "--weights", weights, "--percent", 0.4, "--output", tmp_path / "a") == 0
    assert run_cli("--model", model, "--weights", weights, "--apply-report", tmp_path / "a.json",
                   "--output", tmp_path / "b") == 0
    body = lambda p: "".join(l for l in p.read_text().splitlines(True) if not l.startswith("#"))
    assert body(tmp_path / "a.prototxt") == body(tmp_path / "b.prototxt")
    a, b = read_caffemodel(tmp_path / "a.caffemodel"), read_caffemodel(tmp_path / "b.caffemodel")
    assert [(l.name, [x.tolist() for x in l.blobs]) for l in a.layers] == \
        [(l.name, [x.tolist() for x in l.blobs]) for l in b.layers]
    assert PruneReport.read(tmp_path / "a.json").kept == PruneReport.read(tmp_path / "b.json").kept


def test_a_report_for_another_net_is_refused(files, tmp_path):
    model, weights = files
    assert run_cli("--model", model, "--weights", weights, "--percent", 0.4, "--output", tmp_path / "a") == 0
    report = PruneReport.read(tmp_path / "a.json")
    report.layers[0].before = 16
    with pytest.raises(Exception, match="has 16 output channels"):
        prune_net(model, weights, replay=report)
    report = PruneReport.read(tmp_path / "a.json")
    report.layers[-1].kept, report.layers[-1].after = [0, 1], 2        # fc's outputs are the net's output
    with pytest.raises(Exception, match="may not be removed here: net output 'fc'"):
        prune_net(model, weights, replay=report)


def test_nothing_is_written_unless_everything_is(files, tmp_path, monkeypatch):
    model, weights = files

    def fail(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(PruneReport, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        run_cli("--model", model, "--weights", weights, "--percent", 0.5, "--output", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.caffemodel", "net.prototxt"]


@pytest.mark.parametrize("argv, message", [
    (["--percent", "1.5"], r"--percent must be a fraction in \[0, 1\)"),
    (["--percent", "0.5", "--speedup", "2"], "Give one of --percent, --target-macs, --speedup and --apply-report"),
    ([], "Say what to remove"),
    (["--percent", "0.5", "--protect", "c9"], "--protect names layer 'c9'"),
    (["--target-macs", "lots"], "--target-macs takes a number such as 2.5e8"),
    (["--target-macs", "1K"], "cannot be met"),
    (["--percent", "0.5", "--min-channels", "some"], "--min-channels takes a channel count"),
])
def test_cli_errors_are_one_sentence_and_exit_2(files, tmp_path, capsys, argv, message):
    model, weights = files
    assert run_cli("--model", model, "--weights", weights, "--output", tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slim prune: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "o.prototxt").exists()


def test_cli_weights_that_do_not_match(files, tmp_path, capsys):
    model, weights = files
    other = tmp_path / "other.prototxt"
    other.write_text(NET.replace("num_output: 6", "num_output: 7"))
    assert run_cli("--model", other, "--weights", weights, "--percent", 0.5, "--output", tmp_path / "o") == 2
    assert "layer 'c2' blob 0 has shape (6, 8, 3, 3)" in capsys.readouterr().err


def test_cli_weights_of_another_net_say_so(files, tmp_path, capsys):
    model, _ = files
    other = tmp_path / "other.prototxt"
    other.write_text(NET.replace('"c1"', '"x1"').replace('"c2"', '"x2"').replace('"bn', '"nb').replace('"sc', '"cs')
                     .replace('"fc"', '"ip"'))
    Net(str(other), seed=0).save(tmp_path / "other.caffemodel")
    assert run_cli("--model", model, "--weights", tmp_path / "other.caffemodel", "--percent", 0.5,
                   "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "holds no weights for any layer" in err and "another net" in err and "x1" in err, err


def test_explain_prints_the_groups(files, capsys):
    model, _ = files
    assert run_cli("--model", model, "--explain") == 0
    out = capsys.readouterr().out
    assert "3 channel groups" in out.splitlines()[0] or "channel groups" in out.splitlines()[0]
    assert "produced by     c1 (Convolution)" in out and "scaled by       sc1 (Scale)" in out
    assert "pinned          5 channels: net output 'fc'" in out


def test_tools_script_is_a_thin_wrapper(files):
    model, _ = files
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "prune.py"), "--model", str(model), "--explain"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "group 1: 8 channels (prunable)" in done.stdout


def test_opencv_reads_the_pruned_files_and_agrees(files, tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("this OpenCV has no Caffe importer (removed in 5.x)")
    model, weights = files
    assert run_cli("--model", model, "--weights", weights, "--percent", 0.5, "--output", tmp_path / "p") == 0
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel"))
    cv.setInput(x)
    theirs = cv.forward("fc")
    ours = Net(tmp_path / "p.prototxt", weights=tmp_path / "p.caffemodel")(torch.from_numpy(x))["fc"].detach().numpy()
    np.testing.assert_allclose(theirs.reshape(ours.shape), ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spelling", ["ceil_mode: false", "round_mode: FLOOR"])
def test_pruned_files_keep_the_inputs_pooling_spelling(tmp_path, spelling):
    # The first hour of a real user: a net read with OpenCV's ceil_mode: false was written back as round_mode: FLOOR,
    # which OpenCV's importer rejects at forward time.
    model = tmp_path / "net.prototxt"
    model.write_text(NET.replace("pool: MAX kernel_size: 2 stride: 2",
                                 f"pool: MAX kernel_size: 3 stride: 2 {spelling}"))
    net = Net(model, seed=0)
    with torch.no_grad():
        for tensors in net.params.values():
            for t in tensors:
                t.uniform_(0.5, 1.5)
    net.save(tmp_path / "net.caffemodel")
    assert run_cli("--model", model, "--weights", tmp_path / "net.caffemodel", "--percent", 0.5, "--output",
                   tmp_path / "p") == 0
    text = (tmp_path / "p.prototxt").read_text()
    body = "".join(l for l in text.splitlines(True) if not l.startswith("#"))
    opencv = spelling.startswith("ceil_mode")
    assert ("ceil_mode: false" in body) == opencv and ("round_mode: FLOOR" in body) == (not opencv)
    assert ("OpenCV's ceil_mode spelling" in text) == opencv
    pruned = Net(tmp_path / "p.prototxt", weights=tmp_path / "p.caffemodel")
    assert tuple(pruned.graph.shapes["pool"][2:]) == (3, 3)   # floor rounding read back: (8 - 3) // 2 + 1, not 4
    cv2 = pytest.importorskip("cv2")
    if not opencv or not hasattr(cv2.dnn, "readNetFromCaffe"):
        return
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    cv = cv2.dnn.readNetFromCaffe(str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel"))
    cv.setInput(x)
    ours = pruned(torch.from_numpy(x))["fc"].detach().numpy()
    np.testing.assert_allclose(cv.forward("fc").reshape(ours.shape), ours, rtol=1e-4, atol=1e-5)


def test_train_test_net_keeps_its_other_phase_layers():
    text = NET.replace('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 '
                       'dim: 8 } } }', 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                       'dim: 3 dim: 8 dim: 8 } } include { phase: TEST } }\nlayer { name: "data" type: "DummyData" '
                       'top: "data" dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } '
                       'include { phase: TRAIN } }')
    net = parse_net(text)
    blobs = {n: [t.detach().numpy() for t in ts] for n, ts in Net(net, seed=0).params.items()}
    result = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="l1"))
    assert [l.name for l in result.net.layer] == [l.name for l in net.layer]
    assert [l.type for l in result.net.layer if l.name == "data"] == ["Input", "DummyData"]
    Net(result.net, phase="TRAIN")            # the TRAIN phase of the rewritten net still builds


@pytest.mark.parametrize("criterion", ["slimming", "l1", "l2"])
def test_prune_runs_without_torch(files, tmp_path, criterion):
    # Pruning is numpy + protobuf: `import slim.prune` and the whole `slim prune` command never load torch (3-5 s
    # of a command that otherwise costs about one read and one write of the caffemodel).
    model, weights = files
    out = tmp_path / f"torchless_{criterion}"
    code = ("import sys; import slim.prune; assert 'torch' not in sys.modules, 'import slim.prune loaded torch'; "
            "from slim.cli import main; "
            f"rc = main(['prune', '--model', {str(model)!r}, '--weights', {str(weights)!r}, '--percent', '0.4', "
            f"'--criterion', {criterion!r}, '--output', {str(out)!r}]); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'slim prune loaded torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert out.with_suffix(".caffemodel").exists()
