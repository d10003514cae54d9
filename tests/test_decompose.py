"""slim decompose (3C: spatial and channel decomposition, channel pruning, combineHP) on tiny nets: full rank is
exact, the written files equal the in-memory net (and OpenCV agrees), the data-driven fits lower the held-out error,
any kernel/stride/pad/dilation splits, a MAC target is met, bad input is one clear error."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("scipy")

from slim.cli import main  # noqa: E402
from slim.decompose import DecomposePolicy, decompose_net, write_decomposed  # noqa: E402
from slim.decompose import factor  # noqa: E402
from slim.decompose.rewrite import LayerPlan, decomposed_net, fold_mix  # noqa: E402
from slim.errors import DecomposeError  # noqa: E402
from slim.graph import build_graph  # noqa: E402
from slim.io import parse_net, write_caffemodel  # noqa: E402
from slim.net import Net  # noqa: E402
from slim.prune import Calibration  # noqa: E402
from tests.test_prune_exact import conv, forward, inp, ip, random_blobs, relu  # noqa: E402
from tests.test_prune_lasso import calib_net  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread is 10-30x faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rconv(name, bottom, n, kh, kw, sh=1, sw=1, ph=0, pw=0, dilation=(), bias=True):
    """A convolution with Caffe's rectangular fields."""
    dil = "".join(f" dilation: {d}" for d in dilation)
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param {{ '
            f'num_output: {n} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw}'
            f'{dil} bias_term: {"true" if bias else "false"} weight_filler {{ type: "msra" }} }} }}\n')


SIZE = (3, 12, 12)
# conv2: 3x5 with rectangular pad; conv3: 3x3 stride 2 (no ReLU after: the linear fits); conv4: 5x3, stride (2, 1),
# dilation (1, 2); the fc reads it.
NET = (inp(*SIZE) + conv("conv1", "data", 8, bias=True) + relu("relu1", "conv1")
       + rconv("conv2", "conv1", 12, 3, 5, ph=1, pw=2) + relu("relu2", "conv2")
       + conv("conv3", "conv2", 10, bias=True, stride=2)
       + rconv("conv4", "conv3", 9, 5, 3, sh=2, sw=1, ph=2, pw=2, dilation=(1, 2)) + relu("relu4", "conv4")
       + ip("fc", "conv4", 5))
FULL = {"spatial": {"conv2": 24, "conv3": 30, "conv4": 27},          # min(c k_h, n k_w)
        "channel": {"conv2": 12, "conv3": 10, "conv4": 9},           # n
        "3c": {"conv2": 24, "conv3": 30, "conv4": 27}}
LOW = {"conv2": 5, "conv3": 6, "conv4": 5}


def calibration(images=96, **kw):
    kw.setdefault("samples_per_image", 8)
    return Calibration(images=images, net=calib_net(*SIZE), progress=False, **kw)


def blobs_with_bias(net, seed=1, bias=0.5):
    """Random blobs whose convolutions carry a sizeable bias (a dropped bias shows at once)."""
    blobs = random_blobs(net, seed=seed)
    rng = np.random.default_rng(seed)
    for name in ("conv1", "conv2", "conv3", "conv4"):
        if name in blobs and len(blobs[name]) > 1:
            blobs[name][1] = (bias + rng.normal(0, 0.2, blobs[name][1].shape)).astype(np.float32)
    return blobs


def images(n=4, seed=5):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (n,) + SIZE).astype(np.float32))


def assert_close(want, got, rel):
    for key in want:
        scale = max(1.0, float(want[key].abs().max()))
        err = float((want[key] - got[key]).abs().max())
        assert err <= rel * scale, f"{key}: max error {err:g} at scale {scale:g}"


GEOMETRIES = [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 5), (1, 1), (1, 2), (1, 1)), ((5, 3), (2, 1), (2, 0), (1, 2)),
              ((3, 3), (2, 2), (0, 1), (2, 1)), ((2, 4), (1, 3), (0, 0), (1, 1)), ((1, 3), (1, 2), (0, 1), (1, 1))]


