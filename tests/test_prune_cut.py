"""The global cut: its threshold and score distribution in the report, and the warning for a cut through dense
scores."""

import json

import numpy as np
import pytest

from slim.io import parse_net
from slim.prune import PrunePolicy, PruneReport, prune_net
from slim.prune.cut import cut_stats
from test_prune_plan import CHAIN, synthetic_blobs


def _gammas(values):
    return {"c1/scale": values[:10], "c2/scale": values[10:30], "c3/scale": values[30:]}


def test_cut_stats_by_hand():
    scores = np.r_[np.full(20, 1e-4), np.linspace(0.5, 1, 20)]
    at_gap = cut_stats(scores, 1e-4)
    assert (at_gap.ranked, at_gap.at_or_below, at_gap.threshold, at_gap.first_kept) == (40, 20, 1e-4, 0.5)
    assert at_gap.gap > 1 and not at_gap.dense
    assert at_gap.below == {"0.001": 0.5, "0.01": 0.5, "0.1": 0.5}
    assert at_gap.quantiles["0"] == 1e-4 and at_gap.quantiles["100"] == 1.0
    in_upper_mass = cut_stats(scores, float(scores[29]))
    assert in_upper_mass.gap < 1 and in_upper_mass.dense
    within_zeros = cut_stats(np.r_[np.linspace(1e-5, 2e-5, 20), np.linspace(0.5, 1, 20)], 1.5e-5)
    assert within_zeros.gap < 1 and not within_zeros.dense     # a cut inside the near-zero mass is safe
    alike = cut_stats(np.full(10, 0.5), 0.5)
    assert alike.at_or_below == 10 and alike.gap is None       # everything removed: no cut inside
    assert cut_stats(np.full(10, 0.5), None).threshold is None


def test_a_net_that_is_not_sparse_is_pruned_with_a_warning_and_the_report_keeps_the_threshold(tmp_path, caplog):
    # The first hour of a real user: a net with no gamma near zero was pruned without a word, and the report lacked
    # the threshold it used.
    net = parse_net(CHAIN)
    values = np.random.default_rng(0).normal(1, 0.05, 60)
    blobs = synthetic_blobs(net, gammas=_gammas(values))
    with caplog.at_level("WARNING", logger="slim.prune"):
        result = prune_net(net, blobs, PrunePolicy(percent=0.5, min_channels=1))
    report = result.report
    removed = ~result.plan.keep[np.concatenate([result.analysis.producers[n].outputs for n in ("c1", "c2", "c3")])]
    assert report.cut["threshold"] == pytest.approx(np.abs(values)[removed].max())
    assert report.cut["first_kept"] == pytest.approx(np.abs(values)[~removed].min())
    assert report.cut["dense"] and report.cut["below"]["0.01"] == 0.0
    assert len(report.warnings) == 1 and "does not look sparse" in report.warnings[0]
    assert "WARNING: the cut at score" in str(report) and "cut at score" in str(report)
    assert any("does not look sparse" in r.getMessage() for r in caplog.records)
    again = PruneReport.from_dict(json.loads(report.to_json()))
    assert again.cut == report.cut and again.warnings == report.warnings


def test_a_sparse_net_cut_in_its_gap_has_no_warning():
    net = parse_net(CHAIN)
    rng = np.random.default_rng(1)
    values = np.r_[rng.uniform(0, 1e-3, 30), rng.uniform(0.4, 1, 30)]
    rng.shuffle(values)
    result = prune_net(net, synthetic_blobs(net, gammas=_gammas(values)), PrunePolicy(percent=0.5, min_channels=1))
    assert result.report.warnings == [] and result.report.cut["gap"] > 1
    assert result.report.cut["below"]["0.01"] == 0.5


def test_reports_without_a_cut_still_read():
    net = parse_net(CHAIN)
    report = prune_net(net, synthetic_blobs(net), PrunePolicy(layer_percent={"c2": 0.5})).report
    assert report.cut == {}                                   # no global ranking, no cut
    data = report.to_dict()
    del data["cut"], data["warnings"]                         # a report written before they were recorded
    assert PruneReport.from_dict(data).warnings == []
