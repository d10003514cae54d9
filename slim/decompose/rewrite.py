"""Decomposition as a rewrite of the net: which convolutions can be split, the layers that replace them in the
prototxt, and folding a 1 x 1 layer back into the layer before it (combineHP).

A decomposed convolution ``conv`` (its bottom, its top and every other layer unchanged) becomes, by method:

    spatial   conv_v (k_h x 1, d filters, no bias) -> conv_h (1 x k_w, n filters, bias)
    channel   conv_c (k_h x k_w, d' filters, no bias) -> conv_p (1 x 1, n filters, bias)
    3c        conv_v (k_h x 1, d) -> conv_h (1 x k_w, d', no bias) -> conv_p (1 x 1, n, bias)

The vertical layer takes the vertical stride, pad and dilation, the horizontal one the horizontal ones, so any
kernel, stride, pad and dilation split exactly; the geometry is written with Caffe's ``kernel_h``/``kernel_w``,
``pad_h``/``pad_w``, ``stride_h``/``stride_w`` (and a two-valued ``dilation`` where one is not 1), which Caffe and
OpenCV read. The vertical layer has no bias: it must output zero where the horizontal layer's padding is, as the
original's zero padding is. The last layer of the chain always has a bias (the data-driven fits' intercept).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from slim import proto as pb
from slim.errors import DecomposeError
from slim.graph import LayerNode, NetGraph

__all__ = ["METHODS", "LayerPlan", "check_layer", "max_rank", "decomposed_net", "fold_mix", "foldable",
           "chain_macs"]

METHODS = ("spatial", "channel", "3c")


@dataclasses.dataclass
class LayerPlan:
    """How one convolution is decomposed.

    Attributes:
        name: the convolution.
        method: "spatial", "channel" or "3c".
        rank: d, the vertical layer's filters (spatial, 3c), or d' for "channel".
        channel_rank: d', the horizontal layer's filters in 3c (None otherwise).
        keep: the output channels the pruning stage keeps (None: not pruned).
        vertical, body, mix: the new layers' names (vertical: "" for "channel"; body: the layer with the
            horizontal or whole kernel; mix: the 1 x 1 layer, "" for "spatial").
    """

    name: str
    method: str
    rank: int
    channel_rank: Optional[int] = None
    keep: Optional[int] = None
    vertical: str = ""
    body: str = ""
    mix: str = ""

    @property
    def layers(self) -> List[str]:
        """The chain's layer names, in order."""
        return [n for n in (self.vertical, self.body, self.mix) if n]

    @property
    def first(self) -> str:
        return self.layers[0]

    @property
    def last(self) -> str:
        """The layer producing the original top (before any fold)."""
        return self.layers[-1]

    @property
    def body_filters(self) -> int:
        """The body layer's filter count before any fold (n for spatial: set by the caller)."""
        return self.channel_rank if self.method == "3c" else self.rank

    def __str__(self) -> str:
        if self.method == "spatial":
            what = f"spatial d={self.rank}"
        elif self.method == "channel":
            what = f"channel d'={self.rank}"
        else:
            what = f"3c d={self.rank} d'={self.channel_rank}"
        return f"{self.name}: {what}" + (f", outputs pruned to {self.keep}" if self.keep is not None else "")


def _conv_layers(graph: NetGraph) -> List[str]:
    return [n.name for n in graph.layers if n.type == "Convolution"]


def check_layer(graph: NetGraph, name: str, method: str, flag: str) -> LayerNode:
    """The node of a convolution that ``method`` can decompose, or a DecomposeError naming ``flag`` and the layer."""
    try:
        node = graph.layer(name)
    except Exception:
        convs = _conv_layers(graph)
        shown = ", ".join(convs[:12]) + (" ..." if len(convs) > 12 else "")
        raise DecomposeError(f"{flag} names layer {name!r}, which is not in {graph.source} (its convolutions: "
                             f"{shown or 'none'}).") from None
    where = f"{flag}: layer {name!r} of {graph.source}"
    if node.type != "Convolution":
        raise DecomposeError(f"{where} is a {node.type} layer; slim decompose splits 2-D Convolution layers with "
                             f"group 1.")
    layer = node.layer
    if layer.num_spatial != 2:
        raise DecomposeError(f"{where} is a {layer.num_spatial}-D convolution; only 2-D convolutions are split.")
    if layer.group != 1:
        raise DecomposeError(f"{where} has group {layer.group}; only group-1 convolutions are split (a grouped or "
                             f"depthwise convolution has no cross-channel matrix to factor).")
    if len(node.bottoms) != 1 or len(node.tops) != 1:
        raise DecomposeError(f"{where} has {len(node.bottoms)} bottoms; only a convolution with one bottom and one "
                             f"top is split.")
    if any(spec.owner is not None for spec in node.blob_specs) or any(
            spec.owner is not None and spec.owner[0] == name for n in graph.layers for spec in n.blob_specs):
        raise DecomposeError(f"{where} shares its weights with another layer (a named param); a split would "
                             f"break the sharing.")
    if method in ("spatial", "3c") and tuple(layer.kernel) == (1, 1):
        raise DecomposeError(f"{where} is a 1x1 convolution: it has no spatial extent to split. Use --method "
                             f"channel for it.")
    return node