@pytest.mark.parametrize("kernel, stride, pad, dilation", GEOMETRIES)
def test_the_spatial_split_at_full_rank_is_the_convolution(kernel, stride, pad, dilation):
    """Vertical (k_h x 1, the vertical stride/pad/dilation) then horizontal (1 x k_w, the horizontal ones)."""
    rng = np.random.default_rng(0)
    n, c = 6, 4
    W = rng.normal(size=(n, c) + kernel).astype(np.float32)
    full = min(c * kernel[0], n * kernel[1])
    f = factor.spatial_split(W, full)
    assert f.vertical.shape == (full, c, kernel[0], 1) and f.horizontal.shape == (n, full, 1, kernel[1])
    x = torch.randn(2, c, 11, 13)
    want = F.conv2d(x, torch.from_numpy(W), None, stride, pad, dilation)
    v = F.conv2d(x, torch.from_numpy(f.vertical), None, (stride[0], 1), (pad[0], 0), (dilation[0], 1))
    got = F.conv2d(v, torch.from_numpy(f.horizontal), None, (1, stride[1]), (0, pad[1]), (1, dilation[1]))
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_a_truncated_split_is_the_best_rank_d_kernel():
    """At rank d the chain computes the convolution with the rank-d truncation of the reshaped kernel."""
    rng = np.random.default_rng(1)
    W = rng.normal(size=(5, 3, 3, 3))
    d = 4
    M = factor.spatial_matrix(W)
    U, s, Vt = np.linalg.svd(M)
    Md = (U[:, :d] * s[:d]) @ Vt[:d]
    Wd = Md.reshape(3, 3, 5, 3).transpose(2, 0, 1, 3)             # back to (n, c, k_h, k_w)
    f = factor.spatial_split(W.astype(np.float32), d)
    chain = np.einsum("kcy,nkx->ncyx", f.vertical[..., 0].astype(np.float64), f.horizontal[:, :, 0].astype(np.float64))
    np.testing.assert_allclose(chain, Wd, atol=1e-5)
    np.testing.assert_allclose(f.singular_values, s)


@pytest.mark.parametrize("method", ["spatial", "channel", "3c"])
@pytest.mark.parametrize("refit", [False, True])
def test_full_rank_reproduces_the_net(method, refit):
    """Full rank (and no pruning) is exact, data-free or fitted; the biases (0.5 on every layer) are kept."""
    net = parse_net(NET)
    blobs = blobs_with_bias(net)
    policy = DecomposePolicy(method=method, ranks=FULL[method], refit=refit, prune_ratio=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs, policy, calibration=calibration() if refit else None)
    x = images()
    assert_close(forward(net, blobs, x), forward(result.net, result.blobs, x), 2e-4)
    for r in result.report.layers:
        if refit:
            assert r.error_fit < 2e-4 and r.error_final < 2e-4, r
        else:
            assert r.error_fit is None


@pytest.mark.parametrize("method", ["spatial", "channel", "3c"])
def test_the_written_net_equals_the_decomposed_net_in_memory(method, tmp_path):
    net = parse_net(NET)
    blobs = blobs_with_bias(net, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs, DecomposePolicy(method=method, ranks=LOW), calibration=calibration())
    x = images()
    want = forward(result.net, result.blobs, x)
    paths = write_decomposed(result, tmp_path / "dec")
    written = Net(str(paths["prototxt"]), weights=str(paths["caffemodel"]))
    with torch.no_grad():
        got = written(x)
    assert_close(want, got, 1e-5)
    text = paths["prototxt"].read_text()
    assert "kernel_h" in text and "kernel_size" not in text.split("conv2_")[1].split("layer {")[0]
    report = json.loads(paths["report"].read_text())
    assert report["format"] == "slim-decompose-report" and len(report["layers"]) == 3
    for layer in report["layers"]:
        assert layer["macs_after"] < layer["macs_before"]
        assert 0 <= layer["error_fit"] and 0 <= layer["error_final"]
    # The file holds exactly the chains' layers in place of the convolutions, and the rest untouched.
    names = [lp.name for lp in result.net.layer]
    assert "conv2" not in names and "conv1" in names and "fc" in names


