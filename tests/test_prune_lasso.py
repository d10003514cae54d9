"""--criterion lasso end to end on tiny nets: the written net equals the reconstructed one in memory (and OpenCV
agrees), reconstruction lowers the error, redundancy is found, memory does not grow, bad input is refused."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from slim.cli import main  # noqa: E402
from slim.errors import PruneError  # noqa: E402
from slim.graph import build_graph  # noqa: E402
from slim.io import parse_net  # noqa: E402
from slim.prune import Calibration, PrunePolicy, prune_net, write_pruned  # noqa: E402
from slim.prune.calibrate import CalibrationSource, StatsPass, reader_units  # noqa: E402
from slim.prune.groups import analyze  # noqa: E402
from tests.test_prune_exact import (CASES, bn_scale, cbr, conv, forward, inp, ip, random_blobs,  # noqa: E402
                                    relu)


def calib_net(c=3, h=8, w=8, batch=8):
    """A train net whose DummyData layer supplies gaussian calibration images of the nets' input shape."""
    return parse_net(f'layer {{ name: "data" type: "DummyData" top: "data" dummy_data_param {{ shape {{ dim: {batch} '
                     f'dim: {c} dim: {h} dim: {w} }} data_filler {{ type: "gaussian" std: 1 }} }} }}\n')


VGG = inp() + cbr("conv1", "data", 8) + cbr("conv2", "conv1", 8) + """
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
""" + cbr("conv3", "pool", 8) + ip("fc", "conv3", 4)

NETS = {"vgg": VGG, **CASES}


def calibration(net_text, images=96, **kw):
    shape = build_graph(parse_net(net_text), "TEST").shapes["data"]
    kw.setdefault("samples_per_image", 6)
    return Calibration(images=images, net=calib_net(*shape[1:]), progress=False, **kw)


@pytest.mark.parametrize("name", sorted(NETS))
def test_written_net_equals_the_reconstructed_net(name, tmp_path):
    text = NETS[name]
    net = parse_net(text)
    blobs = random_blobs(net, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the grouped net's Deconvolution reader, the concat net's large fc
        result = prune_net(net, blobs, PrunePolicy(percent=0.4, criterion="lasso"), calibration=calibration(text))
    assert result.report.removed > 0
    rec = result.report.reconstruction
    assert rec["layers"], "some layer is refitted"
    # In memory: the original net with the refitted blobs at full width (removed inputs at zero).
    shape = build_graph(net, "TEST").shapes["data"]
    x = torch.from_numpy(np.random.default_rng(5).normal(0, 1, (4,) + tuple(shape[1:])).astype(np.float32))
    want = forward(net, result.source_blobs, x)
    # Written and read back: the pruned prototxt and caffemodel.
    paths = write_pruned(result, tmp_path / "pruned")
    from slim.net import Net
    pruned = Net(str(paths["prototxt"]), weights=str(paths["caffemodel"]))
    with torch.no_grad():
        got = pruned(x)
    for key in want:
        scale = max(1.0, float(want[key].abs().max()))
        assert float((want[key] - got[key]).abs().max()) <= 1e-5 * scale, key
    # The masked original of a lasso result is the same net (zero reader weights silence removed channels).
    masked = forward(net, result.masked_original(), x)
    for key in want:
        assert torch.allclose(masked[key], want[key], atol=1e-5 * max(1.0, float(want[key].abs().max())))


@pytest.mark.parametrize("name", ["vgg", "residual", "concat_slice"])
def test_opencv_reads_the_lasso_pruned_net(name, tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("OpenCV without the Caffe importer")
    text = NETS[name]
    net = parse_net(text)
    result = prune_net(net, random_blobs(net, seed=2), PrunePolicy(percent=0.5, criterion="lasso"),
                       calibration=calibration(text))
    paths = write_pruned(result, tmp_path / "p")
    from slim.net import Net
    pruned = Net(str(paths["prototxt"]), weights=str(paths["caffemodel"]))
    x = np.random.default_rng(0).normal(0, 1, (2,) + tuple(pruned.graph.shapes["data"][1:])).astype(np.float32)
    with torch.no_grad():
        ours = pruned(torch.from_numpy(x))
    cv_net = cv2.dnn.readNetFromCaffe(str(paths["prototxt"]), str(paths["caffemodel"]))
    cv_net.setInput(x)
    theirs = cv_net.forward()
    ref = ours[pruned.outputs[0]].numpy().reshape(theirs.shape)
    np.testing.assert_allclose(theirs, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_reconstruction_lowers_the_error_of_every_refitted_convolution():
    net = parse_net(VGG)
    result = prune_net(net, random_blobs(net, seed=4), PrunePolicy(percent=0.5, criterion="lasso"),
                       calibration=calibration(VGG, images=200))
    layers = {r["layer"]: r for r in result.report.reconstruction["layers"]}
    assert set(layers) >= {"conv2", "conv3"}
    for name in ("conv2", "conv3"):
        r = layers[name]
        assert r["inputs_after"] < r["inputs_before"]
        assert r["error_reconstructed"] < r["error_pruned"], r
    assert layers["conv2"]["error_unpruned"] < 1e-5      # its inputs come straight from the untouched conv1
    text = str(result.report)
    assert "least-squares reconstruction" in text and "conv2" in text


def test_lasso_beats_filter_norms_before_reconstruction_on_the_same_channel_count():
    """LASSO's channels with least squares reproduce the layer better than l1's channels sliced (held-out)."""
    net = parse_net(VGG)
    blobs = random_blobs(net, seed=6)
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"conv1": 0.5}, criterion="lasso"),
                       calibration=calibration(VGG, images=200))
    r = {x["layer"]: x for x in result.report.reconstruction["layers"]}["conv2"]
    assert r["error_reconstructed"] < r["error_pruned"] < 1.0


