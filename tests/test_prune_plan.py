"""Importance criteria and policies: exact counts, deterministic ties, constraints, targets, and clear errors."""

import math
from pathlib import Path

import numpy as np
import pytest

from slim.errors import PruneError, WeightsError
from slim.graph import build_graph
from slim.io import parse_net, read_net
from slim.prune import PrunePolicy, analyze, channel_scores, conv_fc_macs, criteria, prune_net, rewrite_net

NETS = Path(__file__).resolve().parents[1] / "nets"


def inp(c=3, h=6, w=6):
    return f'layer {{ name: "input" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {c} dim: {h} ' \
           f'dim: {w} }} }} }}\n'


def cbs(name, bottom, n, top=None):
    top = top or name
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 bias_term: false }} }}\n'
            f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{top}" top: "{top}" }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{top}" top: "{top}" '
            f'scale_param {{ bias_term: true }} }}\n'
            f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{top}" top: "{top}" }}\n')


def fc(name, bottom, n):
    return f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" ' \
           f'inner_product_param {{ num_output: {n} }} }}\n'


CHAIN = inp() + cbs("c1", "data", 10) + cbs("c2", "c1", 20) + cbs("c3", "c2", 30) + fc("fc", "c3", 4)


def synthetic_blobs(net, seed=0, gammas=None):
    """Random blobs of the right shapes; BatchNorm statistics sane; Scale gammas from ``gammas`` when given."""
    graph = build_graph(net)
    rng = np.random.default_rng(seed)
    blobs = {}
    for node in graph.layers:
        arrays = [rng.normal(0, 0.1, s).astype(np.float32) for s in node.blob_shapes]
        if node.type == "BatchNorm":
            arrays[1] = np.abs(arrays[1]) + 1
            arrays[2] = np.ones(node.blob_shapes[2], np.float32)
        if node.type == "Scale" and gammas is not None and node.name in gammas:
            arrays[0] = np.asarray(gammas[node.name], np.float32)
        if arrays:
            blobs[node.name] = arrays
    return blobs


def kept(result):
    return {c.name: c.kept for c in result.report.layers}


def test_global_percent_removes_exactly_floor_n_p_lowest_gammas():
    rng = np.random.default_rng(1)
    values = rng.permutation(60) / 60.0 + 0.01
    gammas = {"c1/scale": values[:10], "c2/scale": values[10:30], "c3/scale": values[30:]}
    net = parse_net(CHAIN)
    result = prune_net(net, synthetic_blobs(net, gammas=gammas), PrunePolicy(percent=0.35))
    k = math.floor(60 * 0.35)
    assert result.report.removed == k == result.report.requested
    assert result.report.fraction == pytest.approx(k / 60)
    threshold = np.sort(values)[k]
    for name, scale in (("c1", "c1/scale"), ("c2", "c2/scale"), ("c3", "c3/scale")):
        assert kept(result)[name] == [int(i) for i in np.nonzero(gammas[scale] >= threshold)[0]]
    assert kept(result)["fc"] == [0, 1, 2, 3]        # the net output is never pruned


def test_ties_are_broken_by_group_then_index_and_plans_repeat():
    net = parse_net(CHAIN)
    gammas = {"c1/scale": np.full(10, 0.5), "c2/scale": np.full(20, 0.5), "c3/scale": np.full(30, 0.5)}
    blobs = synthetic_blobs(net, gammas=gammas)
    with pytest.raises(PruneError, match=r"--percent 0.5 would leave 2 layers .* with a single channel \(c1 10 -> 1, "
                                         r"c2 20 -> 1\).*give --min-channels 1 to accept it"):
        prune_net(net, blobs, PrunePolicy(percent=0.5))
    first = prune_net(net, blobs, PrunePolicy(percent=0.5, min_channels=1))
    # 30 to remove: c1 may lose 9 (one stays), then c2's first 19 are next in order, then c3's first 2.
    assert kept(first)["c1"] == [9]
    assert kept(first)["c2"] == [19]
    assert kept(first)["c3"] == list(range(2, 30))
    again = prune_net(net, blobs, PrunePolicy(percent=0.5, min_channels=1))
    assert kept(again) == kept(first)