def test_the_written_chain_computes_the_truncated_kernel(tmp_path):
    """Independently of slim's own reader: the data-free split's written layers, run by torch with the geometry read
    from the file's fields, equal the convolution with the rank-d kernel (rectangular, strided, dilated conv4)."""
    net = parse_net(NET)
    blobs = blobs_with_bias(net, seed=3)
    result = decompose_net(net, blobs, DecomposePolicy(method="spatial", ranks={"conv4": 7}, refit=False))
    layers = {lp.name: lp for lp in result.net.layer}
    v, h = layers["conv4_v"].convolution_param, layers["conv4_h"].convolution_param
    assert (v.kernel_h, v.kernel_w, v.stride_h, v.stride_w, v.pad_h, v.pad_w, list(v.dilation)) == (5, 1, 2, 1, 2, 0,
                                                                                                      [])
    assert (h.kernel_h, h.kernel_w, h.stride_h, h.stride_w, h.pad_h, h.pad_w, list(h.dilation)) == (1, 3, 1, 1, 0, 2,
                                                                                                      [1, 2])
    assert not v.bias_term and h.bias_term
    x = torch.randn(2, 10, 6, 6)
    W = blobs["conv4"][0]
    M = factor.spatial_matrix(W)
    U, s, Vt = np.linalg.svd(M)
    Wd = ((U[:, :7] * s[:7]) @ Vt[:7]).reshape(10, 5, 9, 3).transpose(2, 0, 1, 3).astype(np.float32)
    want = F.conv2d(x, torch.from_numpy(Wd), torch.from_numpy(blobs["conv4"][1]), (2, 1), (2, 2), (1, 2))
    y = F.conv2d(x, torch.from_numpy(result.blobs["conv4_v"][0]), None, (v.stride_h, v.stride_w),
                 (v.pad_h, v.pad_w), tuple(v.dilation) or 1)
    got = F.conv2d(y, torch.from_numpy(result.blobs["conv4_h"][0]), torch.from_numpy(result.blobs["conv4_h"][1]),
                   (h.stride_h, h.stride_w), (h.pad_h, h.pad_w), tuple(h.dilation))
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("method", ["spatial", "channel", "3c"])
def test_the_data_driven_fit_lowers_the_held_out_error(method):
    net = parse_net(NET)
    blobs = blobs_with_bias(net, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs, DecomposePolicy(method=method, ranks=LOW, prune_ratio=1),
                               calibration=calibration(images=160))
    layers = {r.layer: r for r in result.report.layers}
    for name, r in layers.items():
        assert r.samples[0] > 0 and r.samples[1] > 0
        if r.relu:
            assert r.error_fit_relu < r.error_svd_relu, r
        else:
            assert r.error_fit < r.error_svd, r
    assert layers["conv2"].relu and not layers["conv3"].relu and layers["conv4"].relu
    # conv2 reads the untouched conv1: its error in the written net is its fitted error (other sampled positions).
    r = layers["conv2"]
    assert r.error_final_relu == pytest.approx(r.error_fit_relu, rel=0.25)
    assert "output fc" in str(result.report) or result.report.outputs