def test_a_redundant_channel_is_removed_at_no_cost():
    """conv1's channel 5 is channel 0 + channel 1 (no BatchNorm, no ReLU: linear): removing it loses nothing once
    conv2 is refitted, and lasso finds it."""
    text = inp() + conv("conv1", "data", 8, bias=False) + conv("conv2", "conv1", 6, bias=True) + \
        relu("relu2", "conv2") + ip("fc", "conv2", 3)
    net = parse_net(text)
    blobs = random_blobs(net, seed=7)
    w = blobs["conv1"][0]
    w[5] = w[0] + w[1]
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"conv1": 0.125}, criterion="lasso"),
                       calibration=calibration(text, images=120))
    kept = result.report.kept["conv1"]
    assert len(kept) == 7
    assert not {0, 1, 5} <= set(kept), kept              # one of the dependent three is gone
    r = {x["layer"]: x for x in result.report.reconstruction["layers"]}["conv2"]
    assert r["error_reconstructed"] < 1e-4, r


def test_fewer_samples_than_channels_is_no_redundancy():
    """A reader that saw fewer samples than it has input channels sees every channel as a combination of the others
    (rank-deficient statistics): that is the calibration's size, not the net's redundancy, and no channel is removed
    for it (before, each was removed one at a time, a c x c inversion per channel: hours on VGG-16's fc7)."""
    text = inp() + conv("conv1", "data", 8, k=8, pad=0, bias=True) + relu("relu1", "conv1") + ip("fc", "conv1", 3)
    net = parse_net(text)
    result = prune_net(net, random_blobs(net, seed=3), PrunePolicy(layer_percent={"conv1": 0.5}, criterion="lasso"),
                       calibration=calibration(text, images=6, samples_per_image=1))
    chosen = {s["group"]: s for s in result.report.reconstruction["selections"]}
    assert chosen and all(s["redundant"] == 0 for s in chosen.values()), chosen
    assert len(result.report.kept["conv1"]) == 4


