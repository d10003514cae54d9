"""Importance criteria: small registered callables that score a group's channels.

A criterion takes a ChannelGroup and the net's blobs (layer name -> arrays in Caffe's order) and returns one score
array of length ``group.size`` per *member* that has an opinion (a Scale layer for ``slimming``, a producing layer for
``l1``), with NaN where that member does not hold the channel; a Member also says which chain the member sits on
(a plain array is a chain of its own)::

    @register_criterion("l2")
    def l2(group, blobs):
        return [Member(_per_channel(gs, group.size, _norm(gs, blobs, 2)), gs.slot.chain) for gs in group.slots
                if gs.slot.side == "output" and gs.slot.blob == 0]

Before ranking, each member's scores may be normalised by their own mean (``--normalize mean``): filter norms grow
with a layer's fan-in, so one global ranking of raw L1 norms would empty the layers with few inputs per filter;
normalised, a global percent removes the relatively weakest filters of every layer (Torch-Pruning's global pruning
normalises the same way). The scale is taken over the comparable filters only: a dead filter (zero, or weaker than
1% of the layer's strongest) is left out of the mean, or a layer with many of them would rank its live filters far
above every other layer's and the global cut would empty the others. Scale gammas after BatchNorm are comparable
across layers as they are, which is what the paper's global threshold relies on, so ``slimming`` is not normalised
by default.

``channel_scores`` first scores each *chain* of a channel (slim.prune.groups: per-channel layers in a row, with no
fan-out, such as MobileNet's expand Scale, depthwise convolution and depthwise Scale) by the minimum of its members:
factors along a chain multiply, so a zero anywhere on it kills the channel whatever the others hold. It then combines
the chains of every channel by a tie rule (a channel tied by an Eltwise lies on several chains, one per branch):
``union`` and ``max`` rank a channel by its strongest chain, so it stays while any branch would keep it (the union rule
of pytorch-network-slimming's shortcut schema; the two names rank alike, and a global percent removes ``floor(N * p)``
channels under every rule); ``mean`` and ``sum`` aggregate. A channel that no member scores (a group without Scale
layers under ``slimming``) cannot be ranked and is not pruned.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from slim.errors import PruneError
from slim.prune.groups import ChannelAnalysis, ChannelGroup, GroupSlot

__all__ = ["Criterion", "Member", "register_criterion", "criterion", "criteria", "ChannelScores", "channel_scores",
           "TIE_RULES", "NORMALIZERS", "default_normalizer"]


@dataclasses.dataclass
class Member:
    """One member's scores, by group channel (NaN where it does not hold the channel), and its chain (BlobSlot.chain;
    None: a chain of its own). Members on one chain multiply: the chain scores as their minimum."""

    scores: np.ndarray
    chain: Optional[int] = None


Criterion = Callable[[ChannelGroup, Mapping[str, Sequence[np.ndarray]]], List[Union[np.ndarray, Member]]]

_CRITERIA: Dict[str, Criterion] = {}

#: How the members of a tied group combine into one score per channel.
TIE_RULES = ("union", "max", "mean", "sum")

#: How each member's scores are scaled before ranking: not at all, or divided by their mean or their maximum.
NORMALIZERS = ("none", "mean", "max")


def default_normalizer(criterion_name: str) -> str:
    """"none" for ``slimming`` (gammas after BatchNorm share one scale), "mean" for every other criterion."""
    return "none" if criterion_name == "slimming" else "mean"


#: A score below this fraction of its member's largest is dead: it takes no part in the member's scale.
DEAD = 0.01


def _normalized(values: np.ndarray, how: str) -> np.ndarray:
    """One member's scores divided by the mean or maximum of its live scores (NaN where it has no opinion; left as
    they are when that is 0, as for a layer whose filters are all zero)."""
    if how == "none":
        return values
    finite = values[~np.isnan(values)]
    if not len(finite) or not finite.max() > 0:
        return values
    live = finite[finite >= DEAD * finite.max()]
    d = float(live.mean() if how == "mean" else live.max())
    return values / d


def register_criterion(name: str):
    """Decorator: register ``fn(group, blobs) -> [scores per member]`` under ``name`` (``--criterion name``)."""

    def deco(fn: Criterion) -> Criterion:
        if name in _CRITERIA:
            raise RuntimeError(f"importance criterion {name!r} registered twice")
        _CRITERIA[name] = fn
        return fn

    return deco


def criteria() -> List[str]:
    """The registered criterion names, sorted."""
    return sorted(_CRITERIA)


def criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; a PruneError lists the known ones."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise PruneError(f"Unknown importance criterion {name!r}; choose one of {', '.join(criteria())} "
                         f"(--criterion).") from None


def _per_channel(gs: GroupSlot, size: int, values: np.ndarray) -> np.ndarray:
    """Scores by position -> by group channel (the largest where a channel owns several positions), NaN elsewhere."""
    out = np.full(size, -np.inf)
    np.maximum.at(out, gs.local, values.astype(np.float64))
    out[np.isneginf(out)] = np.nan
    return out


def _norm(gs: GroupSlot, blobs, order: int) -> np.ndarray:
    """The L1 or L2 norm of the slices of a blob along the slot's axis, at the group's positions."""
    array = np.asarray(blobs[gs.slot.layer][gs.slot.blob])
    rows = np.moveaxis(array, gs.slot.axis, 0).reshape(array.shape[gs.slot.axis], -1)
    out = np.empty(len(rows))
    # Blocks of about 4 MB: the temporaries stay in cache, and each value of the blob is read once.
    step = max(1, (1 << 20) // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        block = rows[start:start + step]
        out[start:start + step] = np.abs(block).sum(1) if order == 1 else np.einsum("ij,ij->i", block, block)
    out = out[gs.positions]
    return out if order == 1 else np.sqrt(out)


@register_criterion("slimming")
def slimming(group: ChannelGroup, blobs) -> List[np.ndarray]:
    """|gamma| of every Scale layer of the group (network slimming, Liu et al. 2017): one member per Scale."""
    out = []
    for gs in group.slots:
        if gs.slot.factor:
            gamma = np.asarray(blobs[gs.slot.layer][gs.slot.blob])
            values = np.abs(np.moveaxis(gamma, gs.slot.axis, 0).reshape(gamma.shape[gs.slot.axis], -1)[
                gs.positions, 0])
            out.append(Member(_per_channel(gs, group.size, values), gs.slot.chain))
    return out


@register_criterion("l1")
def l1(group: ChannelGroup, blobs) -> List[np.ndarray]:
    """The L1 norm of each producing filter (Li et al., "Pruning Filters for Efficient ConvNets", 2017)."""
    return [Member(_per_channel(gs, group.size, _norm(gs, blobs, 1)), gs.slot.chain) for gs in group.slots
            if gs.slot.side == "output" and gs.slot.blob == 0]


@register_criterion("l2")
def l2(group: ChannelGroup, blobs) -> List[np.ndarray]:
    """The L2 norm of each producing filter."""
    return [Member(_per_channel(gs, group.size, _norm(gs, blobs, 2)), gs.slot.chain) for gs in group.slots
            if gs.slot.side == "output" and gs.slot.blob == 0]


@register_criterion("lasso")
def lasso(group: ChannelGroup, blobs) -> List[np.ndarray]:
    """LASSO selection with least-squares reconstruction (He et al. 2017) chooses channels from calibration data,
    not from the blobs alone: prune_net runs it (slim.prune.reconstruct); it has no score to give here."""
    raise PruneError("Criterion 'lasso' chooses channels from calibration data, not from scores: call "
                     "slim.prune.prune_net(..., PrunePolicy(criterion='lasso'), calibration=Calibration(...)).")


def _by_chain(stack: np.ndarray, chains: List[Optional[int]]) -> np.ndarray:
    """Member rows -> chain rows: the minimum of the members on each chain, channel by channel (NaN-aware)."""
    keys = [c if c is not None and c >= 0 else ("own", i) for i, c in enumerate(chains)]
    if len(set(keys)) == len(keys):
        return stack
    rows = []
    for key in dict.fromkeys(keys):
        mine = stack[[i for i, k in enumerate(keys) if k == key]]
        with np.errstate(invalid="ignore"):
            low = np.where(np.isnan(mine), np.inf, mine).min(0)
        rows.append(np.where(np.isinf(low) & np.isnan(mine).all(0), np.nan, low))
    return np.vstack(rows)


@dataclasses.dataclass
class ChannelScores:
    """One score per channel of the net, from a criterion and a tie rule.

    Attributes:
        criterion: the criterion's name.
        tie_rule: how members combined.
        score: channel id -> score (NaN: not scored, so not prunable).
        members: channel id -> number of member scores it had (a tied channel has several).
        member_channel, member_score: every member score of every scored channel, as (channel id, score) arrays.
    """

    criterion: str
    tie_rule: str
    score: np.ndarray
    members: np.ndarray
    member_channel: np.ndarray
    member_score: np.ndarray


def channel_scores(analysis: ChannelAnalysis, blobs: Mapping[str, Sequence[np.ndarray]], name: str = "slimming",
                   tie_rule: str = "union", normalize: str = "none") -> ChannelScores:
    """Score every channel with criterion ``name``, combining a tied channel's members by ``tie_rule``.

    Args:
        analysis: the net's channel analysis.
        blobs: layer name -> blobs.
        name: the criterion.
        tie_rule: how a tied channel's members combine (TIE_RULES).
        normalize: how each member's scores are scaled first (NORMALIZERS; see ``default_normalizer``).

    Raises:
        PruneError: unknown criterion, tie rule or normaliser; a criterion that scores no channel at all (for
            ``slimming``: the net has no Scale layer after its producers), naming the layers that lack scores.
    """
    fn = criterion(name)
    if tie_rule not in TIE_RULES:
        raise PruneError(f"Unknown tie rule {tie_rule!r}; choose one of {', '.join(TIE_RULES)} (--tie-rule).")
    if normalize not in NORMALIZERS:
        raise PruneError(f"Unknown normaliser {normalize!r}; choose one of {', '.join(NORMALIZERS)} (--normalize).")
    n = analysis.num_channels
    score = np.full(n, np.nan)
    members = np.zeros(n, np.int64)
    member_channel, member_score = [], []
    for group in analysis.groups:
        if group.prunable == 0:
            continue
        per_member = fn(group, blobs)
        if not per_member:
            continue
        per_member = [m if isinstance(m, Member) else Member(m) for m in per_member]
        stack = np.vstack([_normalized(np.asarray(m.scores, np.float64), normalize) for m in per_member])
        valid = ~np.isnan(stack)
        count = valid.sum(0)
        rows, cols = np.nonzero(valid)
        member_channel.append(group.channels[cols])
        member_score.append(stack[rows, cols])
        stack = _by_chain(stack, [m.chain for m in per_member])
        valid = ~np.isnan(stack)
        chains = valid.sum(0)
        with np.errstate(invalid="ignore"):
            if tie_rule in ("union", "max"):
                combined = np.where(chains > 0, np.nanmax(np.where(valid, stack, -np.inf), 0), np.nan)
            elif tie_rule == "mean":
                combined = np.where(chains > 0, np.nansum(stack, 0) / np.maximum(chains, 1), np.nan)
            else:
                combined = np.where(chains > 0, np.nansum(stack, 0), np.nan)
        score[group.channels] = combined
        members[group.channels] = count
    unpinned = ~analysis.pinned
    if not np.any(~np.isnan(score) & unpinned):
        lacking = sorted({p for g in analysis.groups if g.prunable for p in g.producers})
        if name == "slimming":
            raise PruneError(
                f"{analysis.graph.source}: criterion 'slimming' ranks channels by the gamma of a Scale layer after "
                f"their BatchNorm, and no prunable channel has one (layers producing channels without it: "
                f"{', '.join(lacking[:12]) or 'none'}{' ...' if len(lacking) > 12 else ''}). Use --criterion l1 to "
                f"rank them by filter norms instead.")
        raise PruneError(f"{analysis.graph.source}: criterion {name!r} scores none of the prunable channels (layers: "
                         f"{', '.join(lacking[:12]) or 'none'}); choose another --criterion.")
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt))
    return ChannelScores(name, tie_rule, score, members, cat(member_channel, np.int64), cat(member_score, float))