@pytest.mark.parametrize("policy, check", [
    (PrunePolicy(percent=0.9, min_channels=4), lambda k: all(len(v) >= 4 for v in k.values())),
    (PrunePolicy(percent=0.6, min_fraction=0.5), lambda k: len(k["c1"]) >= 5 and len(k["c2"]) >= 10
     and len(k["c3"]) >= 15),
    (PrunePolicy(percent=0.45, max_prune=0.5), lambda k: len(k["c1"]) >= 5 and len(k["c2"]) >= 10
     and len(k["c3"]) >= 15),
    (PrunePolicy(percent=0.5, round_to=8), lambda k: all(len(k[n]) % 8 == 0 or len(k[n]) == w
                                                         for n, w in (("c1", 10), ("c2", 20), ("c3", 30)))),
    (PrunePolicy(percent=0.5, scope="layer"), lambda k: (len(k["c1"]), len(k["c2"]), len(k["c3"])) == (5, 10, 15)),
    (PrunePolicy(layer_percent={"c2": 0.25}), lambda k: (len(k["c1"]), len(k["c2"]), len(k["c3"])) == (10, 15, 30)),
    (PrunePolicy(percent=0.99, min_channels=1), lambda k: all(len(v) >= 1 for v in k.values())),
])
def test_constraints(policy, check):
    net = parse_net(CHAIN)
    result = prune_net(net, synthetic_blobs(net, 2), policy)
    assert check(kept(result)), kept(result)


def test_limits_win_over_the_request_and_the_report_says_so():
    net = parse_net(CHAIN)
    result = prune_net(net, synthetic_blobs(net), PrunePolicy(percent=0.6, max_prune=0.5))
    assert result.report.requested == 36 and result.report.removed == 30
    assert result.report.fraction == 0.5
    assert "36 channels were asked for" in str(result.report)


TIED = inp() + cbs("a", "data", 4) + (
    'layer { name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param { num_output: 4 kernel_size: 1 '
    'bias_term: false } }\nlayer { name: "b/bn" type: "BatchNorm" bottom: "b" top: "b" }\n'
    'layer { name: "b/scale" type: "Scale" bottom: "b" top: "b" scale_param { bias_term: true } }\n'
    'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }\n') + cbs("s", "sum", 4) \
    + fc("fc", "s", 2)
TIED_GAMMAS = {"a/scale": [0.1, 0.2, 0.9, 0.95], "b/scale": [0.15, 0.85, 0.3, 0.96], "s/scale": [0.05, 0.5, 0.6, 0.7]}


@pytest.mark.parametrize("rule, tied_kept, s_kept", [
    ("union", [1, 2, 3], [3]),         # 4 of 8 channels by their strongest member
    ("max", [1, 2, 3], [3]),           # the same ranking under its other name
    ("mean", [2, 3], [2, 3]),
    ("sum", [1, 2, 3], [3]),
])
def test_tie_rules(rule, tied_kept, s_kept):
    net = parse_net(TIED)
    result = prune_net(net, synthetic_blobs(net, gammas=TIED_GAMMAS), PrunePolicy(percent=0.5, tie_rule=rule,
                                                                                  min_channels=1))
    assert kept(result)["a"] == tied_kept == kept(result)["b"]
    assert kept(result)["s"] == s_kept


@pytest.mark.parametrize("zoo", ["resnet20_cifar10", "densenet40_cifar10"])
@pytest.mark.parametrize("rule", ["union", "max", "mean"])
def test_percent_removes_that_fraction_of_the_channels_with_sums_and_concats(zoo, rule):
    # The first hour of a real user: ResNet-164 at --percent 0.5 removed 44.68% under the union rule, and the report
    # said "requested" for what was removed. Now p of the N prunable channels go, and asked is floor(N * p).
    path = NETS / f"{zoo}_deploy.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is absent (generate nets/ with python tools/zoo.py)")
    net = read_net(path)
    blobs = synthetic_blobs(net, seed=4)
    for name, arrays in blobs.items():
        if "scale" in name:
            arrays[0] = np.random.default_rng(len(name)).uniform(0.01, 1, arrays[0].shape).astype(np.float32)
    for p in (0.3, 0.5):
        report = prune_net(net, blobs, PrunePolicy(percent=p, tie_rule=rule, min_channels=1)).report
        assert report.requested == math.floor(report.prunable * p + 1e-9) == report.removed, (p, report)
        assert report.fraction == pytest.approx(p, abs=1 / report.prunable)
        assert f"removed {report.removed} of the {report.prunable} prunable channels" in str(report)
        assert "producer channels" not in str(report)


