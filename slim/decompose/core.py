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
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from slim import proto as pb
from slim.decompose import factor
from slim.decompose.plan import DecomposePolicy, make_plans
from slim.decompose.ranks import energy
from slim.decompose.report import DecomposeReport, LayerDecomposition
from slim.decompose.rewrite import LayerPlan, chain_macs, decomposed_net, fold_mix, foldable
from slim.errors import DecomposeError, PruneError
from slim.graph import LayerNode, NetGraph, build_graph

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


class _Progress:
    """One line per decomposed layer (and per pass on a terminal) on stderr."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()

    def batch(self, step: int, what: str, batch: int, batches: int) -> None:
        if self.tty:
            sys.stderr.write("\r" + f"[decompose {step}/{self.total}] {what}: batch {batch}/{batches}"[:120].ljust(120))
            sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + text[:200].ljust(120 if self.tty else 0) + "\n")
            sys.stderr.flush()


def _runnable(graph: NetGraph, blobs: Mapping[str, Sequence[np.ndarray]], device):
    """A Net of ``graph`` with data layers as Input layers (the calibration images are handed in) and ``blobs``."""
    from slim.net import Net
    from slim.prune.calibrate import inputs_only

    param = inputs_only(graph)
    for lp in param.layer:                 # the blobs are copied in: no filler needs to run
        for field in ("convolution_param", "inner_product_param"):
            if lp.HasField(field):
                getattr(lp, field).ClearField("weight_filler")
                getattr(lp, field).ClearField("bias_filler")
    net = Net(param, phase="TEST", seed=0, device=device)
    _load(net, blobs, net.params.keys())
    net.eval()
    return net


def _load(net, blobs: Mapping[str, Sequence[np.ndarray]], names) -> None:
    with torch.no_grad():
        for name in names:
            for t, array in zip(net.params[name], blobs[name]):
                t.copy_(torch.as_tensor(np.asarray(array, np.float32)).reshape(t.shape))


def _followed_by_relu(graph: NetGraph, node: LayerNode) -> bool:
    """The layer's output is read by one plain ReLU only (negative_slope 0), so a ReLU-aware fit is exact about
    what the net computes."""
    blob = node.top_ids[0]
    users = graph.consumers.get(blob, [])
    if len(users) != 1 or blob in graph.output_ids:
        return False
    nxt = graph.layers[users[0][0]]
    return nxt.type == "ReLU" and nxt.param.relu_param.negative_slope == 0


def _patches(x: torch.Tensor, layer, b: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Input patches of a (group 1) convolution at output positions (b, r, c): samples x (C k_h k_w), columns in
    the weight's order (channel, row, column)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel, layer.stride, layer.pad, layer.dilation
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    rows = (r * sh)[:, None] + torch.arange(kh, device=x.device)[None] * dh
    cols = (c * sw)[:, None] + torch.arange(kw, device=x.device)[None] * dw
    out = xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]           # S x kh x kw x C
    return out.permute(0, 3, 1, 2).reshape(len(b), -1)


class _Images:
    """The calibration images and where they go in the nets."""

    def __init__(self, net: "pb.NetParameter", graph: NetGraph, source: str, calibration):
        from slim.prune.calibrate import CalibrationSource

        try:
            self.source = CalibrationSource.open(net, source, calibration)
        except PruneError as e:
            if calibration.net is None:
                raise DecomposeError(
                    f"{source} has no data layer in its TRAIN phase (a deploy net reads its data from Input layers), "
                    f"so slim decompose has no calibration images for its data-driven fits. Pass --calib-net with a "
                    f"train/val prototxt whose TRAIN-phase data layer reads training images, or --no-refit "
                    f"--prune-ratio 1 for the data-free decomposition.") from None
            raise DecomposeError(str(e)) from None
        self.calibration = calibration
        self.data_tops = {t: s for n in graph.layers if n.layer.is_data for t, s in zip(n.tops, n.top_shapes)}
        top = self.source.top if self.source.top in self.data_tops else None
        if top is None:
            fours = [t for t, s in self.data_tops.items() if len(s) == 4]
            if len(fours) != 1:
                raise DecomposeError(f"The calibration images come from blob {self.source.top!r} "
                                     f"({self.source.where}), which {graph.source} does not read; its data blobs are "
                                     f"{', '.join(self.data_tops) or 'none'}.")
            top = fours[0]
        self.top = top
        if tuple(self.data_tops[top][1:]) != self.source.shape:
            raise DecomposeError(f"The calibration images ({self.source.where}) have shape {self.source.shape}, but "
                                 f"{graph.source} reads {top!r} as {tuple(self.data_tops[top][1:])}; calibrate on "
                                 f"data of the net's input shape (--calib-net).")

    def feed(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {t: images if t == self.top else torch.zeros((images.shape[0],) + tuple(s[1:]), device=images.device)
                for t, s in self.data_tops.items()}


@dataclasses.dataclass
class _Samples:
    """A layer's fit and held-out samples: input patches X and original responses Y (float32, on the device)."""

    X: List[torch.Tensor]
    Y: List[torch.Tensor]


