"""calflop: multiply-accumulates, parameters and activation memory of a net, and its measured speed.

Every figure is computed from the NetGraph alone (no torch): each layer class holds its own cost rule
(``Layer.macs``, multiply-accumulates of one forward of the whole batch), and this module only sums and divides.

Conventions (all figures are **per image**: the batch totals divided by the net's batch size, which is the first
axis of its first input or data top, so a deploy net written for batch 10 reports the cost of one image):

* **conv-only MACs** -- the channel-pruning paper's calflop (He et al. 2017): the sum over Convolution layers of
  ``H_out * W_out * C_out * C_in / group * k_h * k_w``. Deconvolution is counted here too, at the cost of the
  convolution it transposes, ``H_in * W_in * C_in * C_out / group * k_h * k_w`` (each input pixel is multiplied
  into a ``C_out / group x k_h x k_w`` patch of the output). Biases are not counted. (That paper's tool writes
  ``H_in * W_in / stride^2`` for ``H_out * W_out``; the two agree whenever the padding keeps size / stride, as in
  every VGG layer: VGG-16 gives its 15,346,630,656.)
* **conv+FC MACs** -- what most papers report: conv-only plus InnerProduct's ``K * N`` per image (no bias).
* **all-ops MACs** -- every layer's cost rule: conv and FC as above, plus one operation per element for BatchNorm,
  Scale, Bias, element-wise activations, Eltwise (bottoms - 1 per element), ``k_h * k_w`` per output of Pooling,
  Softmax's 3 per score, ``local_size + 2`` per element of LRN, and the loss and accuracy heads. Layers that only
  move or share data (Input and data layers, Split, Concat, Slice, Flatten, Reshape, Crop, Silence, Dropout at TEST)
  cost 0. A layer whose class has no cost rule (``macs()`` returns None) is listed as *uncounted*, by name and
  type, and the all-ops total is then a lower bound.
* **FLOPs = 2 x MACs**, printed beside every MAC figure and labelled as such.
* **Learnable params** -- elements of every blob a layer owns, except BatchNorm's statistics (mean, variance and
  scale factor, whose lr_mult Caffe forces to 0); a blob shared through a ParamSpec name is counted once, at its
  owner. **Stored blob elements** adds the BatchNorm statistics: every element the net holds in its blobs.
* **Activation memory** -- float32 bytes of the tops a layer creates, for one image (a top whose first axis is the
  batch counts ``count(shape[1:])`` elements, any other top, e.g. a scalar loss, its full count). An in-place top
  adds nothing new, and neither do the tops of Split, Flatten and Reshape, whose data Caffe shares with the bottom.
  The total is the sum over layers: Caffe keeps every blob of a forward alive, so this is its run-time footprint.
* **Tied channels** -- channels that several layers write at once (the branches of a residual sum, an Eltwise),
  found by slim.prune.groups from the graph: a channel group with more than one producing Convolution, Deconvolution
  or InnerProduct (a depthwise convolution continues its input's channels and does not count as a second producer).
  Pruning keeps or removes such a channel in every layer at once, so the conv+FC MACs of the layers that write or
  read tied channels say what bounds pruning's speed-up; ``FlopReport.ties`` (TiedChannels) holds them.

Example::

    from slim.flops import calflop, compare
    report = calflop("nets/vgg16_imagenet_deploy.prototxt")
    print(report)                                  # per-layer table and the totals
    report.macs("conv")                            # 15,346,630,656
    comparison = compare(calflop("pruned.prototxt"), report)
    comparison.speedup("conv+fc")                  # baseline MACs / pruned MACs
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from slim import proto as pb
from slim.errors import NetError, SlimError
from slim.graph import NetGraph, build_graph, parse_phase
from slim.layers.base import Shape, count

__all__ = ["CONVENTIONS", "LayerCost", "TiedChannels", "FlopReport", "Change", "Comparison", "Latency", "calflop",
           "compare", "family_mismatch", "measure_latency", "measure_latencies", "format_text", "to_json", "to_csv"]

_log = logging.getLogger(__name__)

#: Convention name -> (the layer cost kinds it sums, or None for every layer; its description).
CONVENTIONS: Dict[str, Tuple[Optional[frozenset], str]] = {
    "conv": (frozenset({"conv"}), "conv-only: Convolution and Deconvolution (the channel-pruning paper's calflop)"),
    "conv+fc": (frozenset({"conv", "fc"}), "conv+FC: Convolution, Deconvolution and InnerProduct (most papers)"),
    "all": (None, "all-ops: every layer's cost rule (BatchNorm, Scale, activations, pooling, eltwise, ...)"),
}

# Tops that Caffe's layers share with their bottom (ShareData), so they allocate no new activation memory.
_ALIASING_TYPES = frozenset({"Split", "Flatten", "Reshape"})
_BYTES_PER_ELEMENT = 4  # float32

Number = Union[int, float]


def _per_image(value: int, batch: int) -> Number:
    # Every cost rule is linear in the batch, so the division is exact; a net whose layers mix the batch axis into
    # others (a Reshape across it) could leave a remainder, and then the figure is a float.
    return value // batch if value % batch == 0 else value / batch


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The cost of one layer.

    Attributes:
        index: position in the net (after NetState filtering).
        name, type: the layer's name and Caffe type.
        kind: its cost bucket: "conv", "fc" or "other".
        top_shapes: shapes of its tops, batch axis included.
        batch_macs: multiply-accumulates for the whole batch, None when the type has no cost rule.
        batch: the net's batch size.
        params: learnable elements in the blobs it owns (BatchNorm statistics excluded).
        blob_elements: every element in the blobs it owns.
        activation_bytes: float32 bytes of the new tops it creates, per image (0 when in place).
        in_place: whether some top rewrites its bottom in place.
    """

    index: int
    name: str
    type: str
    kind: str
    top_shapes: Tuple[Shape, ...]
    batch_macs: Optional[int]
    batch: int
    params: int
    blob_elements: int
    activation_bytes: int
    in_place: bool

    @property
    def counted(self) -> bool:
        """Whether the layer's type has a cost rule."""
        return self.batch_macs is not None

    @property
    def macs(self) -> Optional[Number]:
        """Multiply-accumulates per image (None when uncounted)."""
        return None if self.batch_macs is None else _per_image(self.batch_macs, self.batch)

    @property
    def flops(self) -> Optional[Number]:
        """2 x MACs per image."""
        return None if self.batch_macs is None else 2 * self.macs

    @property
    def output_shape(self) -> str:
        """The tops' shapes as text, e.g. "10x64x224x224" (a 0-axis scalar is "scalar")."""
        return ", ".join("x".join(map(str, s)) if s else "scalar" for s in self.top_shapes) or "-"


