"""Per-layer forward and backward timing of a net (Caffe's ``caffe time``).

Forward: each layer is run on its own and timed (with a device synchronisation on CUDA). Backward: a gradient hook on
each layer's first top records when its gradient arrives; a layer's backward time is the interval from that moment
to the next hook firing (the gradient reaching the layer before it), so the per-layer figures add up to the measured
total. Layers that produce no gradient (data, accuracy) show 0.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Dict, List

import torch

from slim.net import Net

__all__ = ["LayerTiming", "TimingReport", "time_net"]


@dataclasses.dataclass
class LayerTiming:
    name: str
    type: str
    forward_ms: float
    backward_ms: float


@dataclasses.dataclass
class TimingReport:
    """Median per-layer times over the timed iterations, and the median totals."""

    layers: List[LayerTiming]
    forward_ms: float
    backward_ms: float
    iterations: int
    device: str

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'type':<20} {'forward ms':>11} {'backward ms':>12}"]
        for t in self.layers:
            lines.append(f"{t.name:<28} {t.type:<20} {t.forward_ms:>11.3f} {t.backward_ms:>12.3f}")
        lines.append(f"Average Forward pass: {self.forward_ms:.3f} ms.")
        lines.append(f"Average Backward pass: {self.backward_ms:.3f} ms.")
        lines.append(f"Average Forward-Backward: {self.forward_ms + self.backward_ms:.3f} ms.")
        lines.append(f"({self.iterations} iterations, medians, on {self.device})")
        return "\n".join(lines)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_net(net: Net, iterations: int = 10, warmup: int = 2, backward: bool = True) -> TimingReport:
    """Time ``net`` layer by layer on its device with random inputs (data layers read their own batches)."""
    device = net.device
    inputs = {}
    for node in net.graph.layers:
        if node.type == "Input":
            for t, s in zip(node.tops, node.top_shapes):
                inputs[t] = torch.randn(s, device=device)
    names = [n.name for n in net.graph.layers]
    fwd: Dict[str, List[float]] = {n: [] for n in names}
    bwd: Dict[str, List[float]] = {n: [] for n in names}
    totals_f, totals_b = [], []
    for it in range(warmup + iterations):
        stamps = []
        values = dict(inputs)
        params = net.params
        loss = None
        t_start = time.perf_counter()
        for node in net.graph.layers:
            _sync(device)
            t0 = time.perf_counter()
            if node.type == "Input":
                tops = [values[t] for t in node.tops]
            elif node.layer.is_data:
                node.layer.device = device
                tops = node.layer.forward([], [])
            else:
                tops = node.layer.forward(params.get(node.name, []), [values[b] for b in node.bottoms])
            _sync(device)
            if it >= warmup:
                fwd[node.name].append((time.perf_counter() - t0) * 1e3)
            for t, v in zip(node.tops, tops):
                values[t] = v
            for j, w in enumerate(node.loss_weights):
                if w:
                    loss = tops[j].sum() * w if loss is None else loss + tops[j].sum() * w
            if backward and tops and tops[0].requires_grad:
                tops[0].register_hook(lambda g, n=node.name: stamps.append((n, time.perf_counter())))
        f_total = (time.perf_counter() - t_start) * 1e3
        b_total = 0.0
        if backward:
            if loss is None:
                outs = [values[o] for o in net.graph.outputs if values[o].requires_grad]
                loss = sum(o.float().sum() for o in outs) if outs else None
            if loss is not None:
                _sync(device)
                t0 = time.perf_counter()
                loss.backward()
                _sync(device)
                end = time.perf_counter()
                b_total = (end - t0) * 1e3
                if it >= warmup:
                    marks = stamps + [("", end)]
                    for (n, a), (_, b) in zip(marks, marks[1:]):
                        bwd[n].append((b - a) * 1e3)
                net.zero_grad(set_to_none=True)
        if it >= warmup:
            totals_f.append(f_total)
            totals_b.append(b_total)
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    layers = [LayerTiming(n.name, n.type, med(fwd[n.name]), med(bwd[n.name])) for n in net.graph.layers]
    return TimingReport(layers, med(totals_f), med(totals_b), iterations, str(device))