def test_criteria_score_by_hand():
    net = parse_net(CHAIN)
    blobs = synthetic_blobs(net, 3)
    analysis = analyze(build_graph(net))
    c2 = analysis.blob_channels["c2"]
    l1 = channel_scores(analysis, blobs, "l1").score[c2]
    np.testing.assert_allclose(l1, np.abs(blobs["c2"][0]).reshape(20, -1).sum(1), rtol=1e-6)
    l2 = channel_scores(analysis, blobs, "l2").score[c2]
    np.testing.assert_allclose(l2, np.sqrt((blobs["c2"][0].astype(np.float64) ** 2).reshape(20, -1).sum(1)),
                               rtol=1e-6)
    slim = channel_scores(analysis, blobs, "slimming").score[c2]
    np.testing.assert_allclose(slim, np.abs(blobs["c2/scale"][0]))
    assert {"slimming", "l1", "l2"} <= set(criteria())


def test_dead_filters_take_no_part_in_a_layers_scale():
    # The first hour of a real user: l1's per-layer mean counted zero filters, so a layer with many ranked its live
    # filters far above every other layer's and a global 60% cut ten layers of VGG-16 to one channel.
    net = parse_net(inp() + cbs("c1", "data", 8) + cbs("c2", "c1", 8) + fc("fc", "c2", 4))
    blobs = synthetic_blobs(net)
    pattern = np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1, 1)
    blobs["c1"][0] = np.ones((8, 3, 3, 3), np.float32) * pattern
    blobs["c2"][0] = np.ones((8, 8, 3, 3), np.float32) * pattern * 3 / 8      # the same norms as c1
    blobs["c2"][0][[0, 2, 4]] = 0                                             # three dead filters
    blobs["c2"][0][6] *= 1e-3                                                 # and a nearly dead one
    analysis = analyze(build_graph(net))
    c1, c2 = analysis.blob_channels["c1"], analysis.blob_channels["c2"]
    live = np.array([1, 3, 5, 7])
    for how in ("mean", "max"):
        score = channel_scores(analysis, blobs, "l1", normalize=how).score
        # c2's live filters score as c1's would over the same filters: the dead ones do not inflate them.
        reference = np.arange(1, 9)[live] / (np.arange(1, 9)[live].mean() if how == "mean" else 8)
        np.testing.assert_allclose(score[c2][live], reference, rtol=1e-6)
        assert (score[c2][[0, 2, 4, 6]] < 0.01).all()
    result = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="l1"))
    assert kept(result) == {"c1": [3, 4, 5, 6, 7], "c2": [3, 5, 7], "fc": [0, 1, 2, 3]}   # the dead go first


def test_the_guard_lets_a_limit_or_an_explicit_floor_through():
    net = parse_net(CHAIN)
    blobs = synthetic_blobs(net, gammas={"c1/scale": np.full(10, 1e-3), "c2/scale": np.full(20, 0.5),
                                         "c3/scale": np.full(30, 0.6)})
    with pytest.raises(PruneError, match=r"single channel \(c1 10 -> 1\)"):
        prune_net(net, blobs, PrunePolicy(percent=0.2))
    assert len(kept(prune_net(net, blobs, PrunePolicy(percent=0.2, min_channels=1)))["c1"]) == 1
    assert len(kept(prune_net(net, blobs, PrunePolicy(percent=0.2, min_channels=2)))["c1"]) == 2
    assert len(kept(prune_net(net, blobs, PrunePolicy(percent=0.2, max_prune=0.8)))["c1"]) == 2
    assert len(kept(prune_net(net, blobs, PrunePolicy(layer_percent={"c1": 0.9})))["c1"]) == 1   # asked per layer


