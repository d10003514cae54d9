"""Apply a plan: the rewritten NetParameter, the transplanted blobs, and the masked original they must equal.

* ``rewrite_net`` copies the NetParameter and changes only what channel counts dictate: ``num_output`` of every
  producer, ``group`` of a depthwise convolution (one group per kept input channel), and the ``slice_point`` of a
  Slice on the channel axis. Everything else, layers of other phases included, stays as it was.
* ``transplant`` cuts every channel-indexed blob axis down to its kept positions, by index: convolution weights on
  both axes (within each group for grouped convolutions), biases, BatchNorm mean and variance (its scale factor is
  not per channel), Scale gamma and beta, Bias, PReLU slopes, and InnerProduct columns in C x H x W order.
* ``masked_blobs`` is the reference the pruned net equals: the original with every removed channel silenced. By
  default every parameter that produces it is zeroed (filter and bias of its producers, BatchNorm mean, Scale gamma
  and beta, Bias), so it is zero wherever it is read; for ``--absorb-bias`` only the Scale gamma is zeroed where
  the channel has one (what sparse training approaches), beta still flowing on.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import numpy as np

from slim import proto as pb
from slim.prune.groups import ChannelAnalysis

__all__ = ["rewrite_net", "transplant", "masked_blobs", "kept_positions"]


def kept_positions(channels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices of the positions of a slot whose channel is kept."""
    return np.nonzero(keep[channels])[0]


def rewrite_net(net: "pb.NetParameter", analysis: ChannelAnalysis, keep: np.ndarray) -> "pb.NetParameter":
    """A copy of ``net`` with the channel counts of the plan (``keep``: channel id -> kept).

    Layers are matched by name and type, so a layer repeated in another phase (a TRAIN twin) changes the same way.
    """
    out = pb.NetParameter()
    out.CopyFrom(net)
    graph = analysis.graph
    changes: Dict[str, tuple] = {}  # layer name -> (type, function applying the change)
    for name, info in analysis.producers.items():
        node = graph.layers[info.index]
        n_out = int(keep[info.outputs].sum())
        group = int(keep[info.inputs].sum()) if info.mode == "depthwise" else None
        changes[name] = (node.type, _producer_change(node.type, n_out, group))
    for node in graph.layers:
        if node.type == "Slice" and node.layer.channel_role().kind == "slice":
            counts = [int(keep[analysis.blob_channels[t]].sum()) for t in node.top_ids]
            changes[node.name] = (node.type, _slice_change(counts))
    for layer in out.layer:
        change = changes.get(layer.name)
        if change is not None and change[0] == layer.type:
            change[1](layer)
    return out


def _producer_change(type_name: str, n_out: int, group):
    def apply(layer):
        if type_name == "InnerProduct":
            layer.inner_product_param.num_output = n_out
        else:
            layer.convolution_param.num_output = n_out
            if group is not None:
                layer.convolution_param.group = group
    return apply


def _slice_change(counts: List[int]):
    def apply(layer):
        sp = layer.slice_param
        del sp.slice_point[:]
        sp.slice_point.extend(int(x) for x in np.cumsum(counts)[:-1])
    return apply


def transplant(analysis: ChannelAnalysis, keep: np.ndarray,
               blobs: Mapping[str, Sequence[np.ndarray]]) -> Dict[str, List[np.ndarray]]:
    """The blobs of the pruned net: every channel-indexed axis cut to its kept positions.

    Blobs that lose nothing are passed through as they are (no copy), so a read-only memory map stays one.
    """
    cuts: Dict[tuple, Dict[int, np.ndarray]] = {}    # (layer, blob) -> axis -> kept positions
    for slot in analysis.slots:
        idx = kept_positions(slot.channels, keep)
        if len(idx) < len(slot.channels):
            cuts.setdefault((slot.layer, slot.blob), {})[slot.axis] = idx
    out: Dict[str, List[np.ndarray]] = {}
    for node in analysis.graph.layers:
        if node.name not in blobs or not node.blob_shapes:
            continue
        arrays = list(blobs[node.name])
        for i, array in enumerate(arrays):
            # One np.take per cut axis, the outer axis first: measured 2.5-3x faster than a single np.ix_ gather
            # on conv weights cut on both axes.
            for axis, idx in sorted(cuts.get((node.name, i), {}).items()):
                array = np.take(array, idx, axis=axis)
            arrays[i] = array
        out[node.name] = arrays
    return out


def masked_blobs(analysis: ChannelAnalysis, keep: np.ndarray, blobs: Mapping[str, Sequence[np.ndarray]],
                 gammas_only: bool = False) -> Dict[str, List[np.ndarray]]:
    """The masked original: the original blobs with every removed channel silenced.

    Args:
        analysis: the net's channel analysis.
        keep: channel id -> kept.
        blobs: the original blobs.
        gammas_only: zero only the Scale gamma of a removed channel that has one (beta stays, as after sparse
            training); a removed channel without a Scale is still silenced at its producers.

    Returns:
        layer name -> blobs, copies where something was zeroed.
    """
    removed = ~keep
    has_factor = np.zeros(len(keep), bool)
    if gammas_only:
        for slot in analysis.slots:
            if slot.factor:
                has_factor[slot.channels] = True
    out = {name: list(arrays) for name, arrays in blobs.items()}
    copied = set()
    for slot in analysis.slots:
        if not slot.masked:
            continue
        hit = removed[slot.channels]
        if gammas_only:
            hit &= slot.factor | ~has_factor[slot.channels]
        if not hit.any():
            continue
        key = (slot.layer, slot.blob)
        if key not in copied:
            out[slot.layer][slot.blob] = np.array(out[slot.layer][slot.blob], dtype=np.float32, copy=True)
            copied.add(key)
        array = out[slot.layer][slot.blob]
        index = [slice(None)] * array.ndim
        index[slot.axis] = np.nonzero(hit)[0]
        array[tuple(index)] = 0
    return out