def _positions(node: LayerNode, batch: int, seed: int, tag: int, index: int, k: int, device):
    from slim.data import derive_seed

    g = torch.Generator().manual_seed(derive_seed(seed, 0xDEC0, tag, node.index, index))
    _, _, H, W = node.top_shapes[0]
    b = torch.arange(batch).repeat_interleave(k)
    r = torch.randint(0, H, (batch * k,), generator=g)
    c = torch.randint(0, W, (batch * k,), generator=g)
    return b.to(device), r.to(device), c.to(device)


def _gather(original, current, node: LayerNode, body: LayerNode, images: _Images, progress: _Progress,
            step: int) -> _Samples:
    """One pass over the calibration images: the original responses of ``node`` and the current inputs of
    ``body`` (under its geometry) at the same seeded output positions."""
    cal = images.calibration
    k = cal.samples_per_image
    counts = [images.source.fit_images * k, images.source.held_images * k]
    D = body.layer.channels_in * int(np.prod(body.layer.kernel))
    n = node.layer.channels_out
    need = sum(counts) * (D + n) * 4
    if need > cal.max_stats_bytes:
        raise DecomposeError(f"Fitting layer {node.name!r} would hold {sum(counts):,} samples of {D} inputs and {n} "
                             f"outputs ({need / 2 ** 30:.2f} GiB), over the limit of "
                             f"{cal.max_stats_bytes / 2 ** 30:.2f} GiB; lower --calib-images or --samples-per-image.")
    device = current.device
    X = [torch.empty(m, D, device=device) for m in counts]
    Y = [torch.empty(m, n, device=device) for m in counts]
    filled = [0, 0]
    fit_b, held_b = images.source.num_batches
    for index, held, batch in images.source.batches(device):
        pos = _positions(node, batch.shape[0], cal.seed, 0, index, k, device)
        got = {}

        def at_original(n_, values):
            if n_.name == node.name:
                got["y"] = values[node.tops[0]][pos[0], :, pos[1], pos[2]]

        def at_current(n_, values):
            if n_.name == body.name:
                got["x"] = _patches(values[body.bottoms[0]], body.layer, *pos)

        with torch.no_grad():
            original.run_layers(images.feed(batch), node.name, at_original)
            current.run_layers(images.feed(batch), body.name, at_current)
        i = int(held)
        m = got["y"].shape[0]
        X[i][filled[i]:filled[i] + m] = got["x"]
        Y[i][filled[i]:filled[i] + m] = got["y"]
        filled[i] += m
        progress.batch(step, node.name, index + 1, fit_b + held_b)
    return _Samples([x[:f] for x, f in zip(X, filled)], [y[:f] for y, f in zip(Y, filled)])