def test_a_grouped_convolution_loses_dead_filters_of_one_group_only_needing_equal_counts():
    # The first hour of a real user: 12 dead conv5 filters planted in CaffeNet's group 0 were never removed, because
    # filter j of group 0 was tied to filter j of group 1. A grouped convolution only needs as many per group.
    text = inp(4, 6, 6) + cbs("c1", "data", 8) + (
        'layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 8 '
        'kernel_size: 3 pad: 1 group: 2 } }\n') + fc("fc", "c2", 3)
    net = parse_net(text)
    blobs = synthetic_blobs(net, 6)
    norms = np.array([0, 0, 5, 6, 7, 8, 1, 2], np.float32)                    # group 0: filters 0, 1 dead
    blobs["c2"][0] = np.ones((8, 4, 3, 3), np.float32) * norms.reshape(8, 1, 1, 1)
    blobs["c1/scale"][0] = np.array([0.9, 0.01, 0.8, 0.7, 0.02, 0.6, 0.5, 0.4], np.float32)
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"c2": 0.5}, criterion="l1"))
    # Both dead filters of group 0 and the two weakest of group 1 (tied by position, 0 and 1 stayed with 4 and 5).
    assert kept(result)["c2"] == [2, 3, 4, 5]
    conv = next(l for l in result.net.layer if l.name == "c2").convolution_param
    assert (conv.num_output, conv.group) == (4, 2)
    np.testing.assert_array_equal(result.blobs["c2"][0][:, 0, 0, 0], norms[[2, 3, 4, 5]])
    # Each group of c2 reads its own kept inputs: c1's two weakest gammas sit in different groups (1 and 4).
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"c1": 0.25}))
    assert kept(result)["c1"] == [0, 2, 3, 5, 6, 7] and result.blobs["c2"][0].shape == (8, 3, 3, 3)
    # When one group would lose more than the other, its best removed channels come back: as many in each.
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"c2": 0.25}, criterion="l1"))
    assert kept(result)["c2"] == list(range(8)) and result.report.requested == 2 and "asked 2" in str(result.report)


