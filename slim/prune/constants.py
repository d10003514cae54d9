"""Constant folding: what a removed channel still contributed, moved into the bias of the layer that read it.

In the masked original a removed channel no longer depends on the input: it is a constant (0, or f(0) after an
element-wise layer such as Sigmoid, or f(beta) when only gamma was zeroed). Where a reader sees that constant over its
whole window (a Convolution without padding, an InnerProduct) its contribution to output o is
``c * sum(W[o, channel])``, one number per output channel, and adding it to the reader's bias makes the pruned net
equal the masked original exactly. With padding a border output sees only part of the constant, so nothing is folded
there (the group analysis pins such channels when the constant would be non-zero by default).

The constants are found by one forward pass over the graph with one value per channel: NaN where the value
depends on the input (a kept channel, or a removed one before it was silenced). Element-wise layers run their own
``forward`` on a 1 x C x 1 x 1 tensor; a Scale whose gamma is 0 outputs beta whatever came in; a product (Eltwise PROD,
a Scale by a second bottom) with a zero factor is zero whatever the other holds; MAX pooling and AVE pooling without
padding keep a constant; other layers keep only zeros.

Where the folded amount goes: the reader's bias; for a bias-free reader whose only consumer is a BatchNorm, that
BatchNorm's running mean (mean - d normalises the same, and training recomputes batch statistics anyway);
otherwise the reader gets a bias (``bias_term: true``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence

import numpy as np

from slim import proto as pb
from slim.prune.groups import ChannelAnalysis
from slim.prune.rewrite import PrunedBlobs

__all__ = ["FoldResult", "channel_constants", "fold_constants"]


@dataclasses.dataclass
class FoldResult:
    """What folding did.

    Attributes:
        folded: (reader, bottom channel position) pairs whose non-zero constant went into a bias.
        dropped: pairs whose removed channel was not a foldable constant (its contribution is lost until
            fine-tuning); always empty without --absorb-bias.
        biased: readers that were given a bias to hold the folded constants.
    """

    folded: int = 0
    dropped: int = 0
    biased: List[str] = dataclasses.field(default_factory=list)


def channel_constants(analysis: ChannelAnalysis, keep: np.ndarray,
                      blobs: Mapping[str, Sequence[np.ndarray]]) -> Dict[str, np.ndarray]:
    """Blob id -> value of each channel (axis 1) where it is an input-independent constant, NaN elsewhere.

    Args:
        analysis: the net's channel analysis.
        keep: channel id -> kept; only removed channels are followed (kept ones are NaN).
        blobs: the reference blobs (the masked original).
    """
    from slim.layers._lazy import torch

    removed = ~keep
    vals: Dict[str, np.ndarray] = {}
    nan = lambda n: np.full(n, np.nan)
    for node in analysis.graph.layers:
        role = node.layer.channel_role()
        tops = [(t, s) for t, s in zip(node.top_ids, node.top_shapes) if len(s) >= 2]
        ins = [vals.get(b) for b in node.bottom_ids]
        out = None
        if role.kind == "produces" and node.name in analysis.producers:
            out = _producer_constants(node, role, analysis.producers[node.name].outputs, removed, blobs)
        elif role.kind == "passthrough" and ins and ins[0] is not None:
            x = ins[0]
            if role.pointwise:
                out = _evaluate(node, role, [x], blobs, torch)
            elif role.keeps_constants and role.zero_preserving:
                out = x.copy()
            else:
                out = np.where(x == 0, 0.0, np.nan) if role.zero_preserving else nan(len(x))
        elif role.kind == "ties" and ins and all(x is not None for x in ins):
            if role.pointwise:
                out = _evaluate(node, role, ins, blobs, torch)
            else:
                zero = np.all([x == 0 for x in ins], axis=0)
                out = np.where(zero, 0.0, np.nan)
            if role.product:  # 0 times anything, known or not
                out[np.any([x == 0 for x in ins], axis=0)] = 0.0
        elif role.kind == "concat" and all(x is not None for x in ins):
            out = np.concatenate(ins)
        elif role.kind == "slice" and ins[0] is not None:
            start = 0
            for t, s in tops:
                vals[t] = ins[0][start:start + s[1]]
                start += s[1]
            continue
        elif role.kind == "flatten" and ins[0] is not None:
            out = np.repeat(ins[0], role.repeat)
        for t, s in tops:
            vals[t] = out if out is not None and len(out) == s[1] else nan(s[1])
    return vals


def _producer_constants(node, role, outputs: np.ndarray, removed: np.ndarray, blobs) -> np.ndarray:
    """A removed output channel whose filter is all zero outputs its bias (0 without one); others are NaN."""
    cout = len(outputs)
    out = np.full(cout, np.nan)
    pos = np.nonzero(removed[outputs])[0]
    if not len(pos) or node.name not in blobs:
        return out
    arrays = blobs[node.name]
    w_blob, w_axis = role.channel_blobs[0]
    w = np.moveaxis(np.asarray(arrays[w_blob]), w_axis, 0)
    per = w.shape[0]
    zero = np.array([not w[p % per].any() for p in pos.tolist()]) if per != cout else np.array(
        [not w[p].any() for p in pos.tolist()])
    bias = np.zeros(cout)
    if any(b == 1 for b, _ in role.channel_blobs) and len(arrays) > 1:
        bias = np.asarray(arrays[1], np.float64).reshape(-1)
    out[pos[zero]] = bias[pos[zero]]
    return out


def _evaluate(node, role, xs: List[np.ndarray], blobs, torch) -> np.ndarray:
    """Run a pointwise layer's forward on one value per channel; NaN where an input was NaN (Scale gamma 0 aside)."""
    # Each bottom keeps its own number of axes: a Scale by a second bottom reads (N, C) weights (a flattened
    # squeeze-and-excitation) against an (N, C, H, W) map, and the two must line up as they do in the net.
    tensors = [torch.from_numpy(np.nan_to_num(x, nan=0.0)).reshape((1, len(x)) + (1,) * (len(shape) - 2))
               for x, shape in zip(xs, node.bottom_shapes)]
    params = [torch.from_numpy(np.array(b, np.float64)) for b in blobs.get(node.name, [])]
    with torch.no_grad():
        y = node.layer.forward(params, tensors)[0].reshape(-1).numpy().astype(np.float64)
    unknown = np.any([np.isnan(x) for x in xs], axis=0)
    if role.factor is not None and params:
        gamma = np.asarray(blobs[node.name][role.factor], np.float64).reshape(-1)
        if len(gamma) == len(unknown):
            unknown &= gamma != 0  # x * 0 + beta: the input does not matter
    y[unknown] = np.nan
    return y