def test_opencv_runs_the_decomposed_net(tmp_path):
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip("OpenCV without the Caffe importer")
    net = parse_net(NET)
    blobs = blobs_with_bias(net, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs, DecomposePolicy(method="3c", ranks=LOW), calibration=calibration())
    paths = write_decomposed(result, tmp_path / "cv")
    ours = Net(str(paths["prototxt"]), weights=str(paths["caffemodel"]))
    x = images(2).numpy()
    with torch.no_grad():
        ref = ours(torch.from_numpy(x))[ours.outputs[0]].numpy()
    cv_net = cv2.dnn.readNetFromCaffe(str(paths["prototxt"]), str(paths["caffemodel"]))
    cv_net.setInput(x)
    theirs = cv_net.forward()
    np.testing.assert_allclose(theirs, ref.reshape(theirs.shape), rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_3c_prunes_the_outputs_read_by_decomposed_layers_and_folds_where_cheaper():
    """conv2 feeds conv3 (decomposed): its outputs are pruned to max(floor(12 / 1.15), d') = 10; conv4 feeds the fc:
    kept whole. conv3's 1x1 layer folds (3 d' >= 2 n: 3 x 8 >= 2 x 10), conv2's does not (3 x 4 < 2 x 10)."""
    net = parse_net(NET)
    blobs = blobs_with_bias(net, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs, DecomposePolicy(method="3c", ranks={"conv2": 4, "conv3": 8}),
                               calibration=calibration())
    layers = {r.layer: r for r in result.report.layers}
    assert layers["conv2"].kept_outputs == 10 and layers["conv3"].kept_outputs is None
    assert not layers["conv2"].folded and layers["conv2"].layers == ["conv2_v", "conv2_h", "conv2_p"]
    assert layers["conv3"].folded and layers["conv3"].layers == ["conv3_v", "conv3_h"]
    graph = build_graph(result.net, "TEST")
    assert graph.layer("conv2_p").layer.channels_out == 10 and graph.layer("conv3_h").layer.channels_out == 10
    assert result.report.pruning["widths"] == {"conv2_p": {"before": 12, "after": 10}}


def test_folding_the_1x1_layer_is_exact():
    net = parse_net(NET)
    graph = build_graph(net, "TEST")
    blobs = blobs_with_bias(net, seed=7)
    plans = [LayerPlan("conv2", "3c", 6, 5)]
    dnet = decomposed_net(net, graph, plans)
    from slim.decompose.fit import data_free
    dblobs = {k: v for k, v in blobs.items() if k != "conv2"}
    data_free(plans[0], blobs["conv2"][0], blobs["conv2"][1], dblobs)
    x = images()
    want = forward(dnet, dblobs, x)
    folded = fold_mix(dnet, dblobs, plans[0], None)
    assert "conv2_p" not in [lp.name for lp in folded.layer]
    assert_close(want, forward(folded, dblobs, x), 1e-5)


def test_relu_aware_least_squares_fits_the_rectified_responses_better():
    """Targets that are mostly negative: the linear fit spends itself on values the ReLU discards."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 12, generator=g)
    Y = torch.relu(X @ torch.randn(12, 6, generator=g)) * 3 - 2 + 0.3 * torch.randn(3000, 6, generator=g)
    Y = Y * (X[:, :1] > 0) - 2 * (X[:, :1] <= 0)
    linear = factor.least_squares_fit(X[:2000], Y[:2000], 1e-6)
    relu_fit = factor.relu_least_squares(X[:2000], Y[:2000], 1e-6)
    Xt = torch.cat([X[2000:], torch.ones(1000, 1)], 1).double()
    e_lin = factor.errors(Xt @ torch.from_numpy(linear), Y[2000:].double())[1]
    e_relu = factor.errors(Xt @ torch.from_numpy(relu_fit), Y[2000:].double())[1]
    assert e_relu < 0.9 * e_lin


def test_the_linear_channel_decomposition_is_reduced_rank_regression():
    """Without a ReLU the GSVD is one T-step: the optimal rank-d' linear map, no worse than any other rank-d' map
    (here the data-free one), and exact at d' = n."""
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(4000, 8, generator=g) @ torch.randn(8, 8, generator=g) + 1.0
    Yo = Y @ torch.randn(8, 8, generator=g) * 0.3 + Y
    b = np.full(8, 0.2)
    for rank in (2, 5):
        cf = factor.channel_gsvd(Y, Yo, rank, b, relu=False)
        T = torch.from_numpy(cf.transform()).float()
        fit = (Y - torch.from_numpy(b).float()) @ T + torch.from_numpy(cf.bias).float()
        # Reduced-rank regression in closed form: project the least-squares fit onto its top principal directions.
        Yt = torch.cat([Y, torch.ones(len(Y), 1)], 1).double()
        full = Yt @ torch.linalg.lstsq(Yt, Yo.double()).solution
        _, _, Vt = torch.linalg.svd(full - full.mean(0), full_matrices=False)
        best = (full - full.mean(0)) @ Vt[:rank].T @ Vt[:rank] + full.mean(0)
        assert factor.errors(fit, Yo)[0] == pytest.approx(factor.errors(best, Yo.double())[0], rel=1e-3)
    cf = factor.channel_gsvd(Y, Y, 8, b, relu=True)
    np.testing.assert_allclose(cf.transform(), np.eye(8), atol=1e-4)


WIDE = (inp(3, 16, 16) + conv("conv1", "data", 16, bias=True) + relu("relu1", "conv1")
        + conv("conv2", "conv1", 32, bias=True) + relu("relu2", "conv2")
        + conv("conv3", "conv2", 32, bias=True, stride=2) + relu("relu3", "conv3")
        + rconv("conv4", "conv3", 48, 3, 5, ph=1, pw=2) + relu("relu4", "conv4") + ip("fc", "conv4", 10))


@pytest.mark.parametrize("method, speedup", [("spatial", 1.5), ("channel", 1.3), ("3c", 2.0)])
def test_a_speedup_target_is_met_within_one_percent(method, speedup):
    net = parse_net(WIDE)
    blobs = random_blobs(net, seed=8)
    result = decompose_net(net, blobs, DecomposePolicy(method=method, speedup=speedup, refit=False, prune_ratio=1))
    r = result.report
    assert r.macs_after == pytest.approx(r.macs_before / speedup, rel=0.01), (method, r.macs_after)
    assert r.budget["macs_target"] == pytest.approx(r.macs_before / speedup)
    assert r.budget["macs_planned"] == pytest.approx(r.macs_after)
    if method == "spatial":
        assert "conv1" not in [x.layer for x in r.layers]    # 3 input channels: no spatial split saves anything


def test_ranks_follow_the_spectrum():
    """A layer whose weight is nearly rank 4 gets a lower rank than one with a flat spectrum."""
    net = parse_net(WIDE)
    blobs = random_blobs(net, seed=9)
    W = blobs["conv3"][0]
    f = factor.spatial_split(W, 4)
    low = np.einsum("kcy,nkx->ncyx", f.vertical[..., 0], f.horizontal[:, :, 0])
    blobs["conv3"][0] = (low + 1e-3 * W).astype(np.float32)
    result = decompose_net(net, blobs, DecomposePolicy(method="spatial", speedup=1.6, refit=False))
    ranks = {r.layer: r.rank for r in result.report.layers}
    assert ranks["conv3"] <= 6 < ranks["conv2"]


BAD = [
    ({"ranks": {"relu2": 3}}, "relu2.*ReLU layer.*2-D Convolution"),
    ({"ranks": {"nope": 3}}, "'nope', which is not in"),
    ({"ranks": {"conv2": 25}}, r"--rank conv2=25 is out of range.*1 to 24"),
    ({"ranks": {"conv2": 0}}, "positive whole number"),
    ({"method": "channel", "ranks": {"conv3": 11}}, "--rank conv3=11 is out of range.*1 to 10"),
    ({"ranks": {"conv2": 4}, "channel_ranks": {"conv2": 13}}, "--channel-rank conv2=13 is out of range"),
    ({"method": "spatial", "ranks": {"conv2": 4}, "channel_ranks": {"conv2": 3}}, "--channel-rank applies to"),
    ({}, "Say what to decompose"),
    ({"speedup": 0.5}, "--speedup must be"),
    ({"speedup": 40.0, "refit": False}, "cannot be reached"),
    ({"ranks": {"conv2": 4}, "prune_ratio": 0.5}, "--prune-ratio"),
    ({"method": "tucker", "ranks": {"conv2": 4}}, "--method must be one of"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_bad_requests_are_one_clear_error(kw, match):
    net = parse_net(NET)
    with pytest.raises(DecomposeError, match=match):
        decompose_net(net, blobs_with_bias(net), DecomposePolicy(**kw), calibration=calibration())


def test_layers_that_cannot_be_split_are_refused_by_name():
    text = inp(*SIZE) + conv("g", "data", 6, group=3) + conv("one", "g", 4, k=1) + ip("fc", "one", 3)
    net = parse_net(text)
    blobs = random_blobs(net)
    with pytest.raises(DecomposeError, match="'g'.*group 3"):
        decompose_net(net, blobs, DecomposePolicy(ranks={"g": 2}, refit=False))
    with pytest.raises(DecomposeError, match="'one'.*1x1.*--method channel"):
        decompose_net(net, blobs, DecomposePolicy(ranks={"one": 2}, refit=False))
    result = decompose_net(net, blobs, DecomposePolicy(method="channel", ranks={"one": 2}, refit=False))
    assert [r.layer for r in result.report.layers] == ["one"]


def test_a_deploy_net_without_a_calibration_source_is_refused():
    net = parse_net(NET)
    with pytest.raises(DecomposeError, match="--calib-net.*--no-refit"):
        decompose_net(net, blobs_with_bias(net), DecomposePolicy(ranks=LOW))


def test_the_cli_writes_net_weights_and_report(tmp_path, capsys):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "calib.prototxt").write_text(
        f'layer {{ name: "data" type: "DummyData" top: "data" dummy_data_param {{ shape {{ dim: 8 dim: {SIZE[0]} '
        f'dim: {SIZE[1]} dim: {SIZE[2]} }} data_filler {{ type: "gaussian" std: 1 }} }} }}\n')
    net = parse_net(NET)
    write_caffemodel(tmp_path / "w.caffemodel", net, blobs_with_bias(net))
    args = ["decompose", "--model", str(tmp_path / "net.prototxt"), "--weights", str(tmp_path / "w.caffemodel"),
            "--rank", "conv2=5", "--rank", "conv3=6", "--calib-net", str(tmp_path / "calib.prototxt"),
            "--calib-images", "48", "--samples-per-image", "4", "--output", str(tmp_path / "out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    captured = capsys.readouterr()
    assert "[decompose 1/2] conv2" in captured.err and "wrote" in captured.out
    report = json.loads((tmp_path / "out.json").read_text())
    assert [x["layer"] for x in report["layers"]] == ["conv2", "conv3"]
    assert report["layers"][0]["rank"] == 5 and report["calibration"]["images"] == 48
    Net(str(tmp_path / "out.prototxt"), weights=str(tmp_path / "out.caffemodel"))
    # Bad flags: one line, exit status 2, the flag named.
    assert main(args[:5] + ["--rank", "conv2", "--output", str(tmp_path / "bad")]) == 2
    assert "--rank takes LAYER=D" in capsys.readouterr().err
    assert main(args[:3] + ["--rank", "conv2=5", "--output", str(tmp_path / "bad")]) == 2
    assert "--weights is required" in capsys.readouterr().err
    assert not (tmp_path / "bad.prototxt").exists()


def test_too_few_samples_keep_the_data_free_factors_and_say_so():
    """7 fit samples cannot fit conv2's horizontal layer (5 x 5 inputs + 1) nor its 12-output channel split."""
    net = parse_net(NET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs_with_bias(net), DecomposePolicy(method="3c", ranks={"conv2": 5},
                                                                           prune_ratio=1),
                               calibration=calibration(images=8, samples_per_image=1))
    r = result.report.layers[0]
    assert r.samples[0] == 7 and "needs 26 samples" in r.note and "needs 13 samples" in r.note
    assert r.error_fit == pytest.approx(r.error_svd)
    assert any("raise --calib-images" in w for w in result.report.warnings)
    assert 0 < r.spectrum_kept < 1


def test_a_fit_on_few_samples_must_beat_the_data_free_factors_on_validation_samples():
    from slim.decompose.fit import VALIDATE, _validated
    notes = []
    calls = []

    def fit(lo, hi):
        calls.append((lo, hi))
        return "fitted"

    worse = lambda m, lo, hi: 1.0 if m == "fitted" else 0.5
    better = lambda m, lo, hi: 0.1 if m == "fitted" else 0.5
    assert _validated(100, 50, fit, better, "free", "x", notes) == "fitted" and calls == [(0, 80), (0, 100)]
    assert _validated(100, 50, fit, worse, "free", "x", notes) == "free" and "did not beat" in notes[-1]
    assert _validated(40, 50, fit, better, "free", "x", notes) == "free" and "needs 50 samples" in notes[-1]
    calls.clear()
    assert _validated(50 * VALIDATE, 50, fit, worse, "free", "x", notes) == "fitted" and calls == [(0, 500)]


def test_calibration_images_of_another_shape_are_refused():
    net = parse_net(NET)
    cal = Calibration(images=16, net=calib_net(3, 10, 10), progress=False)
    with pytest.raises(DecomposeError, match=r"shape \(3, 10, 10\).*--calib-net"):
        decompose_net(net, blobs_with_bias(net), DecomposePolicy(ranks=LOW), calibration=cal)


def test_a_train_val_net_calibrates_on_its_own_train_data_and_keeps_every_phase(tmp_path):
    """No --calib-net: the TRAIN-phase DummyData supplies the images; the loss and Accuracy layers (fixed batch) are
    not run by the passes; both phases of the written net run."""
    data = ''.join(
        f'layer {{ name: "data" type: "DummyData" top: "data" top: "label" include {{ phase: {phase} }} '
        f'dummy_data_param {{ shape {{ dim: {batch} dim: 3 dim: 12 dim: 12 }} shape {{ dim: {batch} }} '
        f'data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}\n'
        for phase, batch in (("TRAIN", 8), ("TEST", 4)))
    text = data + NET.split("\n", 1)[1] + '''
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" include { phase: TEST } }
'''
    net = parse_net(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = decompose_net(net, blobs_with_bias(net), DecomposePolicy(method="3c", ranks={"conv2": 5}),
                               calibration=Calibration(images=40, samples_per_image=4, progress=False))
    assert result.report.calibration["source"].startswith("data layer 'data'")
    assert result.report.layers[0].error_final is not None and not result.report.outputs
    paths = write_decomposed(result, tmp_path / "tv")
    for phase in ("TRAIN", "TEST"):
        out = Net(str(paths["prototxt"]), weights=str(paths["caffemodel"]), phase=phase)()
        assert torch.isfinite(out.loss)