def max_rank(node: LayerNode, method: str) -> int:
    """The largest rank of a split: min(c k_h, n k_w) for the spatial split, n for the channel one."""
    layer = node.layer
    n, c = layer.channels_out, layer.channels_in
    kh, kw = layer.kernel
    return min(c * kh, n * kw) if method in ("spatial", "3c") else n


def _names(net: "pb.NetParameter", plans: Sequence[LayerPlan]) -> None:
    """Give each plan's new layers names that no layer of the net has (conv_v, conv_h / conv_c, conv_p)."""
    taken = {lp.name for lp in net.layer}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    for p in plans:
        p.vertical = fresh(f"{p.name}_v") if p.method != "channel" else ""
        p.body = fresh(f"{p.name}_h" if p.method != "channel" else f"{p.name}_c")
        p.mix = fresh(f"{p.name}_p") if p.method != "spatial" else ""


def _conv(template: "pb.LayerParameter", name: str, bottom: str, top: str, filters: int, kernel, stride, pad,
          dilation, bias: bool, weight_spec: bool, bias_spec: Optional["pb.ParamSpec"]) -> "pb.LayerParameter":
    lp = pb.LayerParameter()
    lp.name, lp.type = name, "Convolution"
    lp.bottom.append(bottom)
    lp.top.append(top)
    lp.include.extend(template.include)
    lp.exclude.extend(template.exclude)
    if weight_spec and len(template.param):
        spec = lp.param.add()
        spec.CopyFrom(template.param[0])
        spec.ClearField("name")
    if bias:
        if bias_spec is not None:
            spec = lp.param.add()
            spec.CopyFrom(bias_spec)
            spec.ClearField("name")
        elif len(lp.param):
            lp.param.add()          # a bias needs its own spec once the weight has one (Caffe pairs them by index)
    cp = lp.convolution_param
    cp.CopyFrom(template.convolution_param)
    for field in ("kernel_size", "stride", "pad", "dilation", "kernel_h", "kernel_w", "stride_h", "stride_w",
                  "pad_h", "pad_w"):
        cp.ClearField(field)
    if not bias:
        cp.ClearField("bias_filler")
    cp.num_output = filters
    cp.bias_term = bias
    cp.kernel_h, cp.kernel_w = kernel
    cp.stride_h, cp.stride_w = stride
    cp.pad_h, cp.pad_w = pad
    if tuple(dilation) != (1, 1):
        cp.dilation.extend(dilation)
    return lp


def _chain(template: "pb.LayerParameter", node: LayerNode, plan: LayerPlan) -> List["pb.LayerParameter"]:
    layer = node.layer
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel, layer.stride, layer.pad, layer.dilation
    n = layer.channels_out
    bottom, top = template.bottom[0], template.top[0]
    bias_spec = template.param[1] if len(template.param) > 1 else None
    out = []
    if plan.method == "channel":
        out.append(_conv(template, plan.body, bottom, plan.body, plan.rank, (kh, kw), (sh, sw), (ph, pw),
                         (dh, dw), False, True, None))
    else:
        out.append(_conv(template, plan.vertical, bottom, plan.vertical, plan.rank, (kh, 1), (sh, 1), (ph, 0),
                         (dh, 1), False, True, None))
        if plan.method == "spatial":
            out.append(_conv(template, plan.body, plan.vertical, top, n, (1, kw), (1, sw), (0, pw), (1, dw), True,
                             True, bias_spec))
            return out
        out.append(_conv(template, plan.body, plan.vertical, plan.body, plan.channel_rank, (1, kw), (1, sw),
                         (0, pw), (1, dw), False, True, None))
    out.append(_conv(template, plan.mix, plan.body, top, n, (1, 1), (1, 1), (0, 0), (1, 1), True, True, bias_spec))
    return out