def _bn_scale(name, top):
    return (f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{top}" top: "{top}" }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{top}" top: "{top}" '
            f'scale_param {{ bias_term: true }} }}\n'
            f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{top}" top: "{top}" }}\n')


# MobileNet v2's inverted residual, in small: expand 1x1, depthwise 3x3, project 1x1.
EXPAND_DW = inp(4) + (
    'layer { name: "expand" type: "Convolution" bottom: "data" top: "e" convolution_param { num_output: 6 '
    'kernel_size: 1 bias_term: false } }\n') + _bn_scale("expand", "e") + (
    'layer { name: "dw" type: "Convolution" bottom: "e" top: "d" convolution_param { num_output: 6 kernel_size: 3 '
    'pad: 1 group: 6 bias_term: false } }\n') + _bn_scale("dw", "d") + cbs("project", "d", 4) + fc("fc", "project", 2)


def test_a_chain_is_scored_by_what_it_computes_a_zero_anywhere_kills_the_channel():
    # The first hour of a real user: 0 of 185 MobileNet v2 channels whose depthwise gamma was 0 were removed while
    # their expand gamma was high. Along a per-channel chain the factors multiply: the chain scores as its minimum.
    net = parse_net(EXPAND_DW)
    gammas = {"expand/scale": [0.9, 0.8, 0.05, 0.7, 0.6, 0.5], "dw/scale": [0.0, 0.9, 0.8, 0.0, 0.7, 0.6],
              "project/scale": [0.3, 0.4, 0.2, 0.1]}
    blobs = synthetic_blobs(net, gammas=gammas)
    analysis = analyze(build_graph(net))
    e = analysis.blob_channels["e"]
    np.testing.assert_array_equal(e, analysis.blob_channels["d"])                 # one channel through the chain
    chains = {s.layer: s.chain for s in analysis.slots if s.factor}
    assert chains["expand/scale"] == chains["dw/scale"] != chains["project/scale"]
    score = channel_scores(analysis, blobs, "slimming").score[e]
    np.testing.assert_allclose(score, np.minimum(gammas["expand/scale"], gammas["dw/scale"]), rtol=1e-6)
    result = prune_net(net, blobs, PrunePolicy(layer_percent={"expand": 0.5}))
    assert kept(result)["expand"] == kept(result)["dw"] == [1, 4, 5]            # 0, 3 dead by dw; 2 by expand
    l1 = channel_scores(analysis, blobs, "l1").score[e]                           # filters on one chain too
    dw_norms = np.abs(blobs["dw"][0]).reshape(6, -1).sum(1)
    expand_norms = np.abs(blobs["expand"][0]).reshape(6, -1).sum(1)
    np.testing.assert_allclose(l1, np.minimum(expand_norms, dw_norms), rtol=1e-6)


def test_branches_of_a_sum_and_readers_of_a_fanned_out_blob_are_separate_chains():
    # Parallel paths keep a channel alive while any of them would (the tie rule); only serial factors multiply.
    analysis = analyze(build_graph(parse_net(TIED)))
    chains = {s.layer: s.chain for s in analysis.slots if s.factor}
    assert len({chains["a/scale"], chains["b/scale"], chains["s/scale"]}) == 3
    fanned = parse_net(inp() + cbs("c", "data", 4) + (
        'layer { name: "x/scale" type: "Scale" bottom: "c" top: "x" scale_param { bias_term: true } }\n'
        'layer { name: "y/scale" type: "Scale" bottom: "c" top: "y" scale_param { bias_term: true } }\n')
        + fc("fx", "x", 2) + fc("fy", "y", 2))
    chains = {s.layer: s.chain for s in analyze(build_graph(fanned)).slots if s.factor}
    assert len({chains["c/scale"], chains["x/scale"], chains["y/scale"]}) == 3


def _resnet56():
    path = NETS / "resnet56_cifar10_deploy.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is absent (generate nets/ with python tools/zoo.py)")
    return read_net(path)


@pytest.mark.parametrize("kind", ["macs", "speedup"])
def test_targets_are_met_within_one_percent(kind):
    net = _resnet56()
    blobs = synthetic_blobs(net, 4)
    before = conv_fc_macs(build_graph(net))
    policy = PrunePolicy(target_macs=0.55 * before) if kind == "macs" else PrunePolicy(speedup=2.0)
    result = prune_net(net, blobs, policy)
    target = 0.55 * before if kind == "macs" else before / 2
    assert result.report.macs_before == before
    assert abs(result.report.macs_after - target) <= 0.01 * target
    assert conv_fc_macs(build_graph(result.net)) == result.report.macs_after


def _onet():
    """MTCNN's ONet (PReLU, InnerProduct after the convolutions): coarse channels, a first layer read by every pixel."""
    text = 'name: "ONet"\n' + inp(3, 48, 48)
    for name, bottom, n, k, pool in (("conv1", "data", 32, 3, (3, 2)), ("conv2", "pool1", 64, 3, (3, 2)),
                                     ("conv3", "pool2", 64, 3, (2, 2)), ("conv4", "pool3", 128, 2, None)):
        text += (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                 f'convolution_param {{ num_output: {n} kernel_size: {k} }} }}\n'
                 f'layer {{ name: "p{name}" type: "PReLU" bottom: "{name}" top: "{name}" }}\n')
        if pool:
            text += (f'layer {{ name: "pool{name[-1]}" type: "Pooling" bottom: "{name}" top: "pool{name[-1]}" '
                     f'pooling_param {{ pool: MAX kernel_size: {pool[0]} stride: {pool[1]} }} }}\n')
    text += fc("conv5", "conv4", 256) + 'layer { name: "prelu5" type: "PReLU" bottom: "conv5" top: "conv5" }\n'
    return parse_net(text + fc("conv6-1", "conv5", 2) + fc("conv6-2", "conv5", 4) + fc("conv6-3", "conv5", 10))


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_speedups_land_within_one_percent_on_coarse_channels(criterion):
    # The first hour of a real user: --speedup 2 on MTCNN's ONet gave 1.91x, --speedup 4 gave 5.61x. A target either
    # lands within 1% (taking ranked channels out of order past a coarse one, and saying so) or is refused.
    net = _onet()
    blobs = synthetic_blobs(net, 5)
    before = conv_fc_macs(build_graph(net))
    passed_over = 0
    for speedup in (1.75, 2.0, 4.0, 6.0, 7.25):
        try:
            result = prune_net(net, blobs, PrunePolicy(speedup=speedup, criterion=criterion))
        except PruneError as e:
            assert "too coarse" in str(e) and "Aim at one of those two" in str(e)
            continue
        after = result.report.macs_after
        assert abs(after - before / speedup) <= 0.01 * before / speedup, (speedup, before / after)
        assert after == conv_fc_macs(build_graph(result.net))
        assert f"target {before / speedup:,.0f} MACs per image ({speedup:.2f}x); reached {after:,.0f}" \
            in str(result.report)
        skipped = result.report.cut["skipped"]
        assert (f"{skipped} ranked channel" in str(result.report)) == (skipped > 0)
        passed_over += skipped
    assert passed_over > 0     # the sweep went past a coarse channel at least once