@dataclasses.dataclass(frozen=True)
class TiedChannels:
    """How much of a net's conv+FC work lies on channels tied across layers: what bounds pruning's speed-up.

    A channel group (slim.prune.groups) is *tied* when more than one layer writes its channels: the branches of a
    residual sum must keep the same channel indices, so ``slim prune`` keeps or removes a tied channel in all of them
    at once, as one decision ranked by its strongest member under the default ``--tie-rule union`` (its largest
    Scale factor over every branch, under slimming). A layer whose output channels are tied can then shrink only as
    its input channels do, one whose inputs are tied only as its outputs do, and one that reads and writes only
    tied channels not at all while they stay.

    All MAC figures are conv+FC multiply-accumulates per image. A layer whose channels lie partly in tied groups
    counts by the tied fraction of its positions (``writes``: of its outputs; ``reads``: of its inputs; ``both``:
    the product, or the fraction itself for a depthwise convolution, whose outputs are its inputs).

    Attributes:
        groups: the tied channel groups.
        channels: channels in them (each one keep-or-remove decision).
        total_channels: channels of every group of the net.
        pinned: the tied channels that may never be removed (slim.prune.groups says why).
        producers: for each tied group, how many layers write it.
        tied_by: names of the layers that tie them (the Eltwise sums).
        tied_by_types: their types.
        macs: conv+FC MACs of the net.
        writes: MACs of the layers that write tied channels.
        reads: MACs of the layers that read tied channels.
        both: MACs that read and write tied channels.
        layers: (layer name, tied fraction of its outputs, of its inputs) for every conv+FC layer.
    """

    groups: int
    channels: int
    total_channels: int
    pinned: int
    producers: Tuple[int, ...]
    tied_by: Tuple[str, ...]
    tied_by_types: Tuple[str, ...]
    macs: Number
    writes: Number
    reads: Number
    both: Number
    layers: Tuple[Tuple[str, float, float], ...] = dataclasses.field(repr=False, default=())

    @property
    def touching(self) -> Number:
        """MACs of the layers that read or write tied channels."""
        return self.writes + self.reads - self.both

    @property
    def free(self) -> Number:
        """MACs that touch no tied channel: the only ones that fall with the square of the pruned fraction."""
        return self.macs - self.touching

    def share(self, which: str = "writes") -> float:
        """A figure ("writes", "reads", "both", "touching", "free") as a fraction of the conv+FC MACs (0 for none)."""
        value = getattr(self, which)
        return value / self.macs if self.macs else 0.0


def tied_channels(graph: NetGraph, layers: Sequence[LayerCost]) -> Optional[TiedChannels]:
    """The TiedChannels of a net, from its graph and the costs calflop computed for it.

    Returns None when the channel analysis cannot follow the net (it raises a SlimError only for what ``slim prune``
    would refuse too); the rest of the report does not depend on it.
    """
    import numpy as np

    from slim.prune.groups import analyze  # numpy only, no torch: calflop stays as light as before

    try:
        analysis = analyze(graph)
    except SlimError as e:
        _log.debug("calflop: no channel analysis of %s: %s", graph.source, e)
        return None
    producers = [{p for p in group.producers if p in analysis.producers and analysis.producers[p].mode != "depthwise"}
                 for group in analysis.groups]
    tied = np.array([len(p) > 1 for p in producers], bool)
    tied_groups = [g for g in analysis.groups if tied[g.index]]
    ties = []
    for g in tied_groups:
        for t in g.touches:
            if t.verb == "tied by" and (t.layer, t.type) not in ties:
                ties.append((t.layer, t.type))
    writes = reads = both = macs = 0
    fractions = []
    for cost in layers:
        if cost.kind not in ("conv", "fc") or not cost.counted:
            continue
        macs += cost.macs
        info = analysis.producers.get(cost.name)
        if info is None:  # a producer the analysis treats as a barrier (no channels in or out)
            fractions.append((cost.name, 0.0, 0.0))
            continue
        out = float(tied[analysis.group_of[info.outputs]].mean()) if len(info.outputs) else 0.0
        inp = float(tied[analysis.group_of[info.inputs]].mean()) if len(info.inputs) else 0.0
        fractions.append((cost.name, out, inp))
        writes += cost.macs * out
        reads += cost.macs * inp
        both += cost.macs * (out if info.mode == "depthwise" else out * inp)
    return TiedChannels(len(tied_groups), sum(g.size for g in tied_groups), analysis.num_channels,
                        sum(len(g.pinned) for g in tied_groups), tuple(len(producers[g.index]) for g in tied_groups),
                        tuple(name for name, _ in ties), tuple(sorted({t for _, t in ties})), macs, _whole(writes),
                        _whole(reads), _whole(both), tuple(fractions))