def test_statistics_do_not_grow_with_the_calibration_images():
    net = parse_net(VGG)
    graph = build_graph(net, "TEST")
    analysis = analyze(graph)
    units, _ = reader_units(graph, analysis)
    from slim.prune.reconstruct import _nets
    original, current = _nets(graph, random_blobs(net), "cpu")
    sizes = []
    for images in (16, 160):
        cal = calibration(VGG, images=images)
        source = CalibrationSource.open(net, "vgg", cal)
        stats = StatsPass(original, current, units, cal, tag=0)
        before = sum(t.numel() for s in stats.stats.values() for t in s.A + s.B)
        for index, held, x in source.batches("cpu"):
            stats.run(x, index, held, {"data": graph.shapes["data"]}, "data")
        after = sum(t.numel() for s in stats.stats.values() for t in s.A + s.B)
        assert before == after
        sizes.append(after)
        assert sum(s.count[0] + s.count[1] for s in stats.stats.values() if s.unit.layer == "conv2") == images * 6
    assert sizes[0] == sizes[1]


def test_residual_branch_target_is_corrected_for_the_shortcut():
    """In a residual block, the branch's last convolution is fitted to Y1 + Y2 - Y2': pruning the stem (the shortcut's
    channels are tied) is compensated, so the refitted sum is closer to the original than the branch alone."""
    net = parse_net(CASES["residual"])
    result = prune_net(net, random_blobs(net, seed=8), PrunePolicy(percent=0.3, criterion="lasso"),
                       calibration=calibration(CASES["residual"], images=200))
    layers = {r["layer"]: r for r in result.report.reconstruction["layers"]}
    assert "conv2" in layers and layers["conv2"]["error_reconstructed"] <= layers["conv2"]["error_pruned"]


def test_the_cli_writes_the_report_with_reconstruction_errors(tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(VGG)
    (tmp_path / "calib.prototxt").write_text(
        'layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } '
        'data_filler { type: "gaussian" std: 1 } } }\n')
    from slim.io import write_caffemodel
    net = parse_net(VGG)
    write_caffemodel(tmp_path / "w.caffemodel", net, random_blobs(net))
    code = main(["prune", "--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
                 "--criterion", "lasso", "--percent", "0.5", "--calib-images", "64", "--samples-per-image", "4",
                 "--calib-net", str(tmp_path / "calib.prototxt"), "--output", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["criterion"] == "lasso" and report["reconstruction"]["calibration"]["images"] == 64
    assert all(0 <= r["error_reconstructed"] for r in report["reconstruction"]["layers"])
    assert "refitted" in capsys.readouterr().out


def test_a_deploy_net_without_a_calibration_source_is_refused():
    net = parse_net(VGG)
    with pytest.raises(PruneError, match="--calib-net"):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"))


def test_without_scipy_lasso_is_refused_before_any_calibration_pass(monkeypatch):
    net = parse_net(VGG)
    cal = Calibration(images=16, net=calib_net(3, 8, 8), progress=False)
    monkeypatch.setitem(sys.modules, "scipy.linalg.blas", None)
    monkeypatch.setattr(StatsPass, "run", lambda *a, **k: pytest.fail("a calibration pass ran"))
    with pytest.raises(PruneError, match=r"pip install 'slim\[lasso\]'"):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"), calibration=cal)


def test_calibration_images_of_another_shape_are_refused():
    net = parse_net(VGG)
    cal = Calibration(images=16, net=calib_net(3, 6, 6), progress=False)
    with pytest.raises(PruneError, match=r"shape \(3, 6, 6\)"):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"), calibration=cal)


def test_too_few_images_for_a_layer_select_its_inputs_but_do_not_refit_it():
    """fc reads 8 x 4 x 4 = 128 values per image: 40 images cannot refit it. LASSO still chooses conv3's channels
    (its Gram form needs no more rows than channels); fc's kept weights are sliced, and the report says why."""
    net = parse_net(VGG)
    with pytest.warns(UserWarning, match="cannot refit fc"):
        result = prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"),
                           calibration=calibration(VGG, images=40))
    assert len(result.report.kept["conv3"]) == 4
    fc = {r["layer"]: r for r in result.report.reconstruction["layers"]}["fc"]
    assert not fc["refitted"] and "raise --calib-images" in fc["note"]
    assert fc["error_reconstructed"] == fc["error_pruned"]
    assert any("did not refit fc" in w for w in result.report.warnings)
    assert "sliced, not refitted" in str(result.report)


@pytest.mark.parametrize("kw, match", [({"images": 1}, "--calib-images"), ({"rank_tol": -1}, "--rank-tol"),
                                       ({"samples_per_image": 0}, "--samples-per-image")])
def test_bad_calibration_settings_are_refused(kw, match):
    net = parse_net(VGG)
    with pytest.raises(PruneError, match=match):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"),
                  calibration=calibration(VGG, **kw))


def test_absorb_bias_with_lasso_is_refused():
    net = parse_net(VGG)
    with pytest.raises(PruneError, match="--absorb-bias"):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"), absorb_bias=True,
                  calibration=calibration(VGG))


