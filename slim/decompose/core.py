"""``decompose_net``: a net and its weights in, the decomposed net, its weights and a report out; and writing them.

    from slim.decompose import DecomposePolicy, decompose_net, write_decomposed
    from slim.prune import Calibration
    result = decompose_net("vgg16.prototxt", "vgg16.caffemodel", DecomposePolicy(method="3c", speedup=4),
                           calibration=Calibration(images=5000, net="vgg16_trainval.prototxt"))
    net, blobs, report = result
    write_decomposed(result, "vgg16_3c")        # vgg16_3c.prototxt, .caffemodel, .json

The pipeline (He et al. 2017, section 4.1, in their order):

1. plans: ranks per layer, explicit or from a MAC budget (slim.decompose.plan);
2. the decomposed prototxt (slim.decompose.rewrite) with data-free factors: the truncated SVD of the spatial
   split, the truncated SVD of the weights for the channel split (slim.decompose.factor);
3. the data-driven fits, shallow to deep: for each layer, one pass over the calibration images runs the frozen
   original net up to the layer (its pre-activation responses are the targets) and the current, already decomposed
   net up to the horizontal (or channel) layer, gathering that layer's input patches at seeded positions, so every
   layer absorbs the error of those before it; the horizontal layer is refitted by least squares (ReLU-aware when a
   ReLU follows), with an intercept (the original bias is kept, never dropped), then the channel decomposition is
   the ReLU-aware GSVD of its responses;
4. 3C's channel pruning of the decomposed layers' outputs with slim's LASSO pruning
   (``prune_net(..., PrunePolicy(criterion="lasso", layer_widths=...))``), the decomposed net as its reference;
5. combineHP: each 1 x 1 layer folded back into the layer before it where that is cheaper;
6. a last pass over the held-out images measures each layer's error in the written net, and the net outputs'.

Memory: the fits need the samples themselves (the ReLU relaxation is element-wise), so a layer's fit holds
``samples x (inputs + outputs)`` float32 values, checked against ``Calibration.max_stats_bytes`` before the pass.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import numpy as np

from slim import proto as pb
from slim.decompose import factor
from slim.decompose.calibration import Images, Progress, final_errors, followed_by_relu, gather, load, runnable
from slim.decompose.fit import data_free, fit_layer
from slim.decompose.plan import DecomposePolicy, make_plans
from slim.decompose.report import DecomposeReport, LayerDecomposition
from slim.decompose.rewrite import LayerPlan, chain_macs, decomposed_net, fold_mix, foldable
from slim.errors import DecomposeError
from slim.graph import build_graph

__all__ = ["DecomposeResult", "decompose_net", "write_decomposed"]


@dataclasses.dataclass
class DecomposeResult:
    """The decomposed net, its blobs and the report (unpacks as ``net, blobs, report``).

    Attributes:
        net: the rewritten NetParameter (every phase, as the input).
        blobs: layer name -> blobs (numpy float32, Caffe's order).
        report: the DecomposeReport.
        plans: the per-layer plans.
        opencv: the input spelt pooling rounding as OpenCV's ``ceil_mode``, so the output is written that way.
    """

    net: "pb.NetParameter"
    blobs: Dict[str, List[np.ndarray]]
    report: DecomposeReport
    plans: List[LayerPlan]
    opencv: bool = False

    def __iter__(self) -> Iterator:
        return iter((self.net, self.blobs, self.report))


def decompose_net(net: Union[str, Path, "pb.NetParameter"], weights, policy: DecomposePolicy, *,
                  calibration=None, phase: str = "TEST", source: Optional[str] = None,
                  allow_unknown_fields: bool = False) -> DecomposeResult:
    """Decompose convolutions of any net slim can build (see the module docstring for the stages).

    Args:
        net: the prototxt path or NetParameter (every phase; the ``phase`` net is analysed, all are rewritten).
        weights: a .caffemodel path, a slim.io.CaffeModel, or layer name -> arrays; checked against the net.
        policy: what to decompose (slim.decompose.DecomposePolicy).
        calibration: the calibration images and settings (slim.prune.Calibration; None: its defaults, 5,000 images
            of the net's own TRAIN-phase data layer); not used with ``policy.refit`` off and no pruning.
        phase: the NetState phase analysed.
        source: the net's name in messages (defaults to the path).
        allow_unknown_fields: read a prototxt path tolerantly.

    Raises:
        DecomposeError: a layer that cannot be split, a rank out of range, no calibration source; WeightsError:
            weights that do not match the net; PruneError: bad calibration settings.
    """
    from slim.io import CaffeModel, read_caffemodel, read_net
    from slim.io.text import spells_ceil_mode
    from slim.prune.core import conv_fc_macs, load_blobs

    t_start = time.perf_counter()
    opencv = False
    if isinstance(net, (str, Path)):
        source = source or str(net)
        opencv = spells_ceil_mode(net)
        net = read_net(net, allow_unknown_fields=allow_unknown_fields)
    source = source or "<net>"
    policy.check()
    weights_name = str(weights) if isinstance(weights, (str, Path)) else getattr(weights, "path", "<blobs>")
    if isinstance(weights, (str, Path)):
        weights = read_caffemodel(weights)
    graph = build_graph(net, phase, source=source)
    blobs = load_blobs(graph, weights)
    plans, budget = make_plans(net, graph, blobs, policy)
    dnet = decomposed_net(net, graph, plans)
    dgraph = build_graph(dnet, phase, source=f"{source} (decomposed)")
    widths = {p.last: p.keep for p in plans if p.keep is not None}

    images = None
    if policy.refit or widths:
        from slim.prune.calibrate import Calibration
        calibration = calibration or Calibration()
        calibration.check()
        images = Images(net, graph, source, calibration)

    dblobs: Dict[str, List[np.ndarray]] = {name: [np.asarray(a, np.float32) for a in arrays]
                                           for name, arrays in blobs.items() if name not in {p.name for p in plans}}
    relu = {}
    spatial: Dict[str, Optional[factor.SpatialFactors]] = {}
    records: Dict[str, LayerDecomposition] = {}
    for p in plans:
        node = graph.layer(p.name)
        relu[p.name] = policy.relu_aware and followed_by_relu(graph, node)
        w, b = blobs[p.name][0], (blobs[p.name][1] if len(blobs[p.name]) > 1 else None)
        spatial[p.name], kept_energy = data_free(p, np.asarray(w, np.float32), b, dblobs)
        records[p.name] = LayerDecomposition(p.name, p.method, p.layers, p.rank, p.channel_rank,
                                             node.layer.channels_out, p.keep, False, relu[p.name],
                                             chain_macs(graph, [p.name]), 0.0, spectrum_kept=kept_energy)
    progress = Progress(bool(calibration is not None and calibration.progress), len(plans))
    t_fit = time.perf_counter()
    original = None
    if policy.refit:
        device = calibration.device
        original = runnable(graph, blobs, device)
        current = runnable(dgraph, dblobs, device)
        for step, p in enumerate(plans, 1):
            node = graph.layer(p.name)
            samples = gather(original, current, node, dgraph.layer(p.body), images, progress, step)
            b = blobs[p.name][1] if len(blobs[p.name]) > 1 else None
            fit_layer(p, samples, np.asarray(blobs[p.name][0], np.float32), b, spatial.pop(p.name), dblobs,
                 relu[p.name], calibration, records[p.name])
            del samples
            load(current, dblobs, p.layers)
            r = records[p.name]
            kind = "after the ReLU" if r.relu else "linear"
            e0, e1 = (r.error_svd_relu, r.error_fit_relu) if r.relu else (r.error_svd, r.error_fit)
            progress.line(f"[decompose {step}/{len(plans)}] {p}: held-out error ({kind}) {e0:.4f} data-free -> "
                          f"{e1:.4f} fitted")
    elif calibration is not None and calibration.progress:
        for step, p in enumerate(plans, 1):
            progress.line(f"[decompose {step}/{len(plans)}] {p}: data-free")
    t_fit = time.perf_counter() - t_fit

    out_net, out_blobs = dnet, dblobs
    pruning: Dict[str, object] = {}
    kept: Dict[str, List[int]] = {}
    t_prune = time.perf_counter()
    if widths:
        from slim.prune import PrunePolicy, prune_net
        pr = prune_net(dnet, dblobs, PrunePolicy(criterion="lasso", layer_widths=widths), phase=phase,
                       source=f"{source} (decomposed)", calibration=calibration)
        out_net = pr.net
        out_blobs = {name: [np.asarray(a, np.float32) for a in pr.blobs[name]] for name in pr.blobs}
        for p in plans:
            if p.keep is not None:
                kept[p.name] = list(pr.report.kept[p.last])
        rec = pr.report.reconstruction or {}
        pruning = {"widths": {p.last: {"before": records[p.name].outputs, "after": p.keep} for p in plans
                              if p.keep is not None},
                   "reconstruction": rec.get("layers", []), "seconds": rec.get("seconds", {}),
                   "warnings": list(pr.report.warnings)}
    t_prune = time.perf_counter() - t_prune

    for p in plans:
        fgraph = build_graph(out_net, phase, source=f"{source} (decomposed)")
        if foldable(fgraph, p):
            rename = p.name if p.method == "channel" else None
            out_net = fold_mix(out_net, out_blobs, p, rename)
            records[p.name].folded = True
            records[p.name].layers = [n for n in p.layers if n != p.mix]
            if rename:
                records[p.name].layers = [rename]
    fgraph = build_graph(out_net, phase, source=f"{source} (decomposed)")
    for p in plans:
        records[p.name].macs_after = chain_macs(fgraph, records[p.name].layers)
        if p.keep is not None:
            records[p.name].kept_outputs = len(kept.get(p.name, [])) or p.keep

    outputs: Dict[str, Dict[str, float]] = {}
    t_final = time.perf_counter()
    if images is not None:
        original = original or runnable(graph, blobs, calibration.device)
        final = runnable(fgraph, out_blobs, calibration.device)
        outputs = final_errors(original, final, graph, fgraph, plans, records, kept, images)
    t_final = time.perf_counter() - t_final

    if isinstance(weights, CaffeModel):
        stored = weights.blobs_by_name()
        in_graph = {n.name for n in graph.layers}
        for lp in out_net.layer:       # layers outside the analysed phase (TRAIN-only) keep their blobs
            if lp.name not in out_blobs and lp.name not in in_graph and stored.get(lp.name) is not None \
                    and stored[lp.name].blobs:
                out_blobs[lp.name] = [np.asarray(a) for a in stored[lp.name].blobs]

    warnings_: List[str] = []
    for p in plans:
        r = records[p.name]
        if r.macs_after >= r.macs_before:
            warnings_.append(f"{p.name}: the decomposition costs {r.macs_after:,.0f} MACs per image, not less than "
                             f"the layer's {r.macs_before:,.0f}; lower its rank.")
        if r.note:
            warnings_.append(f"{p.name}: {r.note}")
    if pruning:
        warnings_.extend(f"pruning: {w}" for w in pruning["warnings"])
    used = {}
    if images is not None:
        used = {"images_fit": images.source.fit_images, "images_held_out": images.source.held_images,
                "source": images.source.where, **calibration.describe()}
    report = DecomposeReport(
        net=net.name, model=source, weights=weights_name, method=policy.method, policy=policy.describe(),
        layers=[records[p.name] for p in plans], macs_before=conv_fc_macs(graph), macs_after=conv_fc_macs(fgraph),
        params_before=graph.param_count, params_after=fgraph.param_count, budget=budget, pruning=pruning,
        outputs=outputs, calibration=used, warnings=warnings_,
        seconds={"fit": round(t_fit, 3), "prune": round(t_prune, 3), "final_errors": round(t_final, 3),
                 "total": round(time.perf_counter() - t_start, 3)})
    return DecomposeResult(out_net, out_blobs, report, plans, opencv)


def write_decomposed(result: DecomposeResult, output: Union[str, Path], report: Optional[Union[str, Path]] = None) \
        -> Dict[str, Path]:
    """Write OUT.prototxt, OUT.caffemodel and the JSON report, all or nothing (slim.prune.core.write_net_files).

    Returns:
        "prototxt", "caffemodel", "report" -> the paths written.
    """
    from slim.prune.core import write_net_files

    r = result.report
    header = (f"# Decomposed by `slim decompose` ({r.method}) from {r.model} and {r.weights}: "
              f"{len(r.layers)} convolution(s) split, conv+FC MACs per image {r.macs_before:,.0f} -> "
              f"{r.macs_after:,.0f} ({r.speedup:.2f}x).\n")
    return write_net_files(output, report, result.net, result.blobs, header, r.write, opencv=result.opencv,
                           error=DecomposeError)
