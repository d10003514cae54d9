"""Calibration for reconstruction pruning: the images, the reading layers, and statistics streamed from forward
prefixes.

    source = CalibrationSource.open(net_param, "net.prototxt", Calibration(images=5000))
    for batch_index, inputs in source.batches(): ...      # the same images on every pass, seeded

Each pass over the calibration images runs two nets only as far as it needs (``Net.run_layers`` with ``end``): the
frozen original, whose reading-layer outputs are the targets Y, and the current, partly pruned and reconstructed
net, whose reading-layer inputs are X. At every reading layer, K output positions per image are drawn (seeded) and
the patches under them gathered directly from the padded input (any kernel, stride, pad, dilation and group), so
memory holds one batch and the fixed-size sums X~^T X~, X~^T Y and ||Y||^2 in float64 (slim.prune.lasso), never the
samples. The last images (``holdout``) go into separate sums, on which the reconstruction errors are reported.

Residual sums: when a reading layer's output reaches an Eltwise SUM through per-channel affine layers only
(BatchNorm, Scale, Bias: a residual branch's last convolution), its target is corrected by the error the other
summands already carry, mapped back through the affine layers (He et al. 2017, section 3.3: Y1 + Y2 - Y2'), so the
reconstruction repairs the sum, not only the branch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from slim import proto as pb
from slim.data import DATA_LAYER_TYPES, derive_seed, open_source
from slim.errors import PruneError
from slim.graph import LayerNode, NetGraph, build_graph

__all__ = ["Calibration", "CalibrationSource", "ReaderUnit", "UnitStats", "reader_units", "inputs_only",
           "residual_tail", "StatsPass"]


@dataclasses.dataclass
class Calibration:
    """Where the calibration images come from, how many, and how they are used.

    Attributes:
        images: calibration images (the paper: 5,000 training images).
        samples_per_image: output positions sampled per image at each convolution (the paper: 10).
        seed: seeds the image order, the transforms and the positions.
        net: a train/val net whose TRAIN-phase data layer supplies the images (``--calib-net``); None uses the
            pruned net's own TRAIN-phase data layer.
        holdout: fraction of the images kept out of the fit, for the reported reconstruction errors.
        device: where the forward passes and the statistics run.
        ridge: least-squares Tikhonov term, relative to the mean diagonal of X^T X.
        rank_tol: the released code's tolerance on the kept count (0.1), or None to keep exactly the planned count.
        max_stats_bytes: the largest statistics one reading layer may accumulate (fit and held-out together).
        progress: print a progress line per pass on stderr.
        sources: ``--source LAYER[@PHASE]=PATH`` overrides of the calibration net's data sources (slim.sources);
            the written net keeps its own.
    """

    images: int = 5000
    samples_per_image: int = 10
    seed: int = 0
    net: Optional[Union[str, Path, "pb.NetParameter"]] = None
    holdout: float = 0.1
    device: str = "cpu"
    ridge: float = 1e-6
    rank_tol: Optional[float] = None
    max_stats_bytes: float = 4e9
    progress: bool = True
    sources: Sequence[str] = ()

    def check(self) -> None:
        """Raise PruneError for a value out of range (flag names in messages)."""
        if self.images < 2:
            raise PruneError(f"--calib-images must be at least 2 (one to fit, one held out); got {self.images}.")
        if self.samples_per_image < 1:
            raise PruneError(f"--samples-per-image must be at least 1; got {self.samples_per_image}.")
        if not 0 < self.holdout < 1:
            raise PruneError(f"The held-out fraction must lie in (0, 1); got {self.holdout}.")
        if self.rank_tol is not None and not self.rank_tol >= 0:
            raise PruneError(f"--rank-tol must be a non-negative fraction (the paper's code used 0.1); got "
                             f"{self.rank_tol}.")
        if not self.ridge >= 0:
            raise PruneError(f"The least-squares ridge must be non-negative; got {self.ridge}.")

    @property
    def split(self) -> Tuple[int, int]:
        """(images fitted on, images held out): the last ``holdout`` of them, at least one, are held out."""
        held = max(1, int(round(self.images * self.holdout)))
        return self.images - held, held

    def describe(self) -> Dict[str, object]:
        out = dataclasses.asdict(self)
        out["net"] = None if self.net is None else (str(self.net) if isinstance(self.net, (str, Path)) else
                                                    (self.net.name or "<NetParameter>"))
        out.pop("progress")
        return out


def inputs_only(graph: NetGraph) -> "pb.NetParameter":
    """The analysed net with every data layer replaced by an Input layer of the same tops and shapes: the same
    layers, names and order, without opening any dataset (the calibration images are handed in)."""
    out = pb.NetParameter()
    out.name = graph.name
    for node in graph.layers:
        lp = out.layer.add()
        if node.layer.is_data and node.type != "Input":
            lp.name, lp.type = node.name, "Input"
            lp.top.extend(node.tops)
            for shape in node.top_shapes:
                lp.input_param.shape.add().dim.extend(int(d) for d in shape)
        else:
            lp.CopyFrom(node.param)
            del lp.blobs[:]
            del lp.include[:]
            del lp.exclude[:]
    return out


class CalibrationSource:
    """The calibration images: a TRAIN-phase data layer's batches, the same on every pass.

    Attributes:
        top: the data layer's image top (the blob the pruned net reads).
        shape: one image's shape (C, H, W).
        batch_size: images per batch.
        fit_batches, held_batches: how many batches are fitted on, and held out after them.
        where: names the layer and net in messages.
    """

    def __init__(self, layer: "pb.LayerParameter", where: str, calibration: Calibration):
        self.layer = layer
        self.where = where
        self.calibration = calibration
        self.top = layer.top[0]
        if layer.type == "DummyData":
            from slim.layers.base import layer_class
            self._dummy = layer_class(layer.type, layer.name, where)(layer, [], pb.TRAIN, where)
            shape = self._dummy.top_shapes[0]
            self.source = None
        else:
            self._dummy = None
            self.source = open_source(layer, phase=pb.TRAIN, seed=calibration.seed)
            shape = self.source.top_shapes[0]
        self.batch_size = int(shape[0])
        self.shape = tuple(int(d) for d in shape[1:])
        self.fit_images, self.held_images = calibration.split
        if self.fit_images < 1:
            raise PruneError(f"--calib-images {calibration.images} leaves no image to fit on after holding out "
                             f"{self.held_images}; give more.")

    @classmethod
    def open(cls, net: "pb.NetParameter", source: str, calibration: Calibration) -> "CalibrationSource":
        """The calibration source of ``net`` (the pruned net) or of ``calibration.net`` when given.

        Raises:
            PruneError: the net has no dataset-backed TRAIN-phase data layer (a deploy net without --calib-net).
        """
        flag = None
        if calibration.net is not None:
            from slim.io import read_net
            cnet = calibration.net
            source = str(cnet) if isinstance(cnet, (str, Path)) else (cnet.name or "the calibration net")
            net = read_net(cnet) if isinstance(cnet, (str, Path)) else cnet
            flag = "--calib-net"
        if calibration.sources:
            from slim.sources import override_sources
            net = override_sources(net, calibration.sources, where=source)
        return cls._from_net(net, source, calibration, flag)

    @classmethod
    def _from_net(cls, net, source: str, calibration: Calibration, flag: Optional[str]) -> "CalibrationSource":
        graph = build_graph(net, pb.TRAIN, source=source)
        layers = [n for n in graph.layers if n.type in DATA_LAYER_TYPES and n.type != "MemoryData"]
        if not layers:
            layers = [n for n in graph.layers if n.type == "DummyData"]
        if not layers:
            if flag is None:
                raise PruneError(
                    f"{source} has no data layer in its TRAIN phase (a deploy net reads its data from Input layers), "
                    f"so --criterion lasso has no images to calibrate on. Pass --calib-net with a train/val prototxt "
                    f"whose TRAIN-phase data layer reads the training images (for example the net this one was "
                    f"derived from).")
            raise PruneError(f"{flag} {source} has no data layer (SlimData, Data, ImageData or DummyData) in its "
                             f"TRAIN phase to read calibration images from; give a train/val net.")
        node = layers[0]
        return cls(node.param, f"data layer {node.name!r} of {source}", calibration)

    @property
    def num_batches(self) -> Tuple[int, int]:
        """(fit, held-out) batch counts."""
        b = self.batch_size
        return -(-self.fit_images // b), -(-self.held_images // b)

    def batches(self, device) -> Iterator[Tuple[int, bool, torch.Tensor]]:
        """(batch index, held out?, images) over the calibration set, identical on every call."""
        if self.source is not None:
            self.source.load_state(0, 0)
        elif self._dummy is not None:
            self._dummy.generator = torch.Generator().manual_seed(derive_seed(self.calibration.seed, 0xD0))
        fit_b, held_b = self.num_batches
        index = 0
        for held, count in ((False, self.fit_images), (True, self.held_images)):
            left = count
            while left > 0:
                if self.source is not None:
                    images = self.source.next_batch(device)[0]
                else:
                    images = self._dummy.forward([], [])[0].to(device)
                take = min(left, images.shape[0])
                yield index, held, images[:take]
                left -= take
                index += 1


@dataclasses.dataclass
class ReaderUnit:
    """One least-squares problem: a convolution group of a reading layer, or an InnerProduct.

    Attributes:
        layer: the reading layer's name.
        node: its graph node.
        group: the convolution group (0 for a dense layer).
        rows: its output channels within the layer's weight (a slice of the n outputs).
        columns: channel id of each weight column (D of them).
        bias: the layer has a bias blob (the fit has an intercept).
        kind: "conv" or "fc".
    """

    layer: str
    node: LayerNode
    group: int
    rows: slice
    columns: np.ndarray
    bias: bool
    kind: str

    @property
    def dim(self) -> int:
        return len(self.columns)

    def weight_matrix(self, weight: np.ndarray) -> np.ndarray:
        """This unit's n x D block of the layer's weight blob (Caffe's layout)."""
        if self.kind == "fc":
            w = weight.T if self.node.param.inner_product_param.transpose else weight
            return np.asarray(w[self.rows], np.float64)
        return np.asarray(weight[self.rows], np.float64).reshape(self.rows.stop - self.rows.start, -1)

    def write(self, weight: np.ndarray, bias: Optional[np.ndarray], full: np.ndarray) -> None:
        """Store (D + 1) x n weights (bias row last) into the layer's blobs, in place."""
        D = self.dim
        if self.kind == "fc":
            if self.node.param.inner_product_param.transpose:
                weight[:, self.rows] = full[:D]
            else:
                weight[self.rows] = full[:D].T
        else:
            shape = weight[self.rows].shape
            weight[self.rows] = full[:D].T.reshape(shape)
        if bias is not None:
            bias[self.rows] = full[D]


def reader_units(graph: NetGraph, analysis) -> Tuple[List[ReaderUnit], Dict[str, str]]:
    """The least-squares problems of every layer that reads channels, and the readers that cannot be reconstructed.

    A Convolution (2-D, one bottom) or an InnerProduct over the channel axis reads channels; a depthwise
    convolution does not (its output channel is its input channel: the channel travels through it to the next
    reader, and it is cut like a BatchNorm).

    Returns:
        (units, unsupported): the units in graph order, and layer name -> why it cannot be reconstructed.
    """
    units: List[ReaderUnit] = []
    unsupported: Dict[str, str] = {}
    for name, info in analysis.producers.items():
        node = graph.layers[info.index]
        if info.mode == "depthwise":
            continue
        if any(spec.owner is not None for spec in node.blob_specs) or name in _owners(graph):
            unsupported[name] = "it shares its weights with another layer"
            continue
        if node.type == "InnerProduct":
            k = node.layer.k
            if k % len(info.inputs):
                unsupported[name] = "its input columns do not map to whole channels"
                continue
            columns = np.repeat(info.inputs, k // len(info.inputs))
            units.append(ReaderUnit(name, node, 0, slice(0, node.layer.n), columns,
                                    len(node.blob_shapes) > 1, "fc"))
        elif node.type == "Convolution":
            if node.layer.num_spatial != 2 or len(node.bottoms) != 1:
                unsupported[name] = ("only 2-D convolutions with one bottom are reconstructed"
                                     if len(node.bottoms) == 1 else "it reads several bottoms with one weight")
                continue
            g = node.layer.group
            a = len(info.inputs) // g
            b = node.top_shapes[0][1] // g
            kk = int(np.prod(node.layer.kernel))
            for gi in range(g):
                columns = np.repeat(info.inputs[gi * a:(gi + 1) * a], kk)
                units.append(ReaderUnit(name, node, gi, slice(gi * b, (gi + 1) * b), columns,
                                        len(node.blob_shapes) > 1, "conv"))
        else:
            unsupported[name] = f"a {node.type} layer's inputs are not reconstructed by least squares"
    return units, unsupported


def _owners(graph: NetGraph) -> set:
    return {spec.owner[0] for node in graph.layers for spec in node.blob_specs if spec.owner is not None}


def residual_tail(graph: NetGraph, node: LayerNode):
    """When ``node``'s output reaches an Eltwise SUM through per-channel affine layers only (BatchNorm, Scale, Bias
    with one bottom), the chain and the Eltwise: (chain nodes, eltwise node, the summand's index); else None."""
    chain = []
    blob = node.top_ids[0]
    while True:
        users = graph.consumers.get(blob, [])
        if len(users) != 1 or blob in graph.output_ids:
            return None
        nxt = graph.layers[users[0][0]]
        if nxt.type in ("BatchNorm", "Scale", "Bias") and len(nxt.bottoms) == 1:
            chain.append(nxt)
            blob = nxt.top_ids[0]
            continue
        if nxt.type == "Eltwise" and nxt.param.eltwise_param.operation == pb.EltwiseParameter.SUM \
                and nxt.tops[0] not in nxt.bottoms:
            return chain, nxt, users[0][1]
        return None


class UnitStats:
    """The fit and held-out sums of one ReaderUnit, float64 on the device."""

    def __init__(self, unit: ReaderUnit, n_out: int, device):
        d = unit.dim + 1
        self.unit = unit
        self.A = [torch.zeros(d, d, dtype=torch.float64, device=device) for _ in range(2)]
        self.B = [torch.zeros(d, n_out, dtype=torch.float64, device=device) for _ in range(2)]
        self.yy = [0.0, 0.0]
        self.count = [0, 0]

    def add(self, X: torch.Tensor, Y: torch.Tensor, held: bool) -> None:
        i = int(held)
        Xt = torch.cat([X.to(torch.float64), torch.ones(X.shape[0], 1, dtype=torch.float64, device=X.device)], 1)
        Y = Y.to(torch.float64)
        self.A[i].addmm_(Xt.T, Xt)
        self.B[i].addmm_(Xt.T, Y)
        self.yy[i] += float((Y * Y).sum())
        self.count[i] += X.shape[0]

    def numpy(self, held: bool):
        """(A, B, yy, count) of the fit (False) or held-out (True) samples as numpy float64."""
        i = int(held)
        return self.A[i].cpu().numpy(), self.B[i].cpu().numpy(), self.yy[i], self.count[i]


def _affine(chain: List[LayerNode], params: Dict[str, List[torch.Tensor]], channels: int, device) -> torch.Tensor:
    """The per-channel slope of a chain of per-channel affine layers (f(1) - f(0), channel by channel)."""
    probe = torch.stack([torch.zeros(channels), torch.ones(channels)]).reshape(2, channels, 1, 1).to(device)
    with torch.no_grad():
        for node in chain:
            probe = node.layer.forward(params.get(node.name, []), [probe])[0]
    return (probe[1] - probe[0]).reshape(channels)


class StatsPass:
    """One pass over the calibration images accumulating the statistics of some reader units.

    Args:
        original, current: the frozen original Net and the current Net (the same layers, data tops as Input).
        units: the units to gather.
        calibration: the Calibration settings.
        tag: mixed into the position seed (one value per pass).
    """

    def __init__(self, original, current, units: List[ReaderUnit], calibration: Calibration, tag: int):
        self.original, self.current = original, current
        self.units = units
        self.calibration = calibration
        self.tag = tag
        # Where a pass's time goes (CPU timings; on a GPU without synchronisation they are only indicative): the two
        # forward prefixes alone, the sampling and patch gathering in the visitors, the float64 accumulation.
        self.seconds = {"forward": 0.0, "gather": 0.0, "accumulate": 0.0}
        self.device = current.device
        graph = current.graph
        self.layers = sorted({u.layer for u in units}, key=lambda name: graph.layer(name).index)
        self.tails = {name: residual_tail(graph, graph.layer(name)) for name in self.layers}
        last = max(graph.layer(name).index for name in self.layers)
        for tail in self.tails.values():
            if tail is not None:
                last = max(last, tail[1].index)
        self.end = graph.layers[last].name
        self.stats = {id(u): UnitStats(u, u.rows.stop - u.rows.start, self.device) for u in units}
        self.by_layer: Dict[str, List[ReaderUnit]] = {}
        for u in units:
            self.by_layer.setdefault(u.layer, []).append(u)
        self.slopes = {}
        for name, tail in self.tails.items():
            if tail is not None:
                chain, eltwise, k = tail
                coeff = list(eltwise.param.eltwise_param.coeff) or [1.0] * len(eltwise.bottoms)
                slope = _affine(chain, original.params, graph.layer(name).top_shapes[0][1], self.device) * coeff[k]
                self.slopes[name] = (slope, coeff)

    def _positions(self, node: LayerNode, batch: int, index: int):
        """(image, row, column) of the sampled output positions of one reading layer in one batch."""
        g = torch.Generator().manual_seed(derive_seed(self.calibration.seed, self.tag, index, node.index))
        if self.by_layer[node.name][0].kind == "fc":
            return torch.arange(batch, device=self.device), None, None
        _, _, H, W = node.top_shapes[0]
        k = self.calibration.samples_per_image
        b = torch.arange(batch).repeat_interleave(k)
        r = torch.randint(0, H, (batch * k,), generator=g)
        c = torch.randint(0, W, (batch * k,), generator=g)
        return b.to(self.device), r.to(self.device), c.to(self.device)

    def run(self, images: torch.Tensor, index: int, held: bool, data_tops: Dict[str, Tuple[int, ...]],
            image_top: str) -> None:
        """Accumulate one batch."""
        batch = images.shape[0]
        pos = {}
        targets: Dict[str, torch.Tensor] = {}
        others: Dict[str, torch.Tensor] = {}

        def at(t: torch.Tensor, p):
            b, r, c = p
            return t[b] if r is None else t[b, :, r, c]

        def visit_original(node, values):
            if node.name in self.by_layer:
                pos[node.name] = p = self._positions(node, batch, index)
                targets[node.name] = at(values[node.tops[0]], p)
            for name, tail in self.tails.items():
                if tail is not None and tail[1].name == node.name:
                    others[name] = self._summands(tail, values, pos[name])

        pending: List[Tuple[ReaderUnit, torch.Tensor]] = []

        def visit_current(node, values):
            if node.name in self.by_layer:
                x = values[node.bottoms[0]]
                pending.extend((u, self._inputs(u, x, pos[node.name])) for u in self.by_layer[node.name])
            for name, tail in self.tails.items():
                if tail is not None and tail[1].name == node.name:
                    slope, coeff = self.slopes[name]
                    now = self._summands(tail, values, pos[name])
                    # A channel whose affine slope is 0 (a dead gamma) ignores its input: nothing to correct.
                    inv = torch.where(slope.abs() > 1e-12, 1.0 / slope, torch.zeros_like(slope))
                    targets[name] = targets[name] + (others[name] - now) * inv

        visiting = [0.0]

        def timed(fn):
            def visit(node, values):
                t = time.perf_counter()
                fn(node, values)
                visiting[0] += time.perf_counter() - t
            return visit

        with torch.no_grad():
            t0 = time.perf_counter()
            self.original.run_layers(self._feed(images, data_tops, image_top), self.end, timed(visit_original))
            self.current.run_layers(self._feed(images, data_tops, image_top), self.end, timed(visit_current))
            t1 = time.perf_counter()
            for u, X in pending:
                self.stats[id(u)].add(X, targets[u.layer][:, u.rows], held)
            t2 = time.perf_counter()
        self.seconds["forward"] += t1 - t0 - visiting[0]
        self.seconds["gather"] += visiting[0]
        self.seconds["accumulate"] += t2 - t1

    def _summands(self, tail, values, p) -> torch.Tensor:
        """The weighted sum of the Eltwise's other bottoms at the sampled positions."""
        _, eltwise, k = tail
        coeff = list(eltwise.param.eltwise_param.coeff) or [1.0] * len(eltwise.bottoms)
        total = None
        for j, name in enumerate(eltwise.bottoms):
            if j == k:
                continue
            b, r, c = p
            v = values[name][b] if r is None else values[name][b, :, r, c]
            v = v * coeff[j]
            total = v if total is None else total + v
        return total

    def _inputs(self, u: ReaderUnit, x: torch.Tensor, p) -> torch.Tensor:
        """The unit's input patches at the sampled positions: samples x D, columns in the weight's order."""
        b, r, c = p
        if u.kind == "fc":
            return x[b].reshape(len(b), -1)
        layer = u.node.layer
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel, layer.stride, layer.pad, layer.dilation
        a = x.shape[1] // layer.group
        xg = x[:, u.group * a:(u.group + 1) * a]
        xp = torch.nn.functional.pad(xg, (pw, pw, ph, ph))
        rows = (r * sh)[:, None] + torch.arange(kh, device=x.device)[None] * dh       # S x kh
        cols = (c * sw)[:, None] + torch.arange(kw, device=x.device)[None] * dw       # S x kw
        patches = xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]         # S x kh x kw x a
        return patches.permute(0, 3, 1, 2).reshape(len(b), -1)

    @staticmethod
    def _feed(images, data_tops, image_top) -> Dict[str, torch.Tensor]:
        values = {}
        for top, shape in data_tops.items():
            values[top] = images if top == image_top else torch.zeros((images.shape[0],) + tuple(shape[1:]),
                                                                       device=images.device)
        return values