def _whole(value: Number) -> Number:
    # A layer lies wholly in tied channels or outside them in every net seen so far, so the sums are whole numbers.
    return int(value) if float(value).is_integer() else value


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """Per-layer costs of a net and their totals under each convention (see the module docstring).

    Attributes:
        name: the net's name.
        source: the file it came from.
        phase: "TRAIN" or "TEST".
        batch: the batch size the figures are divided by.
        layers: one LayerCost per layer, in execution order.
        ties: the conv+FC MACs on channels tied across layers (TiedChannels); None when the channel analysis could
            not follow the net.
    """

    name: str
    source: str
    phase: str
    batch: int
    layers: Tuple[LayerCost, ...]
    ties: Optional[TiedChannels] = dataclasses.field(default=None, repr=False)

    def macs(self, convention: str = "conv+fc") -> Number:
        """Total multiply-accumulates per image under ``convention`` ("conv", "conv+fc" or "all")."""
        kinds = _convention(convention)[0]
        total = sum(l.batch_macs for l in self.layers if l.counted and (kinds is None or l.kind in kinds))
        return _per_image(total, self.batch)

    def flops(self, convention: str = "conv+fc") -> Number:
        """2 x ``macs(convention)``."""
        return 2 * self.macs(convention)

    @property
    def params(self) -> int:
        """Learnable parameters: BatchNorm statistics excluded, shared blobs once."""
        return sum(l.params for l in self.layers)

    @property
    def blob_elements(self) -> int:
        """Every element stored in the net's blobs (BatchNorm statistics included), shared blobs once."""
        return sum(l.blob_elements for l in self.layers)

    @property
    def activation_bytes(self) -> int:
        """float32 bytes of all activations of one image (in-place and shared tops add nothing)."""
        return sum(l.activation_bytes for l in self.layers)

    @property
    def uncounted(self) -> List[LayerCost]:
        """Layers whose type has no cost rule; their MACs are missing from every total."""
        return [l for l in self.layers if not l.counted]

    def share(self, layer: LayerCost) -> Optional[float]:
        """A layer's fraction of the all-ops total (None when it is uncounted or the total is 0)."""
        total = self.macs("all")
        return None if not layer.counted or not total else layer.macs / total

    def __str__(self) -> str:
        return format_text(self)


def _convention(name: str):
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise NetError(f"Unknown MAC convention {name!r}; use one of {', '.join(CONVENTIONS)}.") from None


def _batch_size(graph: NetGraph) -> int:
    """The first axis of the first input or data top (1 when the net has neither)."""
    for node in graph.layers:
        if node.layer.is_data and node.top_shapes and node.top_shapes[0]:
            return max(int(node.top_shapes[0][0]), 1)
    return 1


def _activation_elements(shape: Shape, batch: int) -> int:
    return count(shape, 1) if shape and shape[0] == batch else count(shape)


def calflop(net_or_path: Union[str, Path, "pb.NetParameter", NetGraph], *, phase: Union[str, int] = "TEST",
            allow_unknown_fields: bool = False) -> FlopReport:
    """Count MACs, parameters and activation memory of a net, per layer and in total.

    Args:
        net_or_path: a prototxt path, a NetParameter (upgraded) or a built NetGraph.
        phase: the NetState phase to build (Caffe's default, TEST).
        allow_unknown_fields: when reading a path, skip fields this schema does not know, with a warning.

    Returns:
        The FlopReport; figures are per image (see the module docstring for every convention).

    Raises:
        ParseError: the prototxt cannot be read. NetError: the net cannot be built.
    """
    if isinstance(net_or_path, NetGraph):
        graph = net_or_path
    else:
        graph = build_graph(net_or_path, parse_phase(phase), allow_unknown_fields=allow_unknown_fields)
    batch = _batch_size(graph)
    layers = []
    for node in graph.layers:
        layer = node.layer
        params = blob_elements = 0
        for i, shape in enumerate(node.blob_shapes):
            if node.blob_specs[i].owner is not None:
                continue  # a shared blob is counted at its owner
            blob_elements += count(shape)
            if layer.forced_lr_mult(i) != 0:
                params += count(shape)
        activation = 0
        if node.type not in _ALIASING_TYPES:
            for j, (top, shape) in enumerate(zip(node.tops, node.top_shapes)):
                if not (j < len(node.bottoms) and node.bottoms[j] == top):
                    activation += _activation_elements(shape, batch) * _BYTES_PER_ELEMENT
        macs = layer.macs()
        layers.append(LayerCost(node.index, node.name, node.type, layer.cost_kind, tuple(node.top_shapes),
                                None if macs is None else int(macs), batch, params, blob_elements, activation,
                                node.in_place))
    return FlopReport(graph.name, graph.source, "TRAIN" if graph.phase == pb.TRAIN else "TEST", batch, tuple(layers),
                      tied_channels(graph, layers))