def _matrix(weight: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """(D + 1) x n weights, bias row last, from Caffe blobs."""
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    return np.concatenate([w.T, b[None]], 0)


def _apply(X: torch.Tensor, W: np.ndarray) -> torch.Tensor:
    Wt = torch.as_tensor(W, dtype=X.dtype, device=X.device)
    return X @ Wt[:-1] + Wt[-1]


def _errs(Y_hat: torch.Tensor, Y: torch.Tensor) -> Tuple[float, float]:
    return factor.errors(Y_hat, Y)


def _channel_apply(Y: torch.Tensor, bias: np.ndarray, cf: factor.ChannelFactors) -> torch.Tensor:
    """A channel decomposition applied to responses ``Y`` of a layer with bias ``bias``."""
    T = torch.as_tensor(cf.transform(), dtype=Y.dtype, device=Y.device)
    return (Y - torch.as_tensor(bias, dtype=Y.dtype, device=Y.device)) @ T + torch.as_tensor(
        cf.bias, dtype=Y.dtype, device=Y.device)


def _set_channel(blobs, plan: LayerPlan, weight: np.ndarray, cf: factor.ChannelFactors) -> None:
    """Body = L^T W (d' filters, no bias), mix = (S R)^T with the fitted bias."""
    W = np.asarray(weight, np.float64)
    body = (cf.combine.T @ W.reshape(W.shape[0], -1)).reshape((cf.rank,) + W.shape[1:])
    blobs[plan.body] = [body.astype(np.float32)]
    blobs[plan.mix] = [cf.mix.reshape(cf.mix.shape + (1, 1)).astype(np.float32), cf.bias.astype(np.float32)]


def _data_free(plan: LayerPlan, weight: np.ndarray, bias: Optional[np.ndarray], blobs) \
        -> Tuple[Optional[factor.SpatialFactors], float]:
    """The data-free factors of one plan into ``blobs``; returns the spatial split (None for "channel") and the
    fraction of the squared singular values the rank keeps (the spatial split's, or the weights' for "channel")."""
    b = np.zeros(weight.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    if plan.method == "channel":
        cf = factor.channel_svd(weight, plan.rank, b)
        _set_channel(blobs, plan, weight, cf)
        return None, float(energy(cf.spectrum)[min(plan.rank, len(cf.spectrum)) - 1])
    f = factor.spatial_split(weight, plan.rank)
    blobs[plan.vertical] = [f.vertical]
    if plan.method == "spatial":
        blobs[plan.body] = [f.horizontal, b.copy()]
    else:
        _set_channel(blobs, plan, f.horizontal, factor.channel_svd(f.horizontal, plan.channel_rank, b))
    return f, float(energy(f.singular_values)[plan.rank - 1])


#: Below this many samples per unknown of a fit, the fit must first beat the data-free factors on the last fifth of
#: the fit samples (fitted on the rest), or they are kept: a least squares on barely more samples than unknowns
#: overfits, and the held-out error would rise instead of fall.
VALIDATE = 10


def _validated(N: int, unknowns: int, fit, error_of, data_free, what: str, notes: List[str]):
    """``fit(lo, hi)`` on the fit samples [lo, hi), or ``data_free`` when there are too few samples for it (see
    VALIDATE); ``error_of(model, lo, hi)`` is the error on fit samples [lo, hi)."""
    if N < unknowns:
        notes.append(f"{what} needs {unknowns} samples (its unknowns per output), the calibration gave {N}: its "
                     f"data-free factors are kept (raise --calib-images)")
        return data_free
    if N < VALIDATE * unknowns:
        cut = N * 4 // 5
        if cut < unknowns or error_of(fit(0, cut), cut, N) >= error_of(data_free, cut, N):
            notes.append(f"{what}: with {N} samples for {unknowns} unknowns per output, the fit did not beat the "
                         f"data-free factors on the last fifth of the fit samples; they are kept (raise "
                         f"--calib-images)")
            return data_free
    return fit(0, N)


def _fit(plan: LayerPlan, samples: _Samples, weight: np.ndarray, bias: Optional[np.ndarray],
         spatial: Optional[factor.SpatialFactors], blobs, relu: bool, calibration, record: LayerDecomposition) -> None:
    """The data-driven fits of one plan on its samples; ``blobs`` updated, errors recorded (held-out). A fit with
    too few samples for its unknowns (D + 1 for the horizontal least squares, n + 1 for the GSVD; see VALIDATE)
    is not made: the data-free factors stay, and the record's note says so."""
    (Xf, Xh), (Yf, Yh) = samples.X, samples.Y
    ridge = calibration.ridge
    N = Xf.shape[0]
    record.samples = [N, Xh.shape[0]]
    pick = (lambda e: e[1]) if relu else (lambda e: e[0])
    notes: List[str] = []

    def channel(R_fit, R_held, R_held0, b0, b, body_weight, body_weight0, rank):
        """The channel split of a body whose responses are R (bias b), against the data-free split of its data-free
        version (responses R_held0, bias b0, weight body_weight0)."""
        n = R_fit.shape[1]
        svd = factor.channel_svd(body_weight, rank, b)
        cf = _validated(N, n + 1, lambda lo, hi: factor.channel_gsvd(R_fit[lo:hi], Yf[lo:hi], rank, b, relu),
                        lambda m, lo, hi: pick(_errs(_channel_apply(R_fit[lo:hi], b, m), Yf[lo:hi])), svd,
                        "the channel decomposition", notes)
        e0 = _errs(_channel_apply(R_held0, b0, factor.channel_svd(body_weight0, rank, b0)), Yh)
        e1 = _errs(_channel_apply(R_held, b, cf), Yh)
        record.stages["channel"] = {"svd": pick(e0), "fit": pick(e1)}
        _set_channel(blobs, plan, body_weight, cf)
        return e0, e1

    if plan.method == "channel":
        W = _matrix(weight, bias)
        b = W[-1]
        Rf, Rh = _apply(Xf, W), _apply(Xh, W)                   # the layer whole, on the current inputs
        e0, e1 = channel(Rf, Rh, Rh, b, b, weight, weight, plan.rank)
        record.stages["channel"]["input"] = pick(_errs(Rh, Yh))
    else:
        f = spatial
        H0 = _matrix(f.horizontal, bias)
        e0 = _errs(_apply(Xh, H0), Yh)

        def horizontal(lo, hi):
            linear = factor.least_squares_fit(Xf[lo:hi], Yf[lo:hi], ridge)
            if not relu:
                return linear
            nonlinear = factor.relu_least_squares(Xf[lo:hi], Yf[lo:hi], ridge)
            # The relaxation is a heuristic: keep whichever fits the post-ReLU responses better on its samples.
            better = _errs(_apply(Xf[lo:hi], nonlinear), Yf[lo:hi])[1] <= _errs(_apply(Xf[lo:hi], linear),
                                                                                 Yf[lo:hi])[1]
            return nonlinear if better else linear

        H1 = _validated(N, Xf.shape[1] + 1, horizontal,
                        lambda m, lo, hi: pick(_errs(_apply(Xf[lo:hi], m), Yf[lo:hi])), H0,
                        "the horizontal layer's least squares", notes)
        e1 = _errs(_apply(Xh, H1), Yh)
        record.stages["spatial"] = {"svd": pick(e0), "fit": pick(e1)}
        n, d, _, kw = f.horizontal.shape
        h_weight = H1[:-1].T.reshape(n, d, 1, kw).astype(np.float32)
        h_bias = H1[-1].astype(np.float32)
        if plan.method == "spatial":
            blobs[plan.body] = [h_weight, h_bias]
        else:
            e0, e1 = channel(_apply(Xf, H1), _apply(Xh, H1), _apply(Xh, H0), H0[-1], h_bias, h_weight,
                             f.horizontal, plan.channel_rank)
    record.error_svd, record.error_fit = e0[0], e1[0]
    if relu:
        record.error_svd_relu, record.error_fit_relu = e0[1], e1[1]
    record.note = "; ".join(notes)


def _final_errors(original, final, graph: NetGraph, fgraph: NetGraph, plans, records, kept, images: _Images) \
        -> Dict[str, Dict[str, float]]:
    """Each decomposed layer's held-out error in the written net (sampled positions, kept outputs) and the net
    outputs' errors."""
    cal = images.calibration
    k = cal.samples_per_image
    sums = {p.name: [0.0, 0.0, 0.0, 0.0] for p in plans}
    last = {records[p.name].layers[-1]: p for p in plans}
    outs = [o for o in graph.outputs if o in fgraph.shapes and tuple(fgraph.shapes[o]) == tuple(graph.shapes[o])]
    osums = {o: [0.0, 0.0, 0, 0] for o in outs}
    for index, held, batch in images.source.batches(original.device):
        if not held:
            continue
        pos = {p.name: _positions(graph.layer(p.name), batch.shape[0], cal.seed, 1, index, k, original.device)
               for p in plans}
        want = {}

        def at_original(node, values):
            if node.name in pos:
                b, r, c = pos[node.name]
                y = values[node.tops[0]][b, :, r, c]
                idx = kept.get(node.name)
                want[node.name] = y if idx is None else y[:, torch.as_tensor(idx, device=y.device)]

        def at_final(node, values):
            p = last.get(node.name)
            if p is not None:
                b, r, c = pos[p.name]
                got = values[node.tops[0]][b, :, r, c].double()
                ref = want[p.name].double()
                s = sums[p.name]
                s[0] += float(((got - ref) ** 2).sum())
                s[1] += float((ref ** 2).sum())
                s[2] += float(((got.clamp(min=0) - ref.clamp(min=0)) ** 2).sum())
                s[3] += float((ref.clamp(min=0) ** 2).sum())

        with torch.no_grad():
            ov = original.run_layers(images.feed(batch), None, at_original)
            fv = final.run_layers(images.feed(batch), None, at_final)
        for o in outs:
            a, b = ov[o].double(), fv[o].double()
            osums[o][0] += float(((a - b) ** 2).sum())
            osums[o][1] += float((a ** 2).sum())
            if a.dim() == 2 or (a.dim() == 4 and a.shape[2:] == (1, 1)):
                osums[o][2] += int((a.reshape(a.shape[0], -1).argmax(1) == b.reshape(b.shape[0], -1).argmax(1)).sum())
                osums[o][3] += a.shape[0]
    for p in plans:
        e, t, er, tr = sums[p.name]
        records[p.name].error_final = math.sqrt(e / t) if t > 0 else 0.0
        if records[p.name].relu:
            records[p.name].error_final_relu = math.sqrt(er / tr) if tr > 0 else 0.0
    out = {}
    for o, (e, t, agree, count) in osums.items():
        out[o] = {"error": math.sqrt(e / t) if t > 0 else 0.0}
        if count:
            out[o]["agreement"] = agree / count
    return out


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
        images = _Images(net, graph, source, calibration)

    dblobs: Dict[str, List[np.ndarray]] = {name: [np.asarray(a, np.float32) for a in arrays]
                                           for name, arrays in blobs.items() if name not in {p.name for p in plans}}
    relu = {}
    spatial: Dict[str, Optional[factor.SpatialFactors]] = {}
    records: Dict[str, LayerDecomposition] = {}
    for p in plans:
        node = graph.layer(p.name)
        relu[p.name] = policy.relu_aware and _followed_by_relu(graph, node)
        w, b = blobs[p.name][0], (blobs[p.name][1] if len(blobs[p.name]) > 1 else None)
        spatial[p.name], kept_energy = _data_free(p, np.asarray(w, np.float32), b, dblobs)
        records[p.name] = LayerDecomposition(p.name, p.method, p.layers, p.rank, p.channel_rank,
                                             node.layer.channels_out, p.keep, False, relu[p.name],
                                             chain_macs(graph, [p.name]), 0.0, spectrum_kept=kept_energy)
    progress = _Progress(bool(calibration is not None and calibration.progress), len(plans))
    t_fit = time.perf_counter()
    original = None
    if policy.refit:
        device = calibration.device
        original = _runnable(graph, blobs, device)
        current = _runnable(dgraph, dblobs, device)
        for step, p in enumerate(plans, 1):
            node = graph.layer(p.name)
            samples = _gather(original, current, node, dgraph.layer(p.body), images, progress, step)
            b = blobs[p.name][1] if len(blobs[p.name]) > 1 else None
            _fit(p, samples, np.asarray(blobs[p.name][0], np.float32), b, spatial.pop(p.name), dblobs,
                 relu[p.name], calibration, records[p.name])
            del samples
            _load(current, dblobs, p.layers)
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
        original = original or _runnable(graph, blobs, calibration.device)
        final = _runnable(fgraph, out_blobs, calibration.device)
        outputs = _final_errors(original, final, graph, fgraph, plans, records, kept, images)
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
    """Write OUT.prototxt, OUT.caffemodel and the JSON report, all or nothing (each written whole under a temporary
    name, then all three renamed into place).

    Returns:
        "prototxt", "caffemodel", "report" -> the paths written.
    """
    from slim.io import net_to_text, write_caffemodel
    from slim.io.atomic import atomic_write
    from slim.prune.core import output_paths

    paths = output_paths(output, report)
    for path in paths.values():
        if not path.parent.is_dir():
            raise DecomposeError(f"Cannot write {path}: the folder {path.parent} does not exist. Create it or choose "
                                 f"another --output.")
    temps = {key: path.with_name(f".{path.name}.{os.getpid()}.partial") for key, path in paths.items()}
    r = result.report
    try:
        write_caffemodel(temps["caffemodel"], result.net, result.blobs)
        header = (f"# Decomposed by `slim decompose` ({r.method}) from {r.model} and {r.weights}: "
                  f"{len(r.layers)} convolution(s) split, conv+FC MACs per image {r.macs_before:,.0f} -> "
                  f"{r.macs_after:,.0f} ({r.speedup:.2f}x).\n"
                  f"# Report: {paths['report'].name}. Comments of the original are not carried over.\n")
        with atomic_write(temps["prototxt"], "w") as f:
            f.write(header + net_to_text(result.net, opencv=result.opencv))
        r.write(temps["report"])
        for key in ("caffemodel", "prototxt", "report"):
            os.replace(temps[key], paths[key])
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
    return paths