def fold_constants(analysis: ChannelAnalysis, keep: np.ndarray, reference: Mapping[str, Sequence[np.ndarray]],
                   pruned_net: "pb.NetParameter", pruned: PrunedBlobs,
                   everywhere: bool) -> FoldResult:
    """Fold the constants of removed channels into the biases of the pruned net (in place).

    Args:
        analysis: the original net's channel analysis.
        keep: channel id -> kept.
        reference: the masked original's blobs (the values the pruned net must reproduce).
        pruned_net: the rewritten NetParameter (a reader may get ``bias_term: true``).
        pruned: the transplanted blobs, changed in place (only the biases and BatchNorm means written to).
        everywhere: fold at every reader (--absorb-bias); otherwise only where the analysis found a constant.
    """
    result = FoldResult()
    removed = ~keep
    if not everywhere and not analysis.constant_at:
        return result
    vals = channel_constants(analysis, keep, reference)
    graph = analysis.graph
    for name, info in analysis.producers.items():
        node = graph.layers[info.index]
        if len(node.bottom_ids) != 1:
            continue
        b_id = node.bottom_ids[0]
        if not everywhere and (name, b_id) not in analysis.constant_at:
            continue
        channels = analysis.blob_channels[b_id]
        gone = removed[channels]
        if info.mode == "depthwise" or not gone.any():
            continue  # a depthwise layer loses the outputs of a removed input too: nothing is left to fold into
        c = vals.get(b_id, np.full(len(channels), np.nan))
        nonzero = gone & (c != 0)
        foldable = nonzero & np.isfinite(c) & info.absorbs
        result.dropped += int((nonzero & ~foldable).sum())
        if not foldable.any():
            continue
        d = _contribution(node, info, reference[name], np.nonzero(foldable)[0], c)
        kept_out = np.nonzero(keep[info.outputs])[0]
        _add_to_bias(analysis, node, pruned_net, pruned, d[kept_out], result)
        result.folded += int(foldable.sum())
    return result


def _contribution(node, info, arrays, positions: np.ndarray, c: np.ndarray) -> np.ndarray:
    """d[o] = sum over removed input positions p of c[p] * (sum of the weights joining p to o)."""
    role = node.layer.channel_role()
    w_blob, in_axis = role.input_blobs[0]
    out_blob, out_axis = role.channel_blobs[0]
    w = np.asarray(arrays[w_blob], np.float64)
    cout = len(info.outputs)
    d = np.zeros(cout)
    if node.type == "InnerProduct":
        wk = w if out_axis == 0 else w.T                  # (N, K)
        r = wk.shape[1] // len(info.inputs)
        for p in positions.tolist():
            d += c[p] * wk[:, p * r:(p + 1) * r].sum(1)
        return d
    # Convolution (Deconvolution never absorbs): weight (C_out, C_in / group, *k).
    g = info.group
    a, b = w.shape[1], cout // g
    summed = w.reshape(w.shape[0], a, -1).sum(2)          # (C_out, a)
    for p in positions.tolist():
        gi, j = divmod(p, a)
        d[gi * b:(gi + 1) * b] += c[p] * summed[gi * b:(gi + 1) * b, j]
    return d


def _add_to_bias(analysis, node, net, pruned: PrunedBlobs, d: np.ndarray, result: FoldResult) -> None:
    role = node.layer.channel_role()
    if any(b == 1 for b, _ in role.channel_blobs):
        bias = pruned.blob(node.name, 1)
        pruned.set_blob(node.name, 1, (np.asarray(bias, np.float64) + d.reshape(np.shape(bias))).astype(np.float32))
        return
    graph = analysis.graph
    users = graph.consumers.get(node.top_ids[0], [])
    if len(node.top_ids) == 1 and len(users) == 1 and node.top_ids[0] not in graph.output_ids:
        bn = graph.layers[users[0][0]]
        if bn.type == "BatchNorm" and bn.layer.use_global_stats and bn.name in pruned:
            s = float(np.asarray(pruned.blob(bn.name, 2)).reshape(-1)[0])
            if s != 0:
                # The pruned reader outputs x - d; Caffe stores mean * s, and (x - d) - (mean - d) = x - mean.
                mean = np.asarray(pruned.blob(bn.name, 0), np.float64)
                pruned.set_blob(bn.name, 0, (mean - d * s).astype(np.float32))
                return
    for layer in net.layer:
        if layer.name == node.name and layer.type == node.type:
            param = layer.inner_product_param if node.type == "InnerProduct" else layer.convolution_param
            param.bias_term = True
    pruned.set_blob(node.name, len(pruned.shapes(node.name)), d.astype(np.float32))
    result.biased.append(node.name)