def test_a_target_that_cannot_be_met_is_an_error():
    net = parse_net(CHAIN)
    with pytest.raises(PruneError, match="cannot be met"):
        prune_net(net, synthetic_blobs(net), PrunePolicy(target_macs=10))


def test_rewrite_keeps_everything_but_channel_counts():
    net = parse_net(CHAIN)
    analysis = analyze(build_graph(net))
    keep = np.ones(analysis.num_channels, bool)
    keep[analysis.blob_channels["c2"][:5]] = False
    out = rewrite_net(net, analysis, keep)
    assert [l.convolution_param.num_output for l in out.layer if l.type == "Convolution"] == [10, 15, 30]
    next(l for l in out.layer if l.name == "c2").convolution_param.num_output = 20
    assert out == net


@pytest.mark.parametrize("kwargs, message", [
    (dict(percent=1.0), r"--percent must be a fraction in \[0, 1\)"),
    (dict(percent=-0.1), r"--percent must be a fraction in \[0, 1\)"),
    (dict(percent=0.5, speedup=2), "Give one of --percent, --target-macs and --speedup"),
    (dict(), "Say how much to prune"),
    (dict(speedup=0.5), "--speedup must be at least 1"),
    (dict(percent=0.5, criterion="taylor"), "Unknown importance criterion 'taylor'; choose one of"),
    (dict(percent=0.5, protect=("nope",)), "--protect names layer 'nope'"),
    (dict(layer_percent={"nope": 0.5}), "--layer-percent names layer 'nope'"),
    (dict(percent=0.5, round_to=0), "--round-to must be a positive"),
])
def test_bad_policies_are_one_clear_error(kwargs, message):
    net = parse_net(CHAIN)
    with pytest.raises(PruneError, match=message):
        prune_net(net, synthetic_blobs(net), PrunePolicy(**kwargs))


def test_slimming_without_scale_layers_names_them_and_suggests_l1():
    text = inp() + ('layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { '
                    'num_output: 4 kernel_size: 3 } }\nlayer { name: "r" type: "ReLU" bottom: "c1" top: "c1" }\n'
                    + fc("fc", "c1", 2))
    net = parse_net(text)
    with pytest.raises(PruneError, match=r"no prunable channel has one \(layers producing channels without it: c1\)"
                                         r".*--criterion l1"):
        prune_net(net, synthetic_blobs(net), PrunePolicy(percent=0.5))
    assert prune_net(net, synthetic_blobs(net), PrunePolicy(percent=0.5, criterion="l1")).report.removed == 2


