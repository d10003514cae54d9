"""What to decompose: the policy (method, ranks, a MAC target, 3C's channel pruning) and the per-layer plans.

    policy = DecomposePolicy(method="3c", ranks={"conv2_1": 49})          # one layer, d = d' = 49
    policy = DecomposePolicy(method="spatial", speedup=2.0)               # ranks for every 3x3 conv from a budget
    plans, macs = make_plans(net, graph, blobs, policy)

Ranks are explicit (``ranks``; in 3C ``channel_ranks`` overrides d' = d, the paper's choice) or chosen for the
layers without one from ``speedup`` by slim.decompose.ranks. 3C then prunes the outputs of every decomposed layer
whose channels only decomposed layers read (the paper's ``alldic`` and ``pooldic``: convolutions followed by a
convolution, directly or through pooling) to ``max(floor(n / ratio), d')`` with slim's LASSO pruning (ratio 1.15 as
the paper), and folds each 1 x 1 layer back where that is cheaper (slim.decompose.rewrite.foldable). The MACs a
plan gives are computed exactly from the planned prototxt (what is written), so a ``speedup`` target is met by
correcting the greedy budget until the planned net lands within 1% of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from slim import proto as pb
from slim.decompose.ranks import RankCandidate, energy, greedy_ranks
from slim.decompose.rewrite import (METHODS, LayerPlan, check_layer, decomposed_net, foldable, max_rank,
                                    with_widths)
from slim.errors import DecomposeError
from slim.graph import LayerNode, NetGraph, build_graph

__all__ = ["DecomposePolicy", "make_plans", "planned_macs", "prune_widths", "PAPER_RATIO", "TOLERANCE"]

#: 3C's channel pruning keeps floor(n / 1.15) outputs of a decomposed layer (the released code).
PAPER_RATIO = 1.15
#: A --speedup target is met within this fraction of the target MACs.
TOLERANCE = 0.01


@dataclasses.dataclass
class DecomposePolicy:
    """What to decompose and how.

    Attributes:
        method: "spatial" (k_h x 1 then 1 x k_w), "channel" (d' filters then 1 x 1) or "3c" (spatial, then channel
            on the horizontal layer, then channel pruning, then folding).
        ranks: layer -> d (spatial, 3c) or d' (channel).
        channel_ranks: layer -> d' for 3c (default: d' = min(d, n), the paper's d' = d).
        speedup: original / decomposed conv+FC MACs of the whole net to reach within 1%, by choosing ranks for the
            layers without one.
        layers: the layers ``speedup`` may split (default: every convolution the method can split).
        prune_ratio: 3C's pruning: decomposed layers read only by decomposed layers keep max(floor(n / ratio), d')
            outputs; None: 1.15 for 3c, no pruning otherwise; 1: no pruning.
        refit: fit the decomposition on calibration data (else the data-free SVDs only, no data needed).
        relu_aware: fit through a following ReLU (Zhang et al.'s nonlinear least squares and GSVD).
    """

    method: str = "3c"
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    channel_ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    speedup: Optional[float] = None
    layers: Sequence[str] = ()
    prune_ratio: Optional[float] = None
    refit: bool = True
    relu_aware: bool = True

    @property
    def ratio(self) -> float:
        """The pruning ratio in force (1: none)."""
        if self.prune_ratio is not None:
            return float(self.prune_ratio)
        return PAPER_RATIO if self.method == "3c" else 1.0

    def check(self) -> None:
        """Raise DecomposeError for a value out of range or a contradictory combination (flag names in messages)."""
        if self.method not in METHODS:
            raise DecomposeError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if not self.ranks and self.speedup is None:
            raise DecomposeError("Say what to decompose: --rank LAYER=D (repeatable) or --speedup S (ranks for every "
                                 "convolution from a MAC budget).")
        if self.channel_ranks and self.method != "3c":
            raise DecomposeError(f"--channel-rank applies to --method 3c (the horizontal layer's channel "
                                 f"decomposition); with --method {self.method} give the rank with --rank.")
        for flag, table in (("--rank", self.ranks), ("--channel-rank", self.channel_ranks)):
            for name, d in table.items():
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
                    raise DecomposeError(f"{flag} {name}={d}: a rank is a positive whole number of filters.")
        missing = [n for n in self.channel_ranks if n not in self.ranks and self.speedup is None]
        if missing:
            raise DecomposeError(f"--channel-rank {missing[0]} needs --rank {missing[0]}=D too (or --speedup): it "
                                 f"sets d' of a layer that is decomposed.")
        if self.speedup is not None and not (self.speedup > 1 and math.isfinite(self.speedup)):
            raise DecomposeError(f"--speedup must be a number above 1 (original / decomposed MACs); got "
                                 f"{self.speedup}.")
        if self.layers and self.speedup is None:
            raise DecomposeError("--layers limits which layers --speedup may split; give --speedup, or name each "
                                 "layer with --rank.")
        if self.prune_ratio is not None and not (self.prune_ratio >= 1 and math.isfinite(self.prune_ratio)):
            raise DecomposeError(f"--prune-ratio must be at least 1 (outputs kept = n / ratio; 1 prunes nothing); "
                                 f"got {self.prune_ratio}.")

    def describe(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["ranks"], out["channel_ranks"] = dict(self.ranks), dict(self.channel_ranks)
        out["layers"] = list(self.layers)
        out["prune_ratio"] = self.ratio
        return out


def _macs_per_image(graph: NetGraph) -> float:
    from slim.prune.core import conv_fc_macs
    return conv_fc_macs(graph)


def _batch(graph: NetGraph) -> int:
    return next((max(1, int(n.top_shapes[0][0])) for n in graph.layers if not n.bottoms and n.top_shapes
                 and n.top_shapes[0]), 1)


def prune_widths(dgraph: NetGraph, plans: Sequence[LayerPlan], ratio: float) -> Dict[str, int]:
    """plan name -> outputs kept, for the decomposed layers 3C prunes: those whose output channels form a group of
    their own (no residual tie, nothing pinned) read only by the first layers of decomposed convolutions."""
    if ratio <= 1:
        return {}
    from slim.prune.groups import analyze

    analysis = analyze(dgraph)
    firsts = {p.first for p in plans}
    readers: Dict[int, set] = {}
    for name, info in analysis.producers.items():
        for g in np.unique(analysis.group_of[info.inputs]):
            readers.setdefault(int(g), set()).add(name)
    out = {}
    for p in plans:
        groups = analysis.group_of_layer(p.last)
        if len(groups) != 1:
            continue
        g = groups[0]
        producers = [n for n, info in analysis.producers.items()
                     if np.isin(info.outputs, g.channels).any()]
        if producers != [p.last] or g.pinned or not readers.get(g.index) or not readers[g.index] <= firsts:
            continue
        n = len(g.channels)
        keep = min(n, max(int(math.floor(n / ratio + 1e-9)), p.body_filters if p.method != "spatial" else p.rank))
        if keep < n:
            out[p.name] = keep
    return out


def planned_macs(net: "pb.NetParameter", graph: NetGraph, plans: Sequence[LayerPlan], ratio: float) \
        -> Tuple[float, "pb.NetParameter", Dict[str, int], List[str]]:
    """The conv+FC MACs per image of the net the plans give, exactly: (MACs, the decomposed net before pruning and
    folding, plan name -> pruned width, names of the plans whose 1 x 1 layer folds)."""
    dnet = decomposed_net(net, graph, plans)
    dgraph = build_graph(dnet, graph.phase, source=f"{graph.source} (decomposed)")
    widths = prune_widths(dgraph, plans, ratio)
    for p in plans:
        p.keep = widths.get(p.name)
    if widths:
        pruned = with_widths(dnet, {p.last: p.keep for p in plans if p.keep is not None})
        fgraph = build_graph(pruned, graph.phase, source=f"{graph.source} (decomposed)")
    else:
        fgraph = dgraph
    total = _macs_per_image(fgraph)
    folds = []
    batch = _batch(fgraph)
    for p in plans:
        if foldable(fgraph, p):
            body, mix = fgraph.layer(p.body).layer, fgraph.layer(p.mix).layer
            total -= (body.macs() + mix.macs() - body.macs() * mix.channels_out / body.channels_out) / batch
            folds.append(p.name)
    return total, dnet, widths, folds


def _candidate(node: LayerNode, weight: np.ndarray, method: str) -> RankCandidate:
    """The greedy's view of one layer: spectrum and cost by rank (widths as they are: pruning is corrected for by
    the exact planned MACs)."""
    from slim.decompose.factor import spatial_spectrum

    layer = node.layer
    n, c = layer.channels_out, layer.channels_in
    kh, kw = layer.kernel
    _, _, ho, wo = node.top_shapes[0]
    win = node.bottom_shapes[0][3]
    batch = node.top_shapes[0][0]
    original = layer.macs() / batch
    if method == "channel":
        s = np.linalg.svd(np.asarray(weight, np.float64).reshape(n, -1), compute_uv=False)
        cost = lambda d: min(d * c * kh * kw + n * d, n * c * kh * kw) * ho * wo
    else:
        s = spatial_spectrum(weight)
        if method == "spatial":
            cost = lambda d: d * c * kh * ho * win + n * d * kw * ho * wo
        else:
            cost = lambda d: d * c * kh * ho * win + min(d * min(d, n) * kw + n * min(d, n), n * d * kw) * ho * wo
    e = energy(s)[:max_rank(node, method)]
    return RankCandidate(node.name, e, cost, original)


def make_plans(net: "pb.NetParameter", graph: NetGraph, blobs: Mapping[str, Sequence[np.ndarray]],
               policy: DecomposePolicy) -> Tuple[List[LayerPlan], Dict[str, object]]:
    """The per-layer plans in net order, and a summary of the MAC budget (target, planned, per-layer choice).

    Raises:
        DecomposeError: a named layer that cannot be split, a rank out of range, an unreachable --speedup.
    """
    policy.check()
    method = policy.method
    fixed: Dict[str, Tuple[int, Optional[int]]] = {}
    for name, d in policy.ranks.items():
        node = check_layer(graph, name, method, "--rank")
        top = max_rank(node, method)
        if d > top:
            kind = "min(c k_h, n k_w)" if method != "channel" else "its output count n"
            raise DecomposeError(f"--rank {name}={d} is out of range: layer {name!r} ({_shape(node)}) has ranks 1 to "
                                 f"{top} ({kind}).")
        dc = policy.channel_ranks.get(name)
        if method == "3c":
            n = node.layer.channels_out
            dc = min(d, n) if dc is None else dc
            if dc > n:
                raise DecomposeError(f"--channel-rank {name}={dc} is out of range: layer {name!r} has {n} outputs, "
                                     f"so d' lies in 1..{n}.")
        fixed[name] = (d, dc)
    for name, dc in policy.channel_ranks.items():
        if name not in fixed:
            check_layer(graph, name, method, "--channel-rank")
    budget_info: Dict[str, object] = {}
    chosen: Dict[str, Tuple[int, Optional[int]]] = dict(fixed)
    if policy.speedup is not None:
        chosen = _from_budget(net, graph, blobs, policy, fixed, budget_info)
    order = {n.name: n.index for n in graph.layers}
    plans = [LayerPlan(name, method, d, dc if method == "3c" else None)
             for name, (d, dc) in sorted(chosen.items(), key=lambda kv: order[kv[0]])]
    if not plans:
        raise DecomposeError(f"--speedup {policy.speedup:g}: no layer of {graph.source} gains from a split at any "
                             f"rank; nothing to decompose.")
    macs, _, _, folds = planned_macs(net, graph, plans, policy.ratio)
    before = _macs_per_image(graph)
    budget_info.update({"macs_before": before, "macs_planned": macs, "folded": folds})
    return plans, budget_info


def _shape(node: LayerNode) -> str:
    layer = node.layer
    return f"{layer.channels_out} x {layer.channels_in} x {layer.kernel[0]} x {layer.kernel[1]}"


def _from_budget(net, graph: NetGraph, blobs, policy: DecomposePolicy, fixed, info) \
        -> Dict[str, Tuple[int, Optional[int]]]:
    """Ranks for the layers without one, so that the planned net's MACs come within TOLERANCE of the target."""
    method = policy.method
    if policy.layers:
        names = [n for n in policy.layers if n not in fixed]
        for n in names:
            check_layer(graph, n, method, "--layers")
    else:
        names = []
        for node in graph.layers:
            if node.type != "Convolution" or node.name in fixed:
                continue
            try:
                check_layer(graph, node.name, method, "--speedup")
            except DecomposeError:
                continue
            names.append(node.name)
    candidates = [_candidate(graph.layer(n), blobs[n][0], method) for n in names]
    before = _macs_per_image(graph)
    target = before / policy.speedup
    info["macs_target"] = target
    others = before - sum(c.original for c in candidates)
    budget = target - others
    best = None
    ranks: Dict[str, Optional[int]] = {}

    def evaluate(ranks):
        chosen = dict(fixed)
        chosen.update({n: (d, min(d, graph.layer(n).layer.channels_out) if method == "3c" else None)
                       for n, d in ranks.items() if d is not None})
        if not chosen:
            return chosen, before
        plans = [LayerPlan(n, method, d, dc) for n, (d, dc) in chosen.items()]
        return chosen, planned_macs(net, graph, plans, policy.ratio)[0]

    for _ in range(25):
        ranks = greedy_ranks(candidates, budget)
        chosen, macs = evaluate(ranks)
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (chosen, macs, ranks)
        if abs(macs - target) <= TOLERANCE * target or not chosen:
            break
        budget *= target / macs
    # One rank step of a large layer can jump over the tolerance (small nets): move single ranks by one, the move
    # that lands closest to the target first, while that improves.
    tops = {c.name: len(c.energy) for c in candidates}
    while best is not None and abs(best[1] - target) > TOLERANCE * target:
        ranks = best[2]
        moves = []
        for name, d in ranks.items():
            if d is None:
                continue
            for step in (-1, 1):
                if 1 <= d + step <= tops[name]:
                    moves.append({**ranks, name: d + step})
        scored = [(abs(m - target), chosen, m, r) for r in moves for chosen, m in [evaluate(r)]]
        if not scored:
            break
        gap, chosen, macs, r = min(scored, key=lambda s: s[0])
        if gap >= abs(best[1] - target):
            break
        best = (chosen, macs, r)
    if best is None or abs(best[1] - target) > TOLERANCE * target:
        reached = best[1] if best is not None else before
        floor = [c.cost(1) for c in candidates]
        raise DecomposeError(f"--speedup {policy.speedup:g} cannot be reached by splitting "
                             f"{len(candidates)} layer(s) of {graph.source} with --method {method}: the nearest plan "
                             f"has {reached:,.0f} conv+FC MACs per image against the target {target:,.0f} "
                             f"(original {before:,.0f}; rank 1 everywhere would leave the split layers "
                             f"{sum(floor):,.0f}). Ask for less, or add layers.")
    return best[0]