# ---------------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Latency:
    """Forward latency of a net measured on one device.

    Attributes:
        source: the net's file (or name).
        device: where it ran, e.g. "cpu" or "cuda:0".
        threads: torch's intra-op CPU threads during the runs.
        batch: images per forward.
        warmup: untimed runs before the timed ones.
        times: seconds of each timed forward, in order.
    """

    source: str
    device: str
    threads: int
    batch: int
    warmup: int
    times: Tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds per forward of the whole batch."""
        return statistics.median(self.times)

    @property
    def quartiles(self) -> Tuple[float, float]:
        """(first, third) quartile of the seconds per forward; both the median for a single run."""
        if len(self.times) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.times, n=4, method="inclusive")
        return q1, q3

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def per_image(self) -> float:
        """Median seconds per image."""
        return self.median / self.batch

    def __str__(self) -> str:
        q1, q3 = self.quartiles
        return (f"{self.median * 1e3:.3f} ms per batch of {self.batch} (IQR {q1 * 1e3:.3f}-{q3 * 1e3:.3f} ms, "
                f"min {self.min * 1e3:.3f}, max {self.max * 1e3:.3f}; {len(self.times)} runs after {self.warmup} "
                f"warm-up on {self.device}, {self.threads} thread{'s' if self.threads != 1 else ''})")


def measure_latency(net_or_path, *, weights=None, batch: Optional[int] = None, warmup: int = 3, repeats: int = 10,
                    device=None, seed: int = 0, allow_unknown_fields: bool = False) -> Latency:
    """Time the forward pass of a net's deploy form on random input.

    The net is reduced to its deploy form (TEST phase, data layers replaced by an Input, losses and accuracy
    removed: slim.deploy.make_deploy), built with random blobs or ``weights``, and run under ``torch.no_grad``:
    ``warmup`` untimed forwards, then ``repeats`` timed ones (CUDA is synchronised around each).

    Args:
        net_or_path: a prototxt path, a NetParameter or a NetGraph.
        weights: an optional .caffemodel to load by layer name (random blobs time the same).
        batch: images per forward; defaults to the net's own batch size.
        warmup: untimed forwards first.
        repeats: timed forwards (at least 1).
        device: a torch device; defaults to "cuda" when available, else "cpu".
        seed: seeds the blobs and the input.
        allow_unknown_fields: when reading a path, skip unknown fields with a warning.

    Returns:
        The Latency (median, quartiles, min and max of the timed runs).
    """
    return measure_latencies([net_or_path], weights=[weights], batch=batch, warmup=warmup, repeats=repeats,
                             device=device, seed=seed, allow_unknown_fields=allow_unknown_fields)[0]


def measure_latencies(nets: Sequence, *, weights: Optional[Sequence] = None, batch: Optional[int] = None,
                      warmup: int = 3, repeats: int = 10, device=None, seed: int = 0,
                      allow_unknown_fields: bool = False) -> List[Latency]:
    """Time several nets (a pruned net and its baseline) with their runs interleaved.

    Round robin: each round runs every net once, so a slow spell of a shared machine hits all of them alike and
    the ratio of their medians (the measured speed-up) is not skewed by drift. Otherwise as ``measure_latency``;
    ``weights`` gives one .caffemodel or None per net, and ``batch`` (default: the first net's batch size) is
    used for all of them.
    """
    import torch

    if repeats < 1 or warmup < 0:
        raise NetError(f"--repeats must be at least 1 and --warmup at least 0; got {repeats} and {warmup}.")
    if batch is not None and batch < 1:
        raise NetError(f"--batch must be at least 1; got {batch}.")
    weights = list(weights) if weights is not None else [None] * len(nets)
    if len(weights) != len(nets):
        raise NetError(f"measure_latencies got {len(weights)} weights entries for {len(nets)} nets; give one each.")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = []
    for net_or_path, w in zip(nets, weights):
        source, net = _read(net_or_path, allow_unknown_fields)
        if batch is None:
            batch = _batch_size(build_graph(net, pb.TEST, source=source))
        runs.append((source, *_prepare(net, w, batch, device, seed)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: List[List[float]] = [[] for _ in runs]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for k, (_, model, inputs) in enumerate(runs):
                sync()
                start = time.perf_counter()
                model(**inputs)
                sync()
                if i >= warmup:
                    times[k].append(time.perf_counter() - start)
    return [Latency(source, str(device), torch.get_num_threads(), batch, warmup, tuple(t))
            for (source, _, _), t in zip(runs, times)]


def _read(net_or_path, allow_unknown_fields: bool):
    """(source, NetParameter) of a path, NetParameter or NetGraph."""
    if isinstance(net_or_path, NetGraph):
        return net_or_path.source, net_or_path.net
    if isinstance(net_or_path, (str, Path)):
        from slim.io import read_net
        return str(net_or_path), read_net(net_or_path, allow_unknown_fields=allow_unknown_fields)
    return net_or_path.name or "<net>", net_or_path


def _prepare(net, weights, batch: int, device, seed: int):
    """The deploy form of ``net`` as a slim.Net on ``device``, and random inputs for it."""
    import torch

    from slim.deploy import make_deploy
    from slim.net import Net

    model = Net(make_deploy(net, batch=batch), weights=weights, phase="TEST", seed=seed, device=device)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    shapes = {n.tops[j]: s for n in model.graph.layers if n.type == "Input" for j, s in enumerate(n.top_shapes)}
    inputs = {name: torch.randn(shapes[name], generator=generator).to(device) for name in model.inputs}
    return model, inputs


# ---------------------------------------------------------------------------------------------------------------
# Comparison against a baseline
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Change:
    """One figure of a net against its baseline.

    Attributes:
        metric: "params", "blob_elements", "activation_bytes" or "macs:<convention>".
        label: a human name for it.
        value, baseline: the net's and the baseline's figure.
    """

    metric: str
    label: str
    value: Number
    baseline: Number

    @property
    def reduction(self) -> Optional[float]:
        """Percent removed: 100 (1 - value / baseline); None when the baseline is 0."""
        return None if not self.baseline else 100.0 * (1.0 - self.value / self.baseline)

    @property
    def ratio(self) -> Optional[float]:
        """baseline / value: for MACs the theoretical speed-up; None when the value is 0."""
        return None if not self.value else self.baseline / self.value


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A net against a baseline: reductions of params, memory and each MAC total, theoretical and measured speed-up.

    Attributes:
        net, baseline: the two reports.
        changes: params, stored blob elements, activation memory, then MACs per convention.
        latency, baseline_latency: measured forwards, when both were timed.
    """

    net: FlopReport
    baseline: FlopReport
    changes: Tuple[Change, ...]
    latency: Optional[Latency] = None
    baseline_latency: Optional[Latency] = None
    mismatch: Optional[str] = None

    def change(self, metric: str) -> Change:
        """The Change for ``metric`` ("params", "activation_bytes", "macs:conv", ...)."""
        for c in self.changes:
            if c.metric == metric:
                return c
        raise KeyError(f"no metric {metric!r}; the comparison has {', '.join(c.metric for c in self.changes)}")

    def speedup(self, convention: str = "conv+fc") -> Optional[float]:
        """Theoretical speed-up: baseline MACs / net MACs under ``convention``."""
        _convention(convention)
        return self.change(f"macs:{convention}").ratio

    @property
    def measured_speedup(self) -> Optional[float]:
        """Baseline median / net median seconds per image (None unless both were timed)."""
        if self.latency is None or self.baseline_latency is None:
            return None
        if self.latency.batch == self.baseline_latency.batch:
            return self.baseline_latency.median / self.latency.median
        return self.baseline_latency.per_image / self.latency.per_image

    def __str__(self) -> str:
        return "\n".join(_comparison_lines(self))


def compare(report: FlopReport, baseline: FlopReport, *, latency: Optional[Latency] = None,
            baseline_latency: Optional[Latency] = None) -> Comparison:
    """Compare a (pruned) net's report with its baseline's.

    Args:
        report: the net's FlopReport.
        baseline: the baseline's FlopReport.
        latency, baseline_latency: optional measurements of both, for the measured speed-up.

    Returns:
        The Comparison: percent reductions and baseline / net ratios (theoretical speed-ups for MACs). When the
        baseline is not the same architecture (other layers, or other spatial sizes: not what pruning changes),
        ``mismatch`` says how, and a warning is logged: the figures then compare two unrelated nets.
    """
    mismatch = family_mismatch(report, baseline)
    if mismatch:
        _log.warning("%s", mismatch)
    changes = [Change("params", "learnable params", report.params, baseline.params),
               Change("blob_elements", "stored blob elements", report.blob_elements, baseline.blob_elements),
               Change("activation_bytes", "activation bytes / image", report.activation_bytes,
                      baseline.activation_bytes)]
    changes += [Change(f"macs:{name}", _MAC_LABELS[name], report.macs(name), baseline.macs(name))
                for name in CONVENTIONS]
    return Comparison(report, baseline, tuple(changes), latency, baseline_latency, mismatch)


def family_mismatch(report: FlopReport, baseline: FlopReport) -> Optional[str]:
    """Why ``baseline`` is not the net ``report`` was pruned from, or None when it can be.

    Pruning keeps every layer (name and type, in order) and changes channel counts only, so a baseline of the same
    family has the same layers and the same tops on every axis but the batch and the channels.
    """
    ours = [(l.name, l.type) for l in report.layers]
    theirs = [(l.name, l.type) for l in baseline.layers]
    head = f"The baseline {baseline.source} is not the same architecture as {report.source}"
    tail = ("; the reductions compare two different nets. A pruned net keeps every layer of its original and "
            "changes only channel counts: pass the prototxt it was pruned from as --baseline.")
    if ours != theirs:
        mine, other = set(ours), set(theirs)
        only_base = [f"{n} ({t})" for n, t in theirs if (n, t) not in mine]
        only_net = [f"{n} ({t})" for n, t in ours if (n, t) not in other]
        if not only_base and not only_net:
            return f"{head}: the same layers in another order{tail}"
        return (f"{head}: {len(only_base)} of the baseline's {len(theirs)} layers are not in this net"
                f"{_few(only_base)}, and {len(only_net)} of this net's {len(ours)} are not in the baseline"
                f"{_few(only_net)}{tail}")
    for a, b in zip(report.layers, baseline.layers):
        for sa, sb in zip(a.top_shapes, b.top_shapes):
            if len(sa) != len(sb) or tuple(sa[2:]) != tuple(sb[2:]):
                fmt = lambda shape: "x".join(map(str, shape)) or "scalar"
                return (f"{head}: layer {a.name!r} outputs {fmt(sa)} here and {fmt(sb)} in the baseline (another "
                        f"input size or shape){tail}")
    return None


def _few(items: List[str], limit: int = 5) -> str:
    if not items:
        return ""
    return " (" + ", ".join(items[:limit]) + (f", ... {len(items) - limit} more" if len(items) > limit else "") + ")"


# ---------------------------------------------------------------------------------------------------------------
# Output: text, JSON, CSV
# ---------------------------------------------------------------------------------------------------------------

_MAC_LABELS = {"conv": "conv-only MACs", "conv+fc": "conv+FC MACs", "all": "all-ops MACs"}


def _si(value: Optional[Number], unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _int(value: Optional[Number]) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
            for row in rows]


def format_text(report: FlopReport, comparison: Optional[Comparison] = None,
                latency: Optional[Latency] = None) -> str:
    """The human-readable printout: per-layer table, totals per convention, params, memory, uncounted layers, and
    the baseline comparison and measurements when given."""
    lines = [f"calflop: net {report.name or '(unnamed)'} from {report.source}, phase {report.phase}, batch "
             f"{report.batch}; every figure is per image (the batch's totals divided by {report.batch})."]
    rows = [("layer", "type", "output shape", "params", "MACs", "share", "activations")]
    for l in report.layers:
        share = report.share(l)
        rows.append((l.name, l.type, l.output_shape, _int(l.params), _int(l.macs) if l.counted else "uncounted",
                     "-" if share is None else f"{100 * share:.2f}%", _si(l.activation_bytes, "B")))
    lines += _table(rows, (False, False, False, True, True, True, True))
    lines.append("")
    lines.append("Totals per image (FLOPs = 2 x MACs):")
    rows = [(_MAC_LABELS[name], _int(report.macs(name)), f"= {_si(report.macs(name), 'MACs')}",
             f"FLOPs {_si(report.flops(name))}", f"[{CONVENTIONS[name][1]}]") for name in CONVENTIONS]
    lines += ["  " + line for line in _table(rows, (False, True, False, False, False))]
    lines.append(f"Learnable params: {report.params:,} ({_si(report.params)}; BatchNorm statistics excluded, shared "
                 f"blobs once) = {_si(report.params * _BYTES_PER_ELEMENT, 'B')} as float32")
    lines.append(f"Stored blob elements: {report.blob_elements:,} (every blob, BatchNorm statistics included)")
    lines.append(f"Activation memory: {report.activation_bytes:,} bytes = {_si(report.activation_bytes, 'B')} per "
                 f"image (float32 tops each layer creates; in-place, Split, Flatten and Reshape tops add nothing)")
    if report.uncounted:
        names = ", ".join(f"{l.name} ({l.type})" for l in report.uncounted)
        lines.append(f"Uncounted layers (no cost rule; all-ops is a lower bound): {names}")
    else:
        lines.append("Uncounted layers: none")
    lines += _tied_lines(report.ties)
    if comparison is not None:
        lines.append("")
        lines += _comparison_lines(comparison)
    elif latency is not None:
        lines.append("")
        lines.append(f"Measured: {latency}")
        lines.append(f"  = {latency.per_image * 1e3:.3f} ms per image")
    return "\n".join(lines)


def _comparison_lines(c: Comparison) -> List[str]:
    lines = [f"Against baseline {c.baseline.name or '(unnamed)'} from {c.baseline.source} (batch {c.baseline.batch}, "
             f"per image):"]
    if c.mismatch:
        lines.insert(0, f"WARNING: {c.mismatch}")
    rows = [("", "baseline", "this net", "reduction", "speed-up")]
    for ch in c.changes:
        is_macs = ch.metric.startswith("macs:")
        rows.append((ch.label, _int(ch.baseline), _int(ch.value),
                     "-" if ch.reduction is None else f"{ch.reduction:.2f}%",
                     (f"{ch.ratio:.2f}x" if ch.ratio is not None else "-") if is_macs else ""))
    lines += ["  " + line for line in _table(rows, (False, True, True, True, True))]
    if c.latency is not None and c.baseline_latency is not None:
        lines.append(f"Measured, this net: {c.latency}")
        lines.append(f"Measured, baseline: {c.baseline_latency}")
        lines.append(f"Measured speed-up (baseline / net median per image): {c.measured_speedup:.2f}x; theoretical "
                     f"{c.speedup('conv+fc'):.2f}x (conv+FC), {c.speedup('all'):.2f}x (all-ops)")
    lines += _tied_change_lines(c)
    return lines


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _tied_lines(t: Optional[TiedChannels]) -> List[str]:
    """What the tied channels leave to pruning (see TiedChannels); nothing when the analysis could not run."""
    if t is None:
        return []
    if not t.groups:
        return ["Tied channels: none (no channel is written by more than one layer): 0% of the conv+FC MACs are in "
                "tied channels, so pruning can shrink every layer on both its input and its output side."]
    few, most = min(t.producers), max(t.producers)
    writers = f"{few}-{most}" if few != most else f"{most}"
    pinned = f"; {t.pinned:,} of them pinned" if t.pinned else ""
    return [
        f"Tied channels: {t.groups} group{'s' if t.groups != 1 else ''}, {t.channels:,} of the net's "
        f"{t.total_channels:,} channels, each written by {writers} layers at once (tied by {len(t.tied_by)} "
        f"{'/'.join(t.tied_by_types)} layer{'s' if len(t.tied_by) != 1 else ''}){pinned}.",
        f"  {_pct(t.share('writes'))} of the conv+FC MACs are in layers that write tied channels, "
        f"{_pct(t.share('reads'))} in layers that read them ({_pct(t.share('both'))} both); "
        f"{_pct(t.share('free'))} touch free channels only.",
        f"  This bounds pruning's speed-up: slim prune keeps or removes a tied channel in all of its layers at once, "
        f"ranked by its strongest branch",
        f"  (--tie-rule union, the default; under slimming, the largest Scale factor that holds it), so it goes only "
        f"when every branch would remove it.",
        f"  While the tied channels stay, the {_pct(t.share('touching'))} of the MACs that touch them shrink only with "
        f"each layer's free side (in proportion to the kept fraction, not its square)"
        + (f", and the {_pct(t.share('both'))} that read and write only tied channels do not shrink at all." if t.both
           else "."),
    ]


def _tied_change(c: "Comparison") -> Optional[dict]:
    """The tied channels of a net against its baseline's (None when either analysis is missing or neither net has
    tied channels)."""
    t, b = c.net.ties, c.baseline.ties
    if t is None or b is None or not (t.groups or b.groups):
        return None
    ratio = lambda before, after: before / after if after else None
    return {"channels": t.channels, "baseline_channels": b.channels,
            "touching_macs": t.touching, "baseline_touching_macs": b.touching,
            "touching_speedup": ratio(b.touching, t.touching),
            "free_macs": t.free, "baseline_free_macs": b.free, "free_speedup": ratio(b.free, t.free),
            "touching_share": t.share("touching"), "baseline_touching_share": b.share("touching"),
            "writes_share": t.share("writes"), "baseline_writes_share": b.share("writes")}


def _tied_change_lines(c: "Comparison") -> List[str]:
    d = _tied_change(c)
    if d is None:
        return []
    x = lambda r: "-" if r is None else f"{r:.2f}x"
    return [f"Tied channels against the baseline: {d['channels']:,} of {d['baseline_channels']:,} kept; conv+FC MACs "
            f"of the layers touching them {_si(d['baseline_touching_macs'])} -> {_si(d['touching_macs'])} "
            f"({x(d['touching_speedup'])}), of the layers on free channels only {_si(d['baseline_free_macs'])} -> "
            f"{_si(d['free_macs'])} ({x(d['free_speedup'])}).",
            f"  {_pct(d['touching_share'])} of the remaining conv+FC MACs touch tied channels (baseline "
            f"{_pct(d['baseline_touching_share'])}; {_pct(d['writes_share'])} write them, baseline "
            f"{_pct(d['baseline_writes_share'])}): while the tied channels stay whole, these limit the speed-up."]


def _latency_json(latency: Optional[Latency]) -> Optional[dict]:
    if latency is None:
        return None
    q1, q3 = latency.quartiles
    return {"source": latency.source, "device": latency.device, "threads": latency.threads, "batch": latency.batch,
            "warmup": latency.warmup, "repeats": len(latency.times), "median_s": latency.median, "q1_s": q1,
            "q3_s": q3, "min_s": latency.min, "max_s": latency.max, "per_image_s": latency.per_image,
            "times_s": list(latency.times)}


def _tied_json(t: Optional[TiedChannels]) -> Optional[dict]:
    if t is None:
        return None
    return {"groups": t.groups, "channels": t.channels, "total_channels": t.total_channels, "pinned": t.pinned,
            "producers": list(t.producers), "tied_by": list(t.tied_by), "tied_by_types": list(t.tied_by_types),
            "macs": t.macs, "writes_macs": t.writes, "reads_macs": t.reads, "both_macs": t.both,
            "touching_macs": t.touching, "free_macs": t.free,
            "share": {k: t.share(k) for k in ("writes", "reads", "both", "touching", "free")},
            "layers": [{"name": n, "tied_outputs": o, "tied_inputs": i} for n, o, i in t.layers]}


def to_json(report: FlopReport, comparison: Optional[Comparison] = None,
            latency: Optional[Latency] = None) -> dict:
    """Everything in one JSON-ready object: layers, totals per convention, params, memory, uncounted layers, the MACs
    on tied channels, the baseline comparison and the measurement (null when absent). Figures are per image."""
    layers = [{"index": l.index, "name": l.name, "type": l.type, "kind": l.kind,
               "top_shapes": [list(s) for s in l.top_shapes], "params": l.params, "blob_elements": l.blob_elements,
               "macs": l.macs, "flops": l.flops, "share": report.share(l), "activation_bytes": l.activation_bytes,
               "in_place": l.in_place} for l in report.layers]
    out = {
        "net": report.name, "source": report.source, "phase": report.phase, "batch": report.batch,
        "per_image": True,
        "conventions": {name: {"description": CONVENTIONS[name][1], "macs": report.macs(name),
                               "flops": report.flops(name)} for name in CONVENTIONS},
        "params": report.params, "blob_elements": report.blob_elements,
        "activation_bytes": report.activation_bytes,
        "uncounted": [{"name": l.name, "type": l.type} for l in report.uncounted],
        "tied_channels": _tied_json(report.ties),
        "layers": layers,
        "baseline": None,
        "measurement": None,
    }
    if comparison is not None:
        out["baseline"] = {
            "net": comparison.baseline.name, "source": comparison.baseline.source, "batch": comparison.baseline.batch,
            "params": comparison.baseline.params,
            "conventions": {name: {"macs": comparison.baseline.macs(name), "flops": comparison.baseline.flops(name)}
                            for name in CONVENTIONS},
            "changes": [{"metric": ch.metric, "label": ch.label, "value": ch.value, "baseline": ch.baseline,
                         "reduction_percent": ch.reduction, "ratio": ch.ratio} for ch in comparison.changes],
            "speedup": {name: comparison.speedup(name) for name in CONVENTIONS},
            "mismatch": comparison.mismatch,
            "tied_channels": _tied_json(comparison.baseline.ties),
            "tied_change": _tied_change(comparison),
        }
        latency = comparison.latency if latency is None else latency
        if comparison.baseline_latency is not None:
            out["measurement"] = {"net": _latency_json(latency), "baseline": _latency_json(comparison.baseline_latency),
                                  "measured_speedup": comparison.measured_speedup,
                                  "theoretical_speedup": comparison.speedup("conv+fc")}
    if out["measurement"] is None and latency is not None:
        out["measurement"] = {"net": _latency_json(latency), "baseline": None, "measured_speedup": None,
                              "theoretical_speedup": None}
    return out


CSV_COLUMNS = ("kind", "name", "type", "output_shape", "params", "macs", "flops", "share_percent", "activation_bytes",
               "value", "baseline", "reduction_percent", "speedup")


def to_csv(report: FlopReport, comparison: Optional[Comparison] = None, latency: Optional[Latency] = None) -> str:
    """CSV with the columns of ``CSV_COLUMNS``: one "layer" row per layer (macs empty when uncounted), then "total"
    rows (name: macs:<convention>, flops:<convention>, params, blob_elements, activation_bytes, uncounted_layers,
    latency_median_s, measured_speedup) with ``value`` and, against a baseline, ``baseline``, ``reduction_percent``
    and ``speedup``. Figures are per image."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for l in report.layers:
        share = report.share(l)
        writer.writerow({"kind": "layer", "name": l.name, "type": l.type, "output_shape": l.output_shape,
                         "params": l.params, "macs": "" if l.macs is None else l.macs,
                         "flops": "" if l.flops is None else l.flops,
                         "share_percent": "" if share is None else f"{100 * share:.6f}",
                         "activation_bytes": l.activation_bytes})
    changes = {c.metric: c for c in comparison.changes} if comparison is not None else {}

    def total(name, value, metric=None, speedup=False):
        row = {"kind": "total", "name": name, "value": value}
        ch = changes.get(metric or name)
        if ch is not None:
            base = ch.baseline * (2 if name.startswith("flops:") else 1)
            row.update(baseline=base, reduction_percent="" if ch.reduction is None else f"{ch.reduction:.6f}",
                       speedup="" if not speedup or ch.ratio is None else f"{ch.ratio:.6f}")
        writer.writerow(row)

    for name in CONVENTIONS:
        total(f"macs:{name}", report.macs(name), speedup=True)
        total(f"flops:{name}", report.flops(name), metric=f"macs:{name}", speedup=True)
    total("params", report.params)
    total("blob_elements", report.blob_elements)
    total("activation_bytes", report.activation_bytes)
    total("uncounted_layers", len(report.uncounted))
    if comparison is not None:
        latency = comparison.latency if latency is None else latency
    if latency is not None:
        row = {"kind": "total", "name": "latency_median_s", "value": f"{latency.median:.9f}"}
        if comparison is not None and comparison.baseline_latency is not None:
            row["baseline"] = f"{comparison.baseline_latency.median:.9f}"
            row["speedup"] = f"{comparison.measured_speedup:.6f}"
        writer.writerow(row)
    return buf.getvalue()