def test_weights_that_do_not_match_the_net_are_a_weights_error():
    net = parse_net(CHAIN)
    blobs = synthetic_blobs(net)
    blobs["c2"] = [np.zeros((16, 10, 3, 3), np.float32)]
    with pytest.raises(WeightsError, match=r"'c2' blob 0 has shape \(16, 10, 3, 3\), .* expects \(20, 10, 3, 3\)"):
        prune_net(net, blobs, PrunePolicy(percent=0.5))
    del blobs["c2"]
    with pytest.raises(WeightsError, match="no blobs for layer 'c2'"):
        prune_net(net, blobs, PrunePolicy(percent=0.5))
    blobs["c2"] = []
    blobs["c3/bn"] = blobs["c3/bn"][:2]
    with pytest.raises(WeightsError):
        prune_net(net, blobs, PrunePolicy(percent=0.5))


def test_a_slice_top_is_never_emptied():
    text = inp() + cbs("c", "data", 6) + (
        'layer { name: "sl" type: "Slice" bottom: "c" top: "s1" top: "s2" slice_param { slice_point: 2 } }\n') + \
        fc("f1", "s1", 2) + fc("f2", "s2", 2)
    net = parse_net(text)
    blobs = synthetic_blobs(net, gammas={"c/scale": [0.01, 0.02, 0.5, 0.6, 0.7, 0.8]})
    result = prune_net(net, blobs, PrunePolicy(percent=0.5))
    assert kept(result)["c"] == [1, 3, 4, 5]           # 0-2 asked for; s1 would be empty, so its best (1) returns
    sl = next(l for l in result.net.layer if l.name == "sl")
    assert list(sl.slice_param.slice_point) == [1]


def test_filter_norms_are_normalised_per_layer_before_a_global_ranking():
    # c1 and c2 have the same filter pattern, c2's 100 times larger (its fan-in, say): raw L1 norms would strip c1;
    # normalised by each layer's mean (l1's default), the global 50% takes the same share of both.
    net = parse_net(inp() + cbs("c1", "data", 8) + cbs("c2", "c1", 8) + fc("fc", "c2", 4))
    blobs = synthetic_blobs(net)
    scale = np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1, 1)
    blobs["c1"][0] = np.ones((8, 3, 3, 3), np.float32) * scale
    blobs["c2"][0] = np.ones((8, 8, 3, 3), np.float32) * scale * 100 * 3 / 8   # the same norms, times 100
    analysis = analyze(build_graph(net))
    raw = channel_scores(analysis, blobs, "l1").score
    normalised = channel_scores(analysis, blobs, "l1", normalize="mean").score
    c1, c2 = analysis.blob_channels["c1"], analysis.blob_channels["c2"]
    np.testing.assert_allclose(raw[c2], 100 * raw[c1], rtol=1e-6)
    np.testing.assert_allclose(normalised[c1], normalised[c2], rtol=1e-6)
    np.testing.assert_allclose(normalised[c1].mean(), 1.0, rtol=1e-6)
    maxed = channel_scores(analysis, blobs, "l1", normalize="max").score
    np.testing.assert_allclose(maxed[c1], np.arange(1, 9) / 8, rtol=1e-6)

    default = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="l1"))
    assert kept(default) == {"c1": [4, 5, 6, 7], "c2": [4, 5, 6, 7], "fc": [0, 1, 2, 3]}
    assert default.report.policy["normalize"] == "mean"
    with pytest.raises(PruneError, match=r"single channel \(c1 8 -> 1\)"):
        prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="l1", normalize="none"))
    unscaled = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="l1", normalize="none", min_channels=1))
    assert kept(unscaled) == {"c1": [7], "c2": [1, 2, 3, 4, 5, 6, 7], "fc": [0, 1, 2, 3]}  # c1: min_channels
    # slimming's gammas are comparable across layers after BatchNorm: not normalised unless asked.
    assert PrunePolicy(percent=0.5).normalizer == "none"
    assert prune_net(net, blobs, PrunePolicy(percent=0.5, min_channels=1)).report.policy["normalize"] == "none"
    with pytest.raises(PruneError, match="--normalize must be one of none, mean, max; got 'median'"):
        PrunePolicy(percent=0.5, normalize="median").check()
    with pytest.raises(PruneError, match="Unknown normaliser 'median'"):
        channel_scores(analysis, blobs, "l1", normalize="median")
