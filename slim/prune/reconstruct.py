"""Channel pruning by LASSO selection and least-squares reconstruction (He, Zhang and Sun, ICCV 2017), on any net
slim builds: ``prune_net(..., PrunePolicy(criterion="lasso"), calibration=Calibration(...))``.

How many channels each group keeps comes from the policy exactly as for the other criteria (``--percent`` spread
evenly over the groups, ``--layer-percent``, ``--layer-width``, ``--target-macs`` / ``--speedup`` by the same
bisection, ``--min-channels``, ``--round-to``, ``--protect``); which ones, from the data. The groups are visited
shallow to deep (by their first reader). For each, one pass over the calibration images gathers the statistics of
every layer that reads its channels (slim.prune.calibrate), with targets from the frozen original net and inputs
from the current net, so each layer absorbs the error of everything pruned before it. Then:

* selection: LASSO on the summed Gram form of all readers (a channel read by several layers, through fan-out, a
  Concat or a DenseNet block, is chosen for all of them at once); channels of other groups that a reader also reads
  stay fixed at their current state;
* reconstruction: each reader's weights and bias are refitted by least squares over its kept input channels;
* the producers of the group are cut with their BatchNorm and Scale as for every criterion (slim.prune.rewrite).

Groups that lose nothing are still visited once anything upstream changed: their readers are refitted to the
pruned inputs (the paper reconstructs every layer after the first pruned one).

The current net keeps the original shapes throughout; a removed channel's reader weights are zero, so the pruned
net equals it exactly, whatever a removed channel still carries. Residual branches: the shortcut's channels form a
group tied by the Eltwise and are pruned, if asked, in every block at once (no runtime channel sampler: the
released code's Filter layer made the net slower than the unpruned one); a branch's first layer keeps reading the
whole (kept) stream, and its last layer's target is corrected for the shortcut's error (slim.prune.calibrate).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from slim.errors import PruneError
from slim.graph import NetGraph
from slim.prune.calibrate import Calibration, CalibrationSource, ReaderUnit, StatsPass, inputs_only, reader_units
from slim.prune.groups import ChannelAnalysis
from slim.prune.importance import ChannelScores
from slim.prune.lars import require_solver
from slim.prune.lasso import (channel_gram, expand, least_squares, relative_error, select_channels,
                              unexplained)
from slim.prune.plan import PrunePlan, PrunePolicy, make_plan

__all__ = ["LayerReconstruction", "ReconstructionResult", "reconstruct_prune", "lasso_feasibility",
           "explain_lasso"]


@dataclasses.dataclass
class LayerReconstruction:
    """One reading layer refitted by least squares, with its relative errors ||Y - Y_hat|| / ||Y|| on the held-out
    calibration samples (Y: the original layer's output, corrected for the shortcut's error in a residual branch).

    Attributes:
        layer: the layer.
        inputs_before, inputs_after: input channels it reads before and after (channel decisions, not columns).
        error_unpruned: its original weights on all of the current inputs (only upstream pruning's error).
        error_pruned: its original weights on the kept inputs (pruned, not yet reconstructed).
        error_reconstructed: after the least squares.
        fit_samples, held_samples: sample rows fitted on and held out (per convolution group).
        pass_index: the pass (group visit) that refitted it last.
        refitted: False when the samples were too few for its least squares: its weights were only sliced (the
            error after equals the error before), and ``note`` says why.
        note: why it was not refitted, or empty.
    """

    layer: str
    inputs_before: int
    inputs_after: int
    error_unpruned: float
    error_pruned: float
    error_reconstructed: float
    fit_samples: int
    held_samples: int
    pass_index: int
    refitted: bool = True
    note: str = ""


@dataclasses.dataclass
class ReconstructionResult:
    """What ``reconstruct_prune`` returns to prune_net.

    Attributes:
        plan: the PrunePlan with the chosen channels.
        blobs: every layer's blobs at the original shapes, reconstructed where refitted (removed inputs zero).
        layers: one LayerReconstruction per refitted layer, in net order.
        selections: one dict per pruned group: producers, kept / candidates, alpha, active set size.
        pinned: layer -> why lasso could not prune its output channels (channels pinned before planning).
        calibration: the Calibration settings and the images used.
        seconds: wall time of the passes (statistics), the solves, and in all; the passes split into the forward
            prefixes alone ("forward"), sampling and gathering patches ("gather") and accumulating ("accumulate").
        passes: the last layer each pass ran to (its forward prefix), in order.
    """

    plan: PrunePlan
    blobs: Dict[str, List[np.ndarray]]
    layers: List[LayerReconstruction]
    selections: List[Dict[str, object]]
    pinned: Dict[str, str]
    calibration: Dict[str, object]
    seconds: Dict[str, float]
    passes: List[str] = dataclasses.field(default_factory=list)


def _uniform_scores(analysis: ChannelAnalysis, pinned: np.ndarray) -> ChannelScores:
    """Scores that make the global ranking remove the same fraction of every group (LASSO decides which channels;
    the plan only decides how many): channel j of m prunable ones in its group scores (j + 0.5) / m."""
    score = np.full(analysis.num_channels, np.nan)
    for g in analysis.groups:
        free = g.channels[~pinned[g.channels]]
        if len(free):
            score[free] = (np.arange(len(free)) + 0.5) / len(free)
    scored = np.nonzero(~np.isnan(score))[0]
    return ChannelScores("lasso", "union", score, (~np.isnan(score)).astype(np.int64), scored, score[scored])


def _fit_rows(unit: ReaderUnit, calibration: Calibration) -> int:
    per_image = 1 if unit.kind == "fc" else calibration.samples_per_image
    return calibration.split[0] * per_image


def lasso_feasibility(graph: NetGraph, analysis: ChannelAnalysis,
                      calibration: Calibration) -> Tuple[List[ReaderUnit], Dict[str, str], Dict[str, str]]:
    """The reader units, the layers lasso cannot use, and those it can select for but not refit.

    Returns:
        (units, blocked, unfit): every unit; layer -> why its statistics cannot be gathered (its type, shared
        weights, or a memory need above ``max_stats_bytes``): the channels it reads are kept whole; layer -> why its
        least squares would be underdetermined (fewer sample rows than unknowns per output): LASSO still selects its
        inputs (the Gram form needs no more rows than channels), its kept weights are sliced, not refitted.
    """
    units, blocked = reader_units(graph, analysis)
    unfit: Dict[str, str] = {}
    for u in units:
        rows = _fit_rows(u, calibration)
        stats_bytes = 2 * 8 * (u.dim + 1) * (u.dim + 1 + (u.rows.stop - u.rows.start))
        if stats_bytes > calibration.max_stats_bytes:
            blocked[u.layer] = (f"its statistics ({u.dim:,} inputs) would take {stats_bytes / 2**30:.1f} GiB, "
                                f"above the {calibration.max_stats_bytes / 2**30:.1f} GiB budget")
        elif rows < u.dim + 1:
            per = "one per image" if u.kind == "fc" else f"{calibration.samples_per_image} per image"
            unfit[u.layer] = (f"it reads {u.dim:,} values per output and the calibration gives {rows:,} samples "
                              f"({per}); its least squares needs at least {u.dim + 1:,} (raise --calib-images)")
    return units, blocked, unfit


def explain_lasso(graph: NetGraph, analysis: ChannelAnalysis, calibration: Calibration) -> List[str]:
    """What ``--criterion lasso`` could not do on this net with these calibration settings, line by line (for
    ``slim prune --explain --criterion lasso``; no data is read)."""
    units, blocked, unfit = lasso_feasibility(graph, analysis, calibration)
    _, pins = _pin_unreconstructable(analysis, units, blocked)
    fit, held = calibration.split
    lines = [f"lasso: {len({u.layer for u in units})} layers read channels and can be refitted by least squares; "
             f"{fit} calibration images to fit, {held} held out, {calibration.samples_per_image} samples per image"]
    lines += [f"lasso keeps {layer}'s output channels whole: {why}" for layer, why in pins.items()]
    lines += [f"lasso selects {layer}'s inputs but cannot refit it: {why}" for layer, why in unfit.items()]
    return lines


def _pin_unreconstructable(analysis: ChannelAnalysis, units: List[ReaderUnit], blocked: Mapping[str, str]) \
        -> Tuple[np.ndarray, Dict[str, str]]:
    """Pin the channels lasso cannot prune: those read by a layer it cannot refit, or by no layer at all."""
    pinned = analysis.pinned.copy()
    reasons: Dict[str, str] = {}
    read = np.zeros(analysis.num_channels, bool)
    for u in units:
        if u.layer not in blocked:
            read[u.columns] = True
    for name, why in blocked.items():
        info = analysis.producers[name]
        hit = np.unique(analysis.group_of[info.inputs])
        for g in hit:
            group = analysis.groups[g]
            free = group.channels[~pinned[group.channels]]
            if len(free):
                pinned[free] = True
                for p in group.producers:
                    reasons.setdefault(p, f"its channels are read by {name!r}, which lasso cannot reconstruct: {why}")
    for group in analysis.groups:
        free = group.channels[~pinned[group.channels] & ~read[group.channels]]
        if len(free):
            pinned[free] = True
            for p in group.producers:
                reasons.setdefault(p, "no layer that lasso reconstructs reads its channels")
    return pinned, reasons


def _with_pins(analysis: ChannelAnalysis, pinned: np.ndarray) -> ChannelAnalysis:
    groups = []
    for g in analysis.groups:
        extra = {int(analysis.local_of[c]): "lasso cannot reconstruct its readers"
                 for c in g.channels if pinned[c] and not analysis.pinned[c]}
        groups.append(dataclasses.replace(g, pinned={**g.pinned, **extra}))
    return dataclasses.replace(analysis, groups=groups, pinned=pinned)


class _Progress:
    """One line per pass on stderr (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total
        self.tty = sys.stderr.isatty()

    def show(self, step: int, what: str, batch: int, batches: int) -> None:
        if not self.enabled:
            return
        line = f"[lasso {step}/{self.total}] {what}: batch {batch}/{batches}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        elif batch == batches:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _nets(graph: NetGraph, blobs: Mapping[str, Sequence[np.ndarray]], device):
    """The frozen original and the working copy, data layers replaced by Input layers."""
    from slim.net import Net

    net_param = inputs_only(graph)
    nets = []
    for _ in range(2):
        net = Net(net_param, phase="TEST", seed=0, device=device)
        with torch.no_grad():
            for name, tensors in net.params.items():
                for t, array in zip(tensors, blobs[name]):
                    t.copy_(torch.as_tensor(np.asarray(array, np.float32)).reshape(t.shape))
        net.eval()
        nets.append(net)
    return nets


def reconstruct_prune(graph: NetGraph, analysis: ChannelAnalysis, blobs: Mapping[str, Sequence[np.ndarray]],
                      policy: PrunePolicy, calibration: Calibration, source: CalibrationSource,
                      macs_of: Callable[[np.ndarray], float]) -> ReconstructionResult:
    """Choose each group's channels by LASSO and refit its readers by least squares.

    Args:
        graph: the analysed graph (TEST phase).
        analysis: its channel analysis.
        blobs: the original blobs (numpy, Caffe's order).
        policy: how many to remove (its criterion is "lasso").
        calibration: the settings.
        source: the calibration images (CalibrationSource.open).
        macs_of: keep mask -> conv+FC MACs per image, for target policies.

    Raises:
        PruneError: a bad policy, a calibration image shape that does not fit the net, or a request the pins forbid.
    """
    t_start = time.perf_counter()
    calibration.check()
    require_solver()
    data_tops = {t: s for n in graph.layers if n.layer.is_data for t, s in zip(n.tops, n.top_shapes)}
    image_top = source.top if source.top in data_tops else None
    if image_top is None:
        images = [t for t, s in data_tops.items() if len(s) == 4]
        if len(images) != 1:
            raise PruneError(f"The calibration images come from blob {source.top!r} ({source.where}), which "
                             f"{graph.source} does not read; its data blobs are {', '.join(data_tops) or 'none'}.")
        image_top = images[0]
    if tuple(data_tops[image_top][1:]) != source.shape:
        raise PruneError(f"The calibration images ({source.where}) have shape {source.shape}, but {graph.source} "
                         f"reads {image_top!r} as {tuple(data_tops[image_top][1:])}; calibrate on data of the net's "
                         f"input shape (--calib-net).")

    units, blocked, unfit = lasso_feasibility(graph, analysis, calibration)
    if unfit:
        warnings.warn(f"--criterion lasso cannot refit {', '.join(unfit)}: {next(iter(unfit.values()))}. Their kept "
                      f"weights are sliced instead (the report says so).", stacklevel=3)
    pinned, pin_reasons = _pin_unreconstructable(analysis, units, blocked)
    if pin_reasons:
        shown = "; ".join(f"{k}: {v}" for k, v in list(pin_reasons.items())[:3])
        warnings.warn(f"--criterion lasso keeps the output channels of {len(pin_reasons)} layer(s) whole ({shown}"
                      f"{' ...' if len(pin_reasons) > 3 else ''}); the report lists them all.", stacklevel=3)
    planning = _with_pins(analysis, pinned)
    if not (~pinned).any():
        raise PruneError(f"{graph.source}: --criterion lasso can prune none of the channels: "
                         f"{'; '.join(f'{k}: {v}' for k, v in list(pin_reasons.items())[:5]) or 'all are pinned'}.")
    plan0 = make_plan(planning, _uniform_scores(analysis, pinned), policy, macs_of)
    # The channels of groups still to visit count as kept until their own pass decides them: the plan has only
    # fixed how many each keeps, not which.
    keep = plan0.keep.copy()
    undecided = np.zeros(analysis.num_channels, bool)

    original, current = _nets(graph, blobs, calibration.device)
    originals = {name: [np.asarray(a, np.float32) for a in arrays] for name, arrays in blobs.items()}
    # The refitted layers' blobs as numpy: views of the working net's tensors on the CPU (no third copy of the
    # model), copies written back after each pass on a GPU.
    live = {name: [t.detach().cpu().numpy() for t in current.params[name]] for name in {u.layer for u in units}}
    on_cpu = current.device.type == "cpu"
    usable = [u for u in units if u.layer not in blocked]
    units_of: Dict[int, List[ReaderUnit]] = {}
    for u in usable:
        for g in np.unique(analysis.group_of[u.columns]):
            units_of.setdefault(int(g), []).append(u)
    order = sorted(units_of, key=lambda g: min(x.node.index for x in units_of[g]))

    records: Dict[str, LayerReconstruction] = {}
    selections: List[Dict[str, object]] = []
    t_stats = t_solve = 0.0
    dirty = False
    todo = []
    for g in order:
        cand = analysis.groups[g].channels[~pinned[analysis.groups[g].channels]]
        if int(keep[cand].sum()) < len(cand) or dirty:
            todo.append(g)
            dirty = dirty or int(keep[cand].sum()) < len(cand)
    for g in todo:
        undecided[analysis.groups[g].channels] = True
    progress = _Progress(calibration.progress, len(todo))
    passes: List[str] = []
    split = {"forward": 0.0, "gather": 0.0, "accumulate": 0.0}
    fit_b, held_b = source.num_batches
    for step, g in enumerate(todo, 1):
        group = analysis.groups[g]
        cand = group.channels[~pinned[group.channels]]
        n_keep = int(plan0.keep[cand].sum())
        us = units_of[g]
        t0 = time.perf_counter()
        stats = StatsPass(original, current, us, calibration, tag=g)
        passes.append(stats.end)
        label = f"group {g} ({', '.join(group.producers[:2])}{', ...' if len(group.producers) > 2 else ''})"
        for index, held, images in source.batches(calibration.device):
            stats.run(images, index, held, data_tops, image_top)
            progress.show(step, label, index + 1, fit_b + held_b)
        t1 = time.perf_counter()
        t_stats += t1 - t0
        for k, v in stats.seconds.items():
            split[k] += v
        if n_keep < len(cand):
            chosen, info = _select(us, stats, cand, keep | undecided, n_keep, originals, calibration, analysis)
            keep[cand] = False
            keep[chosen] = True
            selections.append({"group": g, "producers": group.producers, "candidates": len(cand),
                               "planned": n_keep, "kept": len(chosen), **info})
        undecided[group.channels] = False
        for u in us:
            _refit(u, stats, keep | undecided, originals, live, calibration, records, step,
                   unfit.get(u.layer, ""))
        for name in ({u.layer for u in us} if not on_cpu else ()):
            with torch.no_grad():
                for t, array in zip(current.params[name], live[name]):
                    t.copy_(torch.from_numpy(array).reshape(t.shape))
        t_solve += time.perf_counter() - t1
    progress.done()

    macs = None
    if plan0.macs is not None:
        macs = (plan0.macs[0], macs_of(keep))
    plan = PrunePlan(keep, plan0.prunable, plan0.requested, macs)
    out = {name: list(arrays) for name, arrays in originals.items()}
    for name, arrays in live.items():
        if name in records:
            out[name] = arrays
    layers = [records[n.name] for n in graph.layers if n.name in records]
    used = {"images_fit": source.fit_images, "images_held_out": source.held_images,
            "source": source.where, **calibration.describe()}
    seconds = {"statistics": round(t_stats, 3), "solve": round(t_solve, 3),
               "total": round(time.perf_counter() - t_start, 3), **{k: round(v, 3) for k, v in split.items()}}
    return ReconstructionResult(plan, out, layers, selections, pin_reasons, used, seconds, passes)


def _select(us: List[ReaderUnit], stats: StatsPass, cand: np.ndarray, keep: np.ndarray, n_keep: int,
            originals, calibration: Calibration, analysis: ChannelAnalysis) -> Tuple[np.ndarray, Dict[str, object]]:
    """Redundant channels first, then LASSO over the rest, on the Gram form summed over every reader unit."""
    redundant = _redundant(us, stats, cand, keep, len(cand) - n_keep)
    if len(redundant):
        cand = np.setdiff1d(cand, redundant)
    c = len(cand)
    G = np.zeros((c, c))
    q = np.zeros(c)
    n_rows = 0
    for u in us:
        A, B, _, count = stats.stats[id(u)].numpy(False)
        W = u.weight_matrix(originals[u.layer][0])
        channels, Gu, qu = channel_gram(A, B, W, u.columns, count, u.bias)
        mine = np.isin(channels, cand)
        pos = np.searchsorted(cand, channels[mine])
        # Channels of other groups that this layer also reads stay as they are now: kept ones move to the target.
        fixed = ~mine & keep[channels]
        G[np.ix_(pos, pos)] += Gu[np.ix_(mine, mine)]
        q[pos] += qu[mine] - Gu[np.ix_(mine, fixed)].sum(1)
        n_rows += count * (u.rows.stop - u.rows.start)
    sel = select_channels(G, q, n_rows, n_keep, calibration.rank_tol)
    chosen = cand[sel.kept]
    chosen = _keep_blobs_alive(analysis, cand, chosen, G, q)
    info = {"alpha": sel.alpha, "active": sel.active, "filled": sel.filled, "redundant": len(redundant)}
    return chosen, info


#: A channel whose variance the others leave less than this fraction of unexplained is removed before LASSO.
REDUNDANT = 1e-6


def _redundant(us: List[ReaderUnit], stats: StatsPass, cand: np.ndarray, keep: np.ndarray, limit: int) -> np.ndarray:
    """Candidates that are linear combinations of the other kept inputs (or dead) in every reader, removed one at a
    time (a duplicated pair loses one member, not both), at most ``limit``.

    LASSO alone cannot see them: it scales each channel's fixed contribution X_i W_i^T, while the least squares that
    follows can move a redundant channel's weights onto the channels it is made of, at no cost."""
    removed: List[int] = []
    active = np.zeros(len(keep), bool)
    active[cand] = True
    while len(removed) < limit:
        worst = np.zeros(len(cand))
        for u in us:
            A, _, _, count = stats.stats[id(u)].numpy(False)
            usable = active[u.columns] | (keep[u.columns] & ~np.isin(u.columns, cand))
            mine = np.nonzero(np.isin(cand, u.columns) & active[cand])[0]
            if not len(mine):
                continue
            worst[mine] = np.maximum(worst[mine], unexplained(A, count, u.columns, usable, cand[mine]))
        worst[~active[cand]] = np.inf
        best = int(np.argmin(worst))
        if not worst[best] < REDUNDANT:
            break
        removed.append(int(cand[best]))
        active[cand[best]] = False
    return np.asarray(removed, np.int64)


def _keep_blobs_alive(analysis: ChannelAnalysis, cand: np.ndarray, chosen: np.ndarray, G, q) -> np.ndarray:
    """A blob never loses all its channels (a Slice top covering only removed ones gets its best channel back)."""
    kept = np.zeros(analysis.num_channels, bool)
    kept[chosen] = True
    kept[~np.isin(np.arange(analysis.num_channels), cand)] = True
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.abs(q) / np.sqrt(np.diag(G)), nan=0.0, posinf=0.0)
    extra = []
    for channels in analysis.blob_channels.values():
        if len(channels) and not kept[channels].any():
            inside = np.nonzero(np.isin(cand, channels))[0]
            best = cand[inside[np.argmax(corr[inside])]]
            kept[best] = True
            extra.append(best)
    return np.sort(np.concatenate([chosen, np.asarray(extra, np.int64)])) if extra else chosen


def _refit(u: ReaderUnit, stats: StatsPass, keep: np.ndarray, originals, live, calibration: Calibration,
           records: Dict[str, LayerReconstruction], step: int, unfit: str) -> None:
    """Least squares for one unit (or, when ``unfit`` says why it cannot be, its original weights on the kept
    inputs); write its weights into ``live``; record its held-out errors."""
    A, B, _, count = stats.stats[id(u)].numpy(False)
    Ah, Bh, yyh, count_h = stats.stats[id(u)].numpy(True)
    D = u.dim
    kept_cols = np.nonzero(keep[u.columns])[0]
    W = u.weight_matrix(originals[u.layer][0])
    orig = np.zeros((D + 1, W.shape[0]))
    orig[:D] = W.T
    if u.bias:
        orig[D] = np.asarray(originals[u.layer][1], np.float64)[u.rows]
    masked = orig.copy()
    masked[np.setdiff1d(np.arange(D), kept_cols)] = 0
    if unfit:
        full = masked
    else:
        full = expand(least_squares(A, B, kept_cols, u.bias, calibration.ridge), kept_cols, D, u.bias)
        unknowns = len(kept_cols) + int(u.bias)
        # A least squares on barely more samples than unknowns can fit noise: below 10 samples per unknown it must
        # beat the sliced weights on the held-out images, or those are kept (so these errors were part of a choice).
        if count < 10 * unknowns and relative_error(Ah, Bh, yyh, full) > relative_error(Ah, Bh, yyh, masked):
            full = masked
            unfit = (f"its least squares on {count:,} samples for {unknowns:,} unknowns per output did worse than the "
                     f"sliced weights on the held-out images (it overfitted; raise --calib-images): the sliced "
                     f"weights are kept")
    u.write(live[u.layer][0], live[u.layer][1] if u.bias else None, full)
    errs = [relative_error(Ah, Bh, yyh, w) for w in (orig, masked, full)]
    before = len(np.unique(u.columns))
    after = len(np.unique(u.columns[kept_cols]))
    rec = records.get(u.layer)
    if rec is not None and rec.pass_index == step and u.group > 0:
        # Another group of the same convolution (its groups read the same channel positions): the layer's error is
        # the root mean square over its groups.
        n = u.group + 1
        rms = lambda old, new: math.sqrt((old ** 2 * (n - 1) + new ** 2) / n)
        rec.error_unpruned = rms(rec.error_unpruned, errs[0])
        rec.error_pruned = rms(rec.error_pruned, errs[1])
        rec.error_reconstructed = rms(rec.error_reconstructed, errs[2])
        return
    records[u.layer] = LayerReconstruction(u.layer, before, after, *errs, count, count_h, step, not unfit, unfit)
