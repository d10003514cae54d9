"""Policies -> a PrunePlan: which channels of every group are kept.

Policies (one of them per pruning):

* **global percent** (``--percent p``, the paper's): rank every prunable channel of the net by its score and remove
  the lowest ``floor(N * p)`` of the N prunable channels, whatever the tie rule. A *channel* is one keep-or-remove
  decision: the channels that a residual sum (Eltwise) ties across layers count once, as does a channel repeated by
  a Concat, so ``p`` is the fraction of these decisions that go. Ties in score are broken by group, then channel
  index, so a plan is reproducible;
* **per layer** (``--policy layer``, ``--layer-percent NAME=P``): each group removes ``floor(n * p)`` of its own n
  prunable channels; ``--layer-width NAME=N`` keeps exactly N (a published per-layer plan, replayed);
* **target** (``--target-macs M`` or ``--speedup S``): the global ranking, cut where the pruned net's conv+FC
  multiply-accumulates per image come within 1% of the target (found by bisection; the net is rewritten and its
  shapes inferred at each step). Where one more channel would jump past the target (a coarse channel), the next
  ranked channels are taken only if they land inside it (the report counts those passed over); a target that
  still cannot be met is refused, naming the nearest MACs reachable on each side.

Constraints, applied to every group: ``min_channels`` (an absolute count, default 1, so no layer is ever emptied) and
``min_fraction`` keep at least that many. A layer left with one channel by a global ranking has all but lost its layer,
which is rarely what was meant: unless a limit was given (``min_channels``, ``min_fraction`` or ``max_prune``;
``--min-channels 1`` accepts it), such a plan is refused with the layers it would reduce to one; ``max_prune`` removes
at most that fraction in one pass (the paper's multi-pass schedule used 0.5); ``round_to`` rounds each group's kept
count up to a multiple (8 for tensor cores; it adds back the best removed channels, so the removed count may end below
the request); ``protect`` pins layers. A blob never loses all its channels (a Slice top covering only removed channels
gets its best channel back). The limits win over the request: the report gives both the requested and the removed count
(the real fraction).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from slim.errors import PruneError
from slim.prune.cut import CutStats, cut_stats
from slim.prune.groups import ChannelAnalysis
from slim.prune.importance import NORMALIZERS, TIE_RULES, ChannelScores, default_normalizer

__all__ = ["PrunePolicy", "PrunePlan", "make_plan", "plan_from_kept"]


@dataclasses.dataclass
class PrunePolicy:
    """What to remove, and the limits every group respects.

    Attributes:
        percent: fraction of the prunable channels to remove, in [0, 1) (global or per layer).
        scope: "global" (one ranking over the net) or "layer" (each group removes its own fraction).
        layer_percent: layer name -> fraction for the group(s) holding that layer's output channels (overrides
            ``percent`` there; those groups are pruned on their own).
        layer_widths: layer name -> the output channels its group keeps (``--layer-width conv1_1=24``: a published
            per-layer plan, such as He et al.'s VGG-16 5x widths, replayed exactly); like ``layer_percent``, those
            groups are pruned on their own.
        target_macs: conv+FC multiply-accumulates per image the pruned net should have (within 1%).
        speedup: original MACs / pruned MACs to reach (within 1%); an alternative to ``target_macs``.
        criterion: the importance criterion (slim.prune.importance: slimming, l1, l2, ...).
        tie_rule: how a tied channel's members combine: union (default), max, mean, sum.
        normalize: how each layer's scores are scaled before one global ranking: none, mean or max; None picks the
            criterion's default (none for slimming, mean for filter norms: slim.prune.importance).
        min_channels: channels every group keeps at least; None: 1, and a global ranking may not leave a group with
            one channel unless another limit was given (the guard, see the module docstring).
        min_fraction: fraction of its channels every group keeps at least.
        max_prune: fraction of its channels a group may lose at most.
        round_to: round each group's kept count up to a multiple of this.
        protect: layer names whose output channels are never removed.
    """

    percent: Optional[float] = None
    scope: str = "global"
    layer_percent: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layer_widths: Mapping[str, int] = dataclasses.field(default_factory=dict)
    target_macs: Optional[float] = None
    speedup: Optional[float] = None
    criterion: str = "slimming"
    tie_rule: str = "union"
    normalize: Optional[str] = None
    min_channels: Optional[int] = None
    min_fraction: float = 0.0
    max_prune: float = 1.0
    round_to: int = 1
    protect: Sequence[str] = ()

    def check(self) -> None:
        """Raise PruneError for a value out of range or a contradictory combination (flag names in messages)."""
        goals = [name for name, v in (("--percent", self.percent), ("--target-macs", self.target_macs),
                                      ("--speedup", self.speedup)) if v is not None]
        if len(goals) > 1:
            raise PruneError(f"Give one of --percent, --target-macs and --speedup, not {' and '.join(goals)}.")
        if not goals and not self.layer_percent and not self.layer_widths:
            raise PruneError("Say how much to prune: --percent P (a fraction in [0, 1)), --target-macs M, --speedup S, "
                             "--layer-percent LAYER=P or --layer-width LAYER=N.")
        for name, w in self.layer_widths.items():
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
                raise PruneError(f"--layer-width {name}={w}: the width is the number of output channels to keep, a "
                                 f"whole number of at least 1.")
            if name in self.layer_percent:
                raise PruneError(f"Layer {name!r} is given both --layer-percent and --layer-width; give one.")
        for name, p in [("--percent", self.percent)] + [(f"--layer-percent {k}", v)
                                                        for k, v in self.layer_percent.items()]:
            if p is not None and not (0 <= p < 1) or (p is not None and math.isnan(p)):
                raise PruneError(f"{name} must be a fraction in [0, 1) (0.7 removes 70% of the prunable channels); "
                                 f"got {p}.")
        if self.scope not in ("global", "layer"):
            raise PruneError(f"--policy must be 'global' or 'layer', got {self.scope!r}.")
        if self.scope == "layer" and self.percent is None and not self.layer_percent:
            raise PruneError("--policy layer needs --percent or --layer-percent.")
        if self.target_macs is not None and not self.target_macs > 0:
            raise PruneError(f"--target-macs must be a positive number of multiply-accumulates; got "
                             f"{self.target_macs}.")
        if self.speedup is not None and not self.speedup >= 1:
            raise PruneError(f"--speedup must be at least 1 (original MACs / pruned MACs); got {self.speedup}.")
        if self.tie_rule not in TIE_RULES:
            raise PruneError(f"--tie-rule must be one of {', '.join(TIE_RULES)}; got {self.tie_rule!r}.")
        if self.normalize is not None and self.normalize not in NORMALIZERS:
            raise PruneError(f"--normalize must be one of {', '.join(NORMALIZERS)}; got {self.normalize!r}.")
        if self.min_channels is not None and self.min_channels < 1:
            raise PruneError(f"--min-channels must keep at least 1 channel per layer; got {self.min_channels}.")
        if not 0 <= self.min_fraction <= 1:
            raise PruneError(f"--min-channels as a percentage must lie in [0%, 100%]; got {self.min_fraction:.0%}.")
        if not 0 < self.max_prune <= 1:
            raise PruneError(f"--max-prune-per-layer must be a fraction in (0, 1]; got {self.max_prune}.")
        if self.round_to < 1:
            raise PruneError(f"--round-to must be a positive channel multiple; got {self.round_to}.")

    @property
    def floor(self) -> int:
        """The channels every group keeps at least (``min_channels``, 1 when not given)."""
        return 1 if self.min_channels is None else self.min_channels

    @property
    def guarded(self) -> bool:
        """Whether a global ranking must not leave a group with one channel (no limit was given)."""
        return self.min_channels is None and self.min_fraction == 0 and self.max_prune == 1

    @property
    def goal(self) -> str:
        """The request as its flags (for messages)."""
        if self.target_macs is not None:
            return f"--target-macs {self.target_macs:,.0f}"
        if self.speedup is not None:
            return f"--speedup {self.speedup:g}"
        return f"--percent {self.percent:g}" if self.percent is not None else "--layer-percent"

    @property
    def normalizer(self) -> str:
        """``normalize``, or the criterion's default when it is None."""
        return self.normalize if self.normalize is not None else default_normalizer(self.criterion)

    def describe(self) -> Dict[str, object]:
        """The policy as plain values (for the JSON report), with the normaliser resolved."""
        out = dataclasses.asdict(self)
        out["normalize"] = self.normalizer
        out["layer_percent"] = dict(self.layer_percent)
        out["layer_widths"] = {k: int(v) for k, v in self.layer_widths.items()}
        out["protect"] = list(self.protect)
        return out


@dataclasses.dataclass
class PrunePlan:
    """Which channels stay.

    Attributes:
        keep: channel id -> kept (bool), over every channel of the analysis.
        prunable: N, the channels that could be ranked and removed (not pinned, scored).
        requested: channels the policy asked to remove before rounding and blob guards (None for a replay).
        macs: conv+FC MACs per image before and after, when a target policy computed them.
        cut: where the global ranking was cut and the distribution of its scores (slim.prune.cut), for global
            percent and target policies.
    """

    keep: np.ndarray
    prunable: int
    requested: Optional[int] = None
    macs: Optional[Tuple[float, float]] = None
    cut: Optional[CutStats] = None

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())

    @property
    def fraction(self) -> float:
        """The fraction of the prunable channels actually removed."""
        return self.removed / self.prunable if self.prunable else 0.0


