"""``prune_net``: a net and its weights in, the pruned net, its weights and a report out; and writing them.

    from slim.prune import PrunePolicy, prune_net, write_pruned
    result = prune_net("nets/vgg19_cifar10.prototxt", "snap_iter_160000.caffemodel", PrunePolicy(percent=0.7))
    net, blobs, report = result                      # a pb.NetParameter, {layer: [arrays]}, a PruneReport
    write_pruned(result, "pruned")                   # pruned.prototxt, pruned.caffemodel, pruned.json

The pipeline: graph (TEST phase) -> channel groups -> scores -> plan -> rewritten NetParameter + transplanted blobs
(+ constants of removed channels folded into biases where needed or asked) -> report. torch is used only through
the layers' own element-wise functions: probing f(0) for their roles, and folding constants one value per channel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from slim import proto as pb
from slim.errors import PruneError, WeightsError
from slim.graph import NetGraph, build_graph
from slim.io.atomic import atomic_write
from slim.prune.constants import FoldResult, fold_constants
from slim.prune.groups import ChannelAnalysis, analyze
from slim.prune.importance import channel_scores
from slim.prune.plan import PrunePlan, PrunePolicy, make_plan, plan_from_kept
from slim.prune.report import LayerChange, PruneReport
from slim.prune.rewrite import PrunedBlobs, masked_blobs, rewrite_net, transplant

__all__ = ["PruneResult", "prune_net", "write_pruned", "load_blobs", "conv_fc_macs", "output_paths"]

if TYPE_CHECKING:
    from slim.io import CaffeModel
    from slim.prune.calibrate import Calibration

_log = logging.getLogger(__name__)

#: A .caffemodel path, a read CaffeModel, or layer name -> blobs (numpy arrays or tensors, Caffe's order).
Weights = Union[str, Path, "CaffeModel", Mapping[str, Sequence[np.ndarray]]]


@dataclasses.dataclass
class PruneResult:
    """The pruned net, its blobs and the report (unpacks as ``net, blobs, report``), with the plan and analysis.

    Attributes:
        net: the rewritten NetParameter (every phase, as the input).
        blobs: layer name -> pruned blobs (numpy arrays, Caffe's order), a PrunedBlobs: each layer's cuts are
            computed when first read, and write_pruned streams those never read.
        report: the PruneReport.
        plan: the PrunePlan (channel id -> kept).
        analysis: the original net's ChannelAnalysis.
        source_blobs: the original blobs (read-only views into the weights file when it was a path).
        absorb_bias: whether constants were folded against the gamma-only masked original.
        opencv: the input prototxt wrote pooling rounding in OpenCV's ``ceil_mode`` spelling, so the pruned one is
            written the same way (write_pruned), for the reader the input was made for.
    """

    net: "pb.NetParameter"
    blobs: PrunedBlobs
    report: PruneReport
    plan: PrunePlan
    analysis: ChannelAnalysis
    source_blobs: Mapping[str, Sequence[np.ndarray]] = dataclasses.field(repr=False, default_factory=dict)
    absorb_bias: bool = False
    opencv: bool = False

    def __iter__(self) -> Iterator:
        return iter((self.net, self.blobs, self.report))

    def masked_original(self) -> Dict[str, List[np.ndarray]]:
        """The original blobs with the removed channels silenced: what the pruned net reproduces exactly."""
        return masked_blobs(self.analysis, self.plan.keep, self.source_blobs, gammas_only=self.absorb_bias)


def load_blobs(graph: NetGraph, weights: Weights) -> Dict[str, List[np.ndarray]]:
    """The blobs of every layer of ``graph`` that has some, checked against the shapes the net expects.

    Args:
        graph: the net.
        weights: a .caffemodel path, a slim.io.CaffeModel, or a mapping layer name -> arrays.

    Raises:
        WeightsError: a layer is missing from the weights, or has another number of blobs or other shapes.
    """
    from slim.io import CaffeModel, read_caffemodel

    if isinstance(weights, (str, Path)):
        weights = read_caffemodel(weights)
    if isinstance(weights, CaffeModel):
        source = weights.path
        entries = {name: (lb.blobs, lb.legacy_shape) for name, lb in weights.blobs_by_name().items()}
    else:
        source = "the weights"
        entries = {name: (list(arrays), []) for name, arrays in weights.items()}
    out: Dict[str, List[np.ndarray]] = {}
    wanted = [node.name for node in graph.layers if node.blob_shapes]
    if wanted and not any(entries.get(name) is not None and len(entries[name][0]) for name in wanted):
        theirs = [name for name, (arrays, _) in entries.items() if len(arrays)]
        raise WeightsError(f"{source} holds no weights for any layer of {graph.source}: the net's layers with blobs "
                           f"are {_names(wanted)}, the weights' are {_names(theirs) or 'none'}. These are weights of "
                           f"another net; prune with the .caffemodel trained from this prototxt.")
    for node in graph.layers:
        if not node.blob_shapes:
            continue
        found = entries.get(node.name)
        if found is None or not found[0]:
            raise WeightsError(f"{source} has no blobs for layer {node.name!r} ({node.type}) of {graph.source}; the "
                               f"weights do not match the net. Prune with the .caffemodel trained from this prototxt.")
        arrays, legacy = found
        if len(arrays) != len(node.blob_shapes):
            raise WeightsError(f"{source}: layer {node.name!r} has {len(arrays)} blobs, {graph.source} expects "
                               f"{len(node.blob_shapes)} ({node.type}). The weights do not match the net.")
        fixed = []
        for i, (array, shape) in enumerate(zip(arrays, node.blob_shapes)):
            array = np.asarray(array) if not hasattr(array, "detach") else array.detach().cpu().numpy()
            shape = tuple(shape)
            if tuple(array.shape) != shape:
                squeeze = lambda s: tuple(d for d in s if d != 1)
                if array.size == int(np.prod(shape)) and squeeze(array.shape) == squeeze(shape):
                    array = array.reshape(shape)  # a legacy 4-D blob (1 x 1 x N x K) or a 0-axis scalar
                else:
                    raise WeightsError(f"{source}: layer {node.name!r} blob {i} has shape {tuple(array.shape)}, "
                                       f"{graph.source} expects {shape}. The weights do not match the net (was the "
                                       f"prototxt already pruned, or edited?).")
            fixed.append(array)
        out[node.name] = fixed
    return out


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def conv_fc_macs(graph: NetGraph) -> float:
    """Multiply-accumulates of the Convolution, Deconvolution and InnerProduct layers per image (calflop's
    conv+FC figure: the batch totals of ``Layer.macs`` over the net's batch size)."""
    total = 0
    for node in graph.layers:
        if node.layer.cost_kind in ("conv", "fc"):
            total += node.layer.macs() or 0
    return total / _batch(graph)


def _batch(graph: NetGraph) -> int:
    for node in graph.layers:
        if not node.bottoms and node.top_shapes and node.top_shapes[0]:
            return max(1, int(node.top_shapes[0][0]))
    return 1


def prune_net(net: Union[str, Path, "pb.NetParameter"], weights: Weights, policy: Optional[PrunePolicy] = None, *,
              absorb_bias: bool = False, replay: Optional[PruneReport] = None, phase: str = "TEST",
              source: Optional[str] = None, allow_unknown_fields: bool = False,
              calibration: Optional["Calibration"] = None) -> PruneResult:
    """Prune the channels of any net slim can build.

    Args:
        net: the prototxt path or NetParameter (every phase; the ``phase`` net is analysed, all are rewritten).
        weights: a .caffemodel path, a slim.io.CaffeModel, or layer name -> arrays; checked against the net.
        policy: what to remove (slim.prune.PrunePolicy); not needed with ``replay``.
        absorb_bias: fold the constant each removed channel still contributes (gamma zeroed, beta on) into the next
            layer's bias where that is exact.
        replay: a PruneReport whose kept channels to apply instead of a policy (``--apply-report``).
        phase: the NetState phase analysed.
        source: the net's name in messages (defaults to the path).
        allow_unknown_fields: read a prototxt path tolerantly.
        calibration: for ``criterion="lasso"``, the calibration images and settings (slim.prune.Calibration;
            None uses its defaults: 5,000 images of the net's own TRAIN-phase data layer).

    Returns:
        A PruneResult (``net, blobs, report = prune_net(...)``).

    Raises:
        PruneError: a bad policy, criterion, protected layer, or an impossible request; WeightsError: weights that
            do not match the net.
    """
    from slim.io import CaffeModel, read_caffemodel, read_net
    from slim.io.text import spells_ceil_mode

    opencv = False
    if isinstance(net, (str, Path)):
        source = source or str(net)
        opencv = spells_ceil_mode(net)
        net = read_net(net, allow_unknown_fields=allow_unknown_fields)
    source = source or "<net>"
    if policy is None and replay is None:
        raise PruneError("prune_net needs a policy (what to remove) or a report to replay.")
    if policy is not None and replay is None:
        policy.check()
    lasso = replay is None and policy.criterion == "lasso"
    if lasso and absorb_bias:
        raise PruneError("--absorb-bias does not apply to --criterion lasso: its least squares refits every reader's "
                         "bias already. Leave --absorb-bias out.")
    weights_name = str(weights) if isinstance(weights, (str, Path)) else getattr(weights, "path", "<blobs>")
    if isinstance(weights, (str, Path)):
        weights = read_caffemodel(weights)
    graph = build_graph(net, phase, source=source)
    analysis = analyze(graph, policy.protect if policy is not None else ())
    blobs = load_blobs(graph, weights)
    if lasso:
        from slim.prune.calibrate import Calibration, CalibrationSource
        calibration = calibration or Calibration()
        calibration.check()
        calibration_source = CalibrationSource.open(net, source, calibration)

    def macs_of(keep: np.ndarray) -> float:
        return conv_fc_macs(build_graph(rewrite_net(net, analysis, keep), phase, source=source))

    if replay is not None:
        plan = plan_from_kept(analysis, replay.kept, {c.name: c.before for c in replay.layers}, "the report")
        criterion = tie_rule = None
        described: Dict[str, object] = {}
    elif lasso:
        from slim.prune.reconstruct import reconstruct_prune
        rebuilt = reconstruct_prune(graph, analysis, blobs, policy, calibration, calibration_source, macs_of)
        plan, blobs = rebuilt.plan, rebuilt.blobs   # the refitted blobs, at the original shapes
        criterion, tie_rule, described = policy.criterion, None, policy.describe()
    else:
        scores = channel_scores(analysis, blobs, policy.criterion, policy.tie_rule, policy.normalizer)
        plan = make_plan(analysis, scores, policy, macs_of)
        criterion, tie_rule, described = policy.criterion, policy.tie_rule, policy.describe()

    pruned_net = rewrite_net(net, analysis, plan.keep)
    pruned = transplant(analysis, plan.keep, blobs)
    fold = FoldResult()
    # Under lasso a removed channel's reader weights are zero: whatever constant it carries contributes nothing.
    if (absorb_bias or analysis.constant_at) and not lasso:
        reference = masked_blobs(analysis, plan.keep, blobs, gammas_only=absorb_bias)
        fold = fold_constants(analysis, plan.keep, reference, pruned_net, pruned, everywhere=absorb_bias)
    if isinstance(weights, CaffeModel):
        _carry_other_phases(weights, graph, pruned_net, pruned)

    new_graph = build_graph(pruned_net, phase, source=f"{source} (pruned)")
    layers = []
    for name, info in analysis.producers.items():
        kept = np.nonzero(plan.keep[info.outputs])[0]
        layers.append(LayerChange(name, graph.layers[info.index].type, len(info.outputs), len(kept),
                                  kept.tolist()))
    report = PruneReport(
        net=net.name, model=source, weights=weights_name, criterion=criterion, tie_rule=tie_rule, policy=described,
        prunable=plan.prunable, requested=plan.requested, removed=plan.removed,
        channels_before=sum(c.before for c in layers), channels_after=sum(c.after for c in layers),
        params_before=graph.param_count, params_after=new_graph.param_count,
        macs_before=conv_fc_macs(graph), macs_after=conv_fc_macs(new_graph), folded=fold.folded,
        dropped=fold.dropped, biased=fold.biased, layers=layers)
    if lasso:
        report.reconstruction = {"layers": [dataclasses.asdict(r) for r in rebuilt.layers],
                                 "selections": rebuilt.selections, "pinned": rebuilt.pinned,
                                 "calibration": rebuilt.calibration, "seconds": rebuilt.seconds,
                                 "passes": rebuilt.passes}
        report.warnings.extend(f"lasso keeps {layer} whole: {why}" for layer, why in rebuilt.pinned.items())
        report.warnings.extend(f"lasso did not refit {r.layer}: {r.note}" for r in rebuilt.layers if not r.refitted)
    if plan.macs is not None:
        _check_target(report, plan.macs[1], source)
    if plan.cut is not None:
        report.cut = plan.cut.to_dict()
        warning = plan.cut.warning(criterion)
        if warning:
            report.warnings.append(warning)
    for warning in report.warnings:
        _log.warning("%s: %s", source, warning)
    return PruneResult(pruned_net, pruned, report, plan, analysis, blobs, absorb_bias, opencv)


def _check_target(report: PruneReport, searched: float, source: str) -> None:
    """A MAC target is a promise: the written net's MACs must be those the search found, within the tolerance."""
    from slim.prune.plan import TOLERANCE

    policy = report.policy
    target = policy["target_macs"] if policy.get("target_macs") is not None else report.macs_before / policy["speedup"]
    if report.macs_after != searched or abs(report.macs_after - target) > TOLERANCE * target * (1 + 1e-9):
        raise PruneError(f"{source}: the pruned net has {report.macs_after:,.0f} conv+FC MACs per image, not within "
                         f"{TOLERANCE:.0%} of the target {target:,.0f} (the search found {searched:,.0f}); nothing "
                         f"was written. This is a bug in slim: please report it with the net.")


def _carry_other_phases(model, graph: NetGraph, net: "pb.NetParameter", pruned: PrunedBlobs) -> None:
    """Blobs of layers outside the analysed phase (a TRAIN-only layer) go through unchanged."""
    in_graph = {n.name for n in graph.layers}
    stored = model.blobs_by_name()
    for layer in net.layer:
        if layer.name not in in_graph and layer.name not in pruned and stored.get(layer.name) is not None \
                and stored[layer.name].blobs:
            pruned[layer.name] = list(stored[layer.name].blobs)


def output_paths(output: Union[str, Path], report: Optional[Union[str, Path]] = None) -> Dict[str, Path]:
    """OUT.prototxt, OUT.caffemodel and OUT.json (or ``report``) for ``--output OUT`` (a suffix of either kind of
    file is dropped: ``--output pruned.prototxt`` means OUT = pruned)."""
    out = Path(output)
    if out.suffix in (".prototxt", ".caffemodel", ".json"):
        out = out.with_suffix("")
    return {"prototxt": out.with_name(out.name + ".prototxt"), "caffemodel": out.with_name(out.name + ".caffemodel"),
            "report": Path(report) if report is not None else out.with_name(out.name + ".json")}


def _remove_stale_partials(path: Path) -> None:
    """Remove ``.NAME.PID.partial`` files that a killed ``slim prune`` left beside ``path``: only that exact pattern,
    only plain files, and only when no process with that PID is alive (a live writer's file is left alone)."""
    prefix, suffix = f".{path.name}.", ".partial"
    for stale in path.parent.glob(f"{glob_escape(prefix)}*{suffix}"):
        pid = stale.name[len(prefix):-len(suffix)]
        if not pid.isdigit() or stale.is_symlink() or not stale.is_file() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                          # that process still exists: perhaps it is writing
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            stale.unlink()
        except OSError:
            pass


def write_net_files(output: Union[str, Path], report: Optional[Union[str, Path]], net: "pb.NetParameter", blobs,
                    header: str, write_report, opencv: bool = False, error=PruneError) -> Dict[str, Path]:
    """Write OUT.prototxt (``header`` + the net), OUT.caffemodel and the JSON report, all or nothing: what
    ``slim prune`` and ``slim decompose`` write.

    Each file is first written whole under a temporary name beside its destination (``.NAME.PID.partial``; those a
    killed run left behind are removed first); only when all three are written are they renamed into place, so a
    failure leaves no partial output (and no old file half-replaced).

    Args:
        blobs: what write_caffemodel takes (PrunedBlobs are streamed).
        header: comment lines for the top of the prototxt; the report's file name is added.
        write_report: called with the report's temporary path.
        opencv: write pooling rounding in OpenCV's ceil_mode spelling, as the original had it (said in the header).
        error: the SlimError subclass raised for a missing output folder.

    Returns:
        "prototxt", "caffemodel", "report" -> the paths written.
    """
    from slim.io import net_to_text, write_caffemodel

    paths = output_paths(output, report)
    for path in paths.values():
        if not path.parent.is_dir():
            raise error(f"Cannot write {path}: the folder {path.parent} does not exist. Create it or choose "
                        f"another --output.")
    for path in paths.values():
        _remove_stale_partials(path)
    temps = {key: path.with_name(f".{path.name}.{os.getpid()}.partial") for key, path in paths.items()}
    header += f"# Report: {paths['report'].name}. Comments of the original are not carried over.\n"
    if opencv:
        header += ("# Pooling rounding in OpenCV's ceil_mode spelling, as in the original (OpenCV reads it, BVLC "
                   "Caffe does not).\n")
    try:
        write_caffemodel(temps["caffemodel"], net, blobs.streamed() if isinstance(blobs, PrunedBlobs) else blobs)
        with atomic_write(temps["prototxt"], "w") as f:
            f.write(header + net_to_text(net, opencv=opencv))
        write_report(temps["report"])
        for key in ("caffemodel", "prototxt", "report"):
            os.replace(temps[key], paths[key])
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
    return paths


def write_pruned(result: PruneResult, output: Union[str, Path], report: Optional[Union[str, Path]] = None) \
        -> Dict[str, Path]:
    """Write OUT.prototxt, OUT.caffemodel and the JSON report of a prune, all or nothing (write_net_files).

    Returns:
        "prototxt", "caffemodel", "report" -> the paths written.
    """
    r = result.report
    header = (f"# Pruned by `slim prune` from {r.model} and {r.weights}: {r.removed} of {r.prunable} prunable "
              f"channels removed ({r.fraction:.2%}).\n")
    return write_net_files(output, report, result.net, result.blobs, header, r.write, opencv=result.opencv)
