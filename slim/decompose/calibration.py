"""Calibration samples for the decomposition's fits: the nets run on the calibration images, and each decomposed
layer's input patches and original responses gathered at seeded output positions (slim.decompose.core's passes).

For one layer, a pass runs the frozen original net up to the layer (its pre-activation responses are the targets)
and the current, already decomposed net up to the layer that reads the vertical layer (or the input, for a channel
split), whose input patches under its own geometry are the fit's inputs; the same positions are sampled in both. The
samples are kept (the ReLU relaxation is element-wise), float32 on the device, checked against
``Calibration.max_stats_bytes`` first.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

from slim import proto as pb
from slim.errors import DecomposeError, PruneError
from slim.graph import LayerNode, NetGraph

__all__ = ["Progress", "Images", "Samples", "runnable", "load", "followed_by_relu", "gather", "final_errors"]


class Progress:
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


def runnable(graph: NetGraph, blobs: Mapping[str, Sequence[np.ndarray]], device):
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
    load(net, blobs, net.params.keys())
    net.eval()
    return net


def load(net, blobs: Mapping[str, Sequence[np.ndarray]], names) -> None:
    """Copy the named layers' blobs into the Net's tensors."""
    with torch.no_grad():
        for name in names:
            for t, array in zip(net.params[name], blobs[name]):
                t.copy_(torch.as_tensor(np.asarray(array, np.float32)).reshape(t.shape))


def followed_by_relu(graph: NetGraph, node: LayerNode) -> bool:
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


class Images:
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
        """The data blobs of one batch: the images, and zeros for any other data top (labels)."""
        return {t: images if t == self.top else torch.zeros((images.shape[0],) + tuple(s[1:]), device=images.device)
                for t, s in self.data_tops.items()}


@dataclasses.dataclass
class Samples:
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


def gather(original, current, node: LayerNode, body: LayerNode, images: Images, progress: Progress,
            step: int) -> Samples:
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
    return Samples([x[:f] for x, f in zip(X, filled)], [y[:f] for y, f in zip(Y, filled)])


def _image_outputs(graph: NetGraph, images: Images) -> Dict[str, LayerNode]:
    """The net outputs worth comparing, with their producers: computed from the images alone (no label), by a layer
    that is neither a loss nor an Accuracy (those fix the batch size, and say nothing about the decomposition)."""
    derived = {images.top}
    for node in graph.layers:
        if not node.layer.is_data and node.bottoms and all(b in derived for b in node.bottoms):
            derived.update(node.tops)
    out = {}
    for name, blob in zip(graph.outputs, graph.output_ids):
        node = graph.layers[graph.producer[blob][0]]
        if name in derived and not any(node.loss_weights) and node.type != "Accuracy":
            out[name] = node
    return out


def final_errors(original, final, graph: NetGraph, fgraph: NetGraph, plans, records, kept, images: Images) \
        -> Dict[str, Dict[str, float]]:
    """Each decomposed layer's held-out error in the written net (sampled positions, kept outputs) and the net
    outputs' errors; both nets run only as far as these need."""
    cal = images.calibration
    k = cal.samples_per_image
    sums = {p.name: [0.0, 0.0, 0.0, 0.0] for p in plans}
    last = {records[p.name].layers[-1]: p for p in plans}
    theirs = _image_outputs(graph, images)
    mine = _image_outputs(fgraph, images)
    outs = [o for o in theirs if o in mine and tuple(theirs[o].top_shapes[theirs[o].tops.index(o)])
            == tuple(mine[o].top_shapes[mine[o].tops.index(o)])]
    end_o = max([graph.layer(p.name).index for p in plans] + [theirs[o].index for o in outs])
    end_f = max([fgraph.layer(n).index for n in last] + [mine[o].index for o in outs])
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
            ov = original.run_layers(images.feed(batch), graph.layers[end_o].name, at_original)
            fv = final.run_layers(images.feed(batch), fgraph.layers[end_f].name, at_final)
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