def test_a_net_lasso_cannot_reconstruct_at_all_is_one_clear_error():
    text = inp() + cbr("conv1", "data", 6) + """
layer { name: "up" type: "Deconvolution" bottom: "conv1" top: "up"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 weight_filler { type: "msra" } } }
"""
    net = parse_net(text)
    with pytest.warns(UserWarning), pytest.raises(PruneError, match="Deconvolution"):
        prune_net(net, random_blobs(net), PrunePolicy(percent=0.5, criterion="lasso"), calibration=calibration(text))


def test_explain_says_what_lasso_cannot_do(tmp_path, capsys):
    text = inp() + cbr("conv1", "data", 6) + cbr("conv2", "conv1", 6) + """
layer { name: "up" type: "Deconvolution" bottom: "conv2" top: "up"
        convolution_param { num_output: 4 kernel_size: 2 stride: 2 weight_filler { type: "msra" } } }
""" + ip("fc", "up", 3)
    (tmp_path / "n.prototxt").write_text(text)
    assert main(["prune", "--model", str(tmp_path / "n.prototxt"), "--explain", "--criterion", "lasso",
                 "--calib-images", "100"]) == 0
    out = capsys.readouterr().out
    assert "lasso keeps conv2's output channels whole: its channels are read by 'up'" in out
    assert "lasso selects fc's inputs but cannot refit it" in out and "raise --calib-images" in out


def test_source_points_the_calibration_at_local_data_and_the_written_net_keeps_its_own(tmp_path, capsys,
                                                                                       monkeypatch):
    # A net made elsewhere names a training LMDB that is not here (its test LMDB is): --source calibrates on a local
    # one, the prototxt and the pruned net keep the source they name; the criteria that read no data refuse the flag.
    pytest.importorskip("lmdb")
    from slim.io import read_net, write_caffemodel
    from tests.solver_helpers import lmdb_tiny_net

    text, train_db, test_db = lmdb_tiny_net(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "digits").mkdir(parents=True)
    (tmp_path / "examples" / "digits" / "test_lmdb").symlink_to(test_db)
    (tmp_path / "net.prototxt").write_text(text)
    net = parse_net(text)
    write_caffemodel(tmp_path / "w.caffemodel", net, random_blobs(net))
    argv = ["prune", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"), "--percent", "0.5",
            "--output", str(tmp_path / "out")]
    lasso = ["--criterion", "lasso", "--calib-images", "40", "--samples-per-image", "2"]
    assert main(argv + lasso) == 2
    assert "examples/digits/train_lmdb" in capsys.readouterr().err
    assert main(argv + lasso + ["--source", f"data@TRAIN={train_db}"]) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["reconstruction"]["calibration"]["sources"] == [f"data@TRAIN={train_db}"]
    assert [lp.data_param.source for lp in read_net(tmp_path / "out.prototxt").layer if lp.type == "Data"] == \
        ["examples/digits/train_lmdb", "examples/digits/test_lmdb"]
    capsys.readouterr()
    assert main(argv + ["--source", f"data@TRAIN={train_db}"]) == 2
    assert "--source data@TRAIN=" in capsys.readouterr().err