def _group_limits(analysis: ChannelAnalysis, policy: PrunePolicy) -> np.ndarray:
    """How many channels each group may lose at most."""
    out = np.zeros(len(analysis.groups), np.int64)
    for g in analysis.groups:
        n = g.size
        floor_keep = min(n, max(policy.floor, math.ceil(policy.min_fraction * n - 1e-9)))
        out[g.index] = min(n - floor_keep, math.floor(policy.max_prune * n + 1e-9))
    return out


def _order(analysis: ChannelAnalysis, candidates: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Candidates sorted by key, then group, then channel index within the group (deterministic)."""
    g = analysis.group_of[candidates]
    local = analysis.local_of[candidates]
    return candidates[np.lexsort((local, g, key[candidates]))]


def _eligible(analysis: ChannelAnalysis, ordered: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """The ordered candidates a walk in that order may remove: the first ``limits[g]`` of each group."""
    groups = analysis.group_of[ordered]
    by_group = np.argsort(groups, kind="stable")           # each group's candidates, still in walk order
    sorted_groups = groups[by_group]
    first = np.searchsorted(sorted_groups, sorted_groups)  # where each group's run starts
    rank_in_group = np.empty(len(ordered), np.int64)
    rank_in_group[by_group] = np.arange(len(ordered)) - first
    return ordered[rank_in_group < limits[groups]]


def _finish(analysis: ChannelAnalysis, keep: np.ndarray, score: np.ndarray, round_to: int) -> np.ndarray:
    """Round kept counts up to ``round_to``, keep every blob non-empty and every group of a grouped convolution as
    wide as the others, restoring the best removed channels (each step only restores, so the loop ends)."""
    keep = keep.copy()
    best_first = lambda ids: ids[np.lexsort((-analysis.local_of[ids], -np.nan_to_num(score[ids], nan=np.inf)))]
    while True:
        before = int(keep.sum())
        if round_to > 1:
            for g in analysis.groups:
                kept = int(keep[g.channels].sum())
                want = min(g.size, -(-kept // round_to) * round_to)
                if want > kept:
                    removed = g.channels[~keep[g.channels]]
                    keep[best_first(removed)[:want - kept]] = True
        for channels in analysis.blob_channels.values():
            if len(channels) and not keep[channels].any():
                keep[best_first(np.unique(channels))[0]] = True
        for constraint in analysis.equal_counts:
            parts = constraint.channels.reshape(constraint.parts, -1)
            want = int(keep[parts].sum(1).max())
            for part in parts:
                missing = want - int(keep[part].sum())
                if missing > 0:
                    keep[best_first(np.unique(part[~keep[part]]))[:missing]] = True
        if int(keep.sum()) == before:
            return keep


def make_plan(analysis: ChannelAnalysis, scores: ChannelScores, policy: PrunePolicy,
              macs_of: Optional[Callable[[np.ndarray], float]] = None) -> PrunePlan:
    """Apply a policy to the scored channels.

    Args:
        analysis: the net's channel analysis.
        scores: one score per channel (slim.prune.importance.channel_scores).
        policy: the PrunePolicy (checked here).
        macs_of: keep mask -> conv+FC MACs per image of the pruned net; required by target policies.

    Raises:
        PruneError: a bad policy value, an unknown --layer-percent layer, a request the constraints forbid, or a
            target that cannot be met.
    """
    policy.check()
    n = analysis.num_channels
    score = scores.score
    candidates = np.nonzero(~analysis.pinned & ~np.isnan(score))[0]
    prunable = len(candidates)
    limits = _group_limits(analysis, policy)
    remove = np.zeros(n, bool)
    requested = 0

    own: Dict[int, float] = {}
    for name, p in policy.layer_percent.items():
        try:
            groups = analysis.group_of_layer(name)
        except Exception:
            raise PruneError(f"--layer-percent names layer {name!r}, which is not in the net "
                             f"{analysis.graph.source}.") from None
        if not groups:
            raise PruneError(f"--layer-percent {name}: layer {name!r} has no output channels to prune.")
        for g in groups:
            own[g.index] = p
    counts = _width_counts(analysis, policy.layer_widths, candidates)
    for gi in counts:
        own[gi] = 0.0
    if policy.scope == "layer" and policy.percent is not None:
        for g in analysis.groups:
            own.setdefault(g.index, policy.percent)

    # Groups with their own fraction: each removes floor(n * p) of its prunable channels (or what its width says).
    in_own = np.isin(analysis.group_of[candidates], list(own)) if own else np.zeros(len(candidates), bool)
    for gi, p in own.items():
        mine = candidates[analysis.group_of[candidates] == gi]
        ordered = _order(analysis, mine, score)
        k = counts[gi] if gi in counts else math.floor(len(mine) * p + 1e-9)
        allowed = ordered[:min(k, int(limits[gi]))]
        remove[allowed] = True
        requested += k
    rest = candidates[~in_own]
    ordered = _order(analysis, rest, score)
    eligible = _eligible(analysis, ordered, limits)
    macs = cut = None

    if policy.percent is not None and policy.scope == "global" and len(rest):
        k = math.floor(len(rest) * policy.percent + 1e-9)
        # The limits win over the request: what they forbid stays, and the report shows requested and removed.
        remove[eligible[:k]] = True
        requested += k
        cut = _cut(score, rest, eligible[:k])
    elif policy.target_macs is not None or policy.speedup is not None:
        if macs_of is None:
            raise AssertionError("a target policy needs macs_of")
        keep0 = ~remove
        before = macs_of(np.ones(n, bool))
        target = policy.target_macs if policy.target_macs is not None else before / policy.speedup
        chosen, after, skipped = _search(analysis, keep0, eligible, score, policy.round_to, macs_of, target, before)
        remove[chosen] = True
        requested += len(chosen)
        macs = (before, after)
        cut = _cut(score, rest, chosen)
        cut.skipped = skipped

    keep = _finish(analysis, ~remove, score, policy.round_to)
    if policy.guarded:
        _guard(analysis, keep, set(own), policy)
    return PrunePlan(keep, prunable, requested, macs, cut)


def _width_counts(analysis: ChannelAnalysis, widths: Mapping[str, int], candidates: np.ndarray) -> Dict[int, int]:
    """Group index -> channels to remove for ``--layer-width`` (its channels minus the width), checked."""
    out: Dict[int, int] = {}
    for name, width in widths.items():
        try:
            groups = analysis.group_of_layer(name)
        except Exception:
            raise PruneError(f"--layer-width names layer {name!r}, which is not in the net "
                             f"{analysis.graph.source}.") from None
        if len(groups) != 1:
            raise PruneError(f"--layer-width {name}={width}: layer {name!r} "
                             f"{'has no output channels to prune' if not groups else 'concatenates several groups'}; "
                             f"give the width of the layers that produce its channels.")
        g = groups[0]
        free = int(np.isin(candidates, g.channels).sum())
        fixed = g.size - free
        if not fixed <= width <= g.size:
            raise PruneError(f"--layer-width {name}={width}: its group has {g.size} channels, {fixed} of which may not "
                             f"be removed ({next(iter(g.pinned.values()), 'pinned')}); give a width from "
                             f"{max(fixed, 1)} to {g.size}.")
        if out.get(g.index, g.size - width) != g.size - width:
            raise PruneError(f"--layer-width gives {name!r} a width that another layer of its group (tied by a "
                             f"residual sum or a Concat: {', '.join(g.producers[:4])}) contradicts.")
        out[g.index] = g.size - width
    return out


def _guard(analysis: ChannelAnalysis, keep: np.ndarray, own: set, policy: PrunePolicy) -> None:
    """Refuse a global plan that leaves a group of several channels with one (see the module docstring)."""
    cut = [g for g in analysis.groups if g.index not in own and g.prunable and g.size > 1
           and int(keep[g.channels].sum()) == 1]
    if not cut:
        return
    names = [f"{' + '.join(g.producers[:2]) or f'group {g.index}'}{' + ...' if len(g.producers) > 2 else ''} "
             f"{g.size} -> 1" for g in cut]
    shown = ", ".join(names[:6]) + (f", ... {len(names) - 6} more" if len(names) > 6 else "")
    raise PruneError(f"{policy.goal} would leave {len(cut)} layer{'s' if len(cut) != 1 else ''} of "
                     f"{analysis.graph.source} with a single channel ({shown}), which all but removes "
                     f"{'them' if len(cut) != 1 else 'it'}. Prune less, keep more per layer with --min-channels N "
                     f"(or P%) or --max-prune-per-layer F, or give --min-channels 1 to accept it.")


def _cut(score: np.ndarray, ranked: np.ndarray, removed: np.ndarray) -> CutStats:
    """The global ranking's cut: the highest score it removed, among the scores of every channel it ranked."""
    return cut_stats(score[ranked], float(score[removed].max()) if len(removed) else None)


#: A target policy lands within this fraction of the target MACs.
TOLERANCE = 0.01
#: Channels past a granularity jump tried, one at a time, to land within the tolerance.
_FILL = 64


def _search(analysis, keep0, eligible, score, round_to, macs_of, target, before) -> Tuple[np.ndarray, float, int]:
    """The channels to remove for the pruned MACs to land within TOLERANCE of the target.

    By bisection, the smallest k whose first k ranked channels bring the MACs within the tolerance above the target
    (MACs fall as k grows). When that k overshoots below it (one channel can cost many MACs: a first layer's
    channel is read by every pixel of the next), the cut stops at k - 1 and the following ranked channels are
    tried one at a time, each removed only when it does not overshoot, until the MACs land inside. What cannot
    land is refused with the nearest reachable MACs on each side.

    Returns:
        (removed channel ids, MACs after, how many ranked channels were passed over to land).
    """
    high, low = target * (1 + TOLERANCE), target * (1 - TOLERANCE)

    def macs_with(removed: np.ndarray) -> float:
        keep = keep0.copy()
        keep[removed] = False
        return macs_of(_finish(analysis, keep, score, round_to))

    if target >= before * (1 - TOLERANCE):
        return eligible[:0], before, 0
    hi = len(eligible)
    lowest = macs_with(eligible)
    if lowest > high:
        raise PruneError(f"The target of {target:,.0f} MACs per image (conv+FC) cannot be met: removing every channel "
                         f"the limits allow leaves {lowest:,.0f} (the original has {before:,.0f}). Relax "
                         f"--min-channels/--max-prune-per-layer/--protect or aim higher.")
    lo = 0  # macs_with(eligible[:lo]) > high holds for lo = 0 here
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs_with(eligible[:mid]) <= high:
            hi = mid
        else:
            lo = mid
    found = macs_with(eligible[:hi])
    if found >= low:
        return eligible[:hi], found, 0
    above = macs_with(eligible[:lo])
    removed, skipped = list(eligible[:lo]), 0
    for c in eligible[lo:lo + _FILL]:
        trial = macs_with(np.asarray(removed + [c], np.int64))
        if trial < low:
            skipped += 1
            continue
        removed.append(c)
        above = trial
        if trial <= high:
            return np.asarray(removed, np.int64), trial, skipped
    raise PruneError(f"The target of {target:,.0f} MACs per image ({before / target:.3g}x) cannot be met within "
                     f"{TOLERANCE:.0%}: the channels are too coarse here. The ranking's cut goes from {above:,.0f} "
                     f"MACs ({before / above:.3g}x) to {found:,.0f} ({before / found:.3g}x) in one channel, and none of "
                     f"the next {_FILL} ranked channels is small enough to land between. Aim at one of those two, or "
                     f"try without --round-to.")


def plan_from_kept(analysis: ChannelAnalysis, kept: Mapping[str, Sequence[int]],
                   channels_before: Mapping[str, int], source: str = "the report") -> PrunePlan:
    """Rebuild a plan from the kept output channels of producer layers (``--apply-report``).

    Args:
        analysis: the analysis of the (fresh, unpruned) net.
        kept: producer layer name -> indices of its output channels to keep.
        channels_before: producer layer name -> its output channel count when the report was made.
        source: names the report in error messages.

    Raises:
        PruneError: a layer of the report is missing or has another width, the indices are out of range, or they
            contradict each other (tied layers keeping different channels) or a pinned channel.
    """
    keep = np.ones(analysis.num_channels, bool)
    decided = np.zeros(analysis.num_channels, np.int8)   # 0 unseen, 1 kept, 2 removed
    for name, indices in kept.items():
        info = analysis.producers.get(name)
        if info is None:
            raise PruneError(f"{source} prunes layer {name!r}, which is not a Convolution, Deconvolution or "
                             f"InnerProduct of {analysis.graph.source}; apply the report to the net it was made for.")
        width = len(info.outputs)
        if channels_before.get(name, width) != width:
            raise PruneError(f"{source} was made for a net whose layer {name!r} has {channels_before[name]} output "
                             f"channels; {analysis.graph.source} gives it {width}. Apply it to the same, unpruned net.")
        idx = np.asarray(sorted(set(int(i) for i in indices)), np.int64)
        if len(idx) and (idx[0] < 0 or idx[-1] >= width):
            raise PruneError(f"{source}: layer {name!r} keeps channel {int(idx[-1] if idx[-1] >= width else idx[0])}, "
                             f"outside its {width} output channels.")
        mask = np.zeros(width, bool)
        mask[idx] = True
        for pos_kept, value in ((mask, 1), (~mask, 2)):
            ch = info.outputs[pos_kept]
            clash = (decided[ch] != 0) & (decided[ch] != value)
            if clash.any():
                raise PruneError(f"{source}: layer {name!r} {'keeps' if value == 1 else 'removes'} channel "
                                 f"{int(np.nonzero(pos_kept)[0][np.argmax(clash)])}, which a layer tied to it "
                                 f"{'removes' if value == 1 else 'keeps'}; the report does not fit this net.")
            decided[ch] = value
    removed = decided == 2
    if (removed & analysis.pinned).any():
        c = int(np.argmax(removed & analysis.pinned))
        g = analysis.groups[analysis.group_of[c]]
        raise PruneError(f"{source} removes a channel of group {g.index} ({', '.join(g.producers[:3])}) that may not "
                         f"be removed here: {g.pinned[int(analysis.local_of[c])]}.")
    keep[removed] = False
    for constraint in analysis.equal_counts:
        counts = keep[constraint.channels.reshape(constraint.parts, -1)].sum(1)
        if len(set(counts.tolist())) > 1:
            raise PruneError(f"{source} keeps {', '.join(map(str, counts.tolist()))} {constraint.side} channels in the "
                             f"{constraint.parts} groups of the grouped convolution {constraint.layer!r}, which must "
                             f"keep as many in each; the report does not fit this net.")
    prunable = int((~analysis.pinned).sum())
    return PrunePlan(keep, prunable, None, None)