def decomposed_net(net: "pb.NetParameter", graph: NetGraph, plans: Sequence[LayerPlan]) -> "pb.NetParameter":
    """``net`` (every phase) with each planned convolution replaced by its chain (names assigned to the plans).

    Args:
        net: the whole net.
        graph: the analysed phase's graph (the planned layers' geometry).
        plans: the plans; their ``vertical``/``body``/``mix`` names are filled in.
    """
    by_name = {p.name: p for p in plans}
    _names(net, plans)
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        plan = by_name.get(lp.name)
        if plan is None:
            out.layer.add().CopyFrom(lp)
            continue
        for new in _chain(lp, graph.layer(lp.name), plan):
            out.layer.add().CopyFrom(new)
    return out


def with_widths(net: "pb.NetParameter", widths: Mapping[str, int]) -> "pb.NetParameter":
    """A copy of ``net`` with the named convolutions' ``num_output`` set (a planned net's pruned outputs)."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    for lp in out.layer:
        if lp.name in widths:
            lp.convolution_param.num_output = int(widths[lp.name])
    return out


def foldable(graph: NetGraph, plan: LayerPlan) -> bool:
    """combineHP's rule: fold the 1 x 1 layer into the body when the folded layer costs no more MACs than the pair.

    With body fan-in F (its input channels x kernel area), d' body filters and n outputs at one resolution, the
    pair costs F d' + d' n and the folded layer F n per output position. For the paper's 3 x 1 horizontal layer
    with d = d' = m this is its rule 3m >= 2o."""
    if not plan.mix:
        return False
    body, mix = graph.layer(plan.body), graph.layer(plan.mix)
    pair = body.layer.macs() + mix.layer.macs()
    folded = body.layer.macs() * mix.layer.channels_out / body.layer.channels_out
    return folded <= pair


def fold_mix(net: "pb.NetParameter", blobs: Dict[str, List[np.ndarray]], plan: LayerPlan, rename: Optional[str]) \
        -> "pb.NetParameter":
    """Fold the plan's 1 x 1 layer into its body: W = P W_body, b = b_P (+ P b_body); the body takes the 1 x 1
    layer's top, output count and bias spec (and the name ``rename`` when given); ``blobs`` is updated in place."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    mix_lp = next(lp for lp in net.layer if lp.name == plan.mix)
    wb = np.asarray(blobs[plan.body][0], np.float64)
    P = np.asarray(blobs[plan.mix][0], np.float64).reshape(blobs[plan.mix][0].shape[0], -1)
    bias = np.asarray(blobs[plan.mix][1], np.float64) if len(blobs[plan.mix]) > 1 else np.zeros(P.shape[0])
    if len(blobs[plan.body]) > 1:
        bias = bias + P @ np.asarray(blobs[plan.body][1], np.float64)
    weight = (P @ wb.reshape(wb.shape[0], -1)).reshape((P.shape[0],) + wb.shape[1:])
    name = rename or plan.body
    for lp in net.layer:
        if lp.name == plan.mix:
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        if lp.name == plan.body:
            new.name = name
            del new.top[:]
            new.top.extend(mix_lp.top)
            new.convolution_param.num_output = mix_lp.convolution_param.num_output
            new.convolution_param.bias_term = True
            if mix_lp.convolution_param.HasField("bias_filler"):
                new.convolution_param.bias_filler.CopyFrom(mix_lp.convolution_param.bias_filler)
            del new.param[:]
            new.param.extend(mix_lp.param)      # the original's weight and bias specs, as the 1 x 1 layer had them
    del blobs[plan.mix]
    del blobs[plan.body]
    blobs[name] = [weight.astype(np.float32), bias.astype(np.float32)]
    return out


def chain_macs(graph: NetGraph, names: Iterable[str]) -> float:
    """The multiply-accumulates per image of the named layers of ``graph`` (those present)."""
    batch = next((max(1, int(n.top_shapes[0][0])) for n in graph.layers if not n.bottoms and n.top_shapes
                  and n.top_shapes[0]), 1)
    present = {n.name: n for n in graph.layers}
    return sum((present[n].layer.macs() or 0) for n in names if n in present) / batch
