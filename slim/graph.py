"""The net as a graph: NetState filtering, blob wiring and shape inference, with Caffe's rules and no torch.

``build_graph`` turns a NetParameter (or a prototxt path) into a NetGraph:

* layers are filtered by the NetState (include/exclude rules: phase, level, stages), as Caffe's FilterNet;
* each layer's ``phase`` is inherited from the net when unset;
* blobs are wired in order: a bottom must name an available blob; a top equal to the bottom at the same index is
  in-place; a top produced twice otherwise is an error; fan-out is implicit (Caffe's Split layers are not
  materialised: a tensor can feed several consumers);
* every layer infers its top shapes from its bottom shapes (the layer classes in slim.layers hold the rules);
* net inputs are the tops of Input layers; net outputs are the blobs still unconsumed after the last layer, in
  alphabetical order (Caffe iterates a std::set), which is the order of the "net output #k" log lines;
* loss weights default to 1 on top 0 of loss layers, 0 elsewhere;
* ParamSpec sharing by name is resolved (owner = first user; STRICT shapes or PERMISSIVE counts).

Every blob version gets a unique id: the blob name for its first producer, ``name@k`` after the k-th in-place
rewrite, so the pruner and calflop can tell ``conv1`` before and after an in-place BatchNorm apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from slim import proto as pb
from slim.errors import NetError
from slim.layers.base import Layer, Shape, count, layer_class

__all__ = ["NetGraph", "LayerNode", "BlobSpec", "build_graph", "filter_net", "state_meets_rule", "make_state",
           "parse_phase"]


def parse_phase(phase: Union[str, int]) -> int:
    """pb.TRAIN / pb.TEST from "TRAIN"/"TEST" (any case) or the enum value."""
    if isinstance(phase, str):
        key = phase.upper()
        if key not in ("TRAIN", "TEST"):
            raise NetError(f"phase must be TRAIN or TEST, found {phase!r}.")
        return pb.TRAIN if key == "TRAIN" else pb.TEST
    if phase not in (pb.TRAIN, pb.TEST):
        raise NetError(f"phase must be TRAIN (0) or TEST (1), found {phase!r}.")
    return int(phase)


def make_state(phase: Union[str, int] = "TEST", level: int = 0, stages: Sequence[str] = (),
               base: Optional["pb.NetState"] = None) -> "pb.NetState":
    """A NetState: ``base`` (e.g. the net's own ``state``) merged with the given phase, level and stages."""
    state = pb.NetState()
    if base is not None:
        state.CopyFrom(base)
    state.phase = parse_phase(phase)
    if level:
        state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


def state_meets_rule(state: "pb.NetState", rule: "pb.NetStateRule") -> bool:
    """Caffe's StateMeetsRule: every part of the rule that is set must hold."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def filter_net(net: "pb.NetParameter", state: "pb.NetState", source: str = "<net>") -> "pb.NetParameter":
    """A copy of ``net`` holding only the layers the state includes (Caffe's Net::FilterNet)."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    if not any(lp.include or lp.exclude for lp in net.layer):
        return out  # every layer runs in every state: the copy is the filtered net
    del out.layer[:]
    for lp in net.layer:
        if lp.include and lp.exclude:
            raise NetError(f"{source}: layer {lp.name!r} has both include and exclude rules; Caffe allows only one "
                           f"kind. Keep either the include or the exclude rules.")
        if lp.include:
            keep = any(state_meets_rule(state, r) for r in lp.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in lp.exclude)
        if keep:
            out.layer.add().CopyFrom(lp)
    return out


@dataclasses.dataclass
class BlobSpec:
    """Learning settings of one of a layer's blobs, resolved from its ParamSpec and the layer type."""

    lr_mult: float
    decay_mult: float
    owner: Optional[Tuple[str, int]] = None   # (layer, index) whose blob this one shares, None if it owns itself

    @property
    def learnable(self) -> bool:
        return self.owner is None and self.lr_mult != 0


@dataclasses.dataclass
class LayerNode:
    """A layer placed in the graph.

    Attributes:
        index: position in the filtered net.
        layer: the Layer instance (parameter, shapes, forward, cost).
        bottoms, tops: blob names as written in the prototxt.
        bottom_ids, top_ids: unique blob-version ids (``name`` or ``name@k`` after in-place rewrites).
        loss_weights: one per top.
        blob_specs: one per Caffe blob: lr_mult, decay_mult and sharing owner.
    """

    index: int
    layer: Layer
    bottoms: List[str]
    tops: List[str]
    bottom_ids: List[str]
    top_ids: List[str]
    loss_weights: List[float]
    blob_specs: List[BlobSpec]

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def type(self) -> str:
        return self.layer.type

    @property
    def param(self):
        return self.layer.param

    @property
    def bottom_shapes(self) -> List[Shape]:
        return self.layer.bottom_shapes

    @property
    def top_shapes(self) -> List[Shape]:
        return self.layer.top_shapes

    @property
    def blob_shapes(self) -> List[Shape]:
        return self.layer.blob_shapes

    @property
    def in_place(self) -> bool:
        return any(i < len(self.bottoms) and self.bottoms[i] == t for i, t in enumerate(self.tops))

    def __repr__(self):
        return f"LayerNode({self.index}: {self.layer!r})"


@dataclasses.dataclass
class NetGraph:
    """A filtered, wired, shape-inferred net. Build it with ``build_graph``.

    Attributes:
        name: the net's name.
        source: the file it came from (for messages).
        phase: pb.TRAIN or pb.TEST.
        net: the filtered NetParameter (layers carry their inherited phase).
        layers: LayerNodes in execution order.
        inputs: tops of Input layers, in order.
        outputs: blob names still unconsumed after the last layer, alphabetical (Caffe's order).
        shapes: blob id -> shape.
        producer: blob id -> (layer index, top index).
        consumers: blob id -> list of (layer index, bottom index).
        output_ids: blob ids of ``outputs``.
    """

    name: str
    source: str
    phase: int
    net: "pb.NetParameter"
    layers: List[LayerNode]
    inputs: List[str]
    outputs: List[str]
    output_ids: List[str]
    shapes: Dict[str, Shape]
    producer: Dict[str, Tuple[int, int]]
    consumers: Dict[str, List[Tuple[int, int]]]

    def layer(self, name: str) -> LayerNode:
        """The node of the layer called ``name`` (NetError if there is none)."""
        for node in self.layers:
            if node.name == name:
                return node
        raise NetError(f"{self.source}: there is no layer named {name!r} in the {_phase_name(self.phase)} net.")

    @property
    def param_count(self) -> int:
        """Learnable parameters: elements of owned blobs whose lr_mult is not forced to 0 (BatchNorm statistics)."""
        total = 0
        for node in self.layers:
            for i, shape in enumerate(node.blob_shapes):
                spec = node.blob_specs[i]
                if spec.owner is None and node.layer.forced_lr_mult(i) != 0:
                    total += count(shape)
        return total

    @property
    def loss_layers(self) -> List[LayerNode]:
        return [n for n in self.layers if any(w != 0 for w in n.loss_weights)]

    def summary(self) -> str:
        """Caffe-style narration of the net: one line per layer with its wiring and top shapes."""
        lines = [f"net {self.name or '(unnamed)'} [{_phase_name(self.phase)}] from {self.source}"]
        for node in self.layers:
            wiring = ", ".join(node.bottoms) or "-"
            tops = ", ".join(f"{t} {'x'.join(map(str, s))}" for t, s in zip(node.tops, node.top_shapes)) or "-"
            lines.append(f"  {node.name:<24} {node.type:<18} {wiring} -> {tops}")
        lines.append(f"  inputs: {', '.join(self.inputs) or '-'}; outputs: {', '.join(self.outputs) or '-'}; "
                     f"learnable params: {self.param_count:,}")
        return "\n".join(lines)


def _phase_name(phase: int) -> str:
    return "TRAIN" if phase == pb.TRAIN else "TEST"


def build_graph(net: Union["pb.NetParameter", str, Path], phase: Union[str, int] = "TEST", *, level: int = 0,
                stages: Sequence[str] = (), source: Optional[str] = None, allow_unknown_fields: bool = False,
                state: Optional["pb.NetState"] = None) -> NetGraph:
    """Filter, wire and shape-infer a net.

    Args:
        net: a NetParameter (already upgraded) or the path of a prototxt.
        phase: "TRAIN" or "TEST" (Caffe's default NetState phase is TEST).
        level, stages: the NetState's level and stages, merged with the net's own ``state``.
        source: the name used in error messages (defaults to the path, or ``<net>``).
        allow_unknown_fields: when reading a path, skip unknown fields with a warning.
        state: a complete NetState to use instead of phase/level/stages (the solver passes train/test states).

    Raises:
        NetError: unknown layer type, unknown bottom, duplicate top, cycle or wrong order, impossible shape.
    """
    if isinstance(net, (str, Path)):
        from slim.io import read_net
        source = source or str(net)
        net = read_net(net, allow_unknown_fields=allow_unknown_fields)
    source = source or "<net>"
    if net.layers:
        raise NetError(f"{source}: the net still has V1 'layers' entries; read it with slim.io.read_net (which "
                       f"upgrades V1 to V2) before building.")
    if state is None:
        state = make_state(phase, level, stages, base=net.state if net.HasField("state") else None)
    filtered = filter_net(net, state, source)
    return _wire(filtered, state.phase, source)


def _wire(net: "pb.NetParameter", phase: int, source: str) -> NetGraph:
    available: Dict[str, str] = {}         # blob name -> current version id, for every blob produced so far
    unconsumed: Dict[str, str] = {}        # Caffe's available_blobs: produced and not consumed since -> outputs
    versions: Dict[str, int] = {}          # blob name -> number of in-place rewrites so far
    shapes: Dict[str, Shape] = {}
    producer: Dict[str, Tuple[int, int]] = {}
    consumers: Dict[str, List[Tuple[int, int]]] = {}
    produced_later = {t: lp.name for lp in reversed(net.layer) for t in lp.top}
    nodes: List[LayerNode] = []
    inputs: List[str] = []
    names = set()
    owners: Dict[str, Tuple[str, int, Shape, BlobSpec]] = {}

    for index, lp in enumerate(net.layer):
        bottoms, tops = list(lp.bottom), list(lp.top)   # read once: each access of a repeated field makes a wrapper
        if not lp.HasField("phase"):
            lp.phase = phase
        if lp.name in names:
            raise NetError(f"{source}: two layers are named {lp.name!r}; layer names must be unique because weights "
                           f"are matched by name. Rename one of them.")
        names.add(lp.name)
        cls = layer_class(lp.type, lp.name, source)
        bottom_ids = []
        for b in bottoms:
            if b not in available:
                later = produced_later.get(b)
                if later is not None and later != lp.name and any(l.name == later for l in net.layer[index + 1:]):
                    raise NetError(f"{source}: layer {lp.name!r} reads blob {b!r}, which is only produced later by "
                                   f"layer {later!r}: the net has a cycle or its layers are out of order. Caffe runs "
                                   f"layers in file order; move {later!r} before {lp.name!r}.")
                raise NetError(f"{source}: layer {lp.name!r} has unknown bottom blob {b!r} (no earlier layer in the "
                               f"{_phase_name(phase)} net produces it). Check the spelling, or the include/exclude "
                               f"rules of the layer that should produce it.")
            bottom_ids.append(available[b])
        bottom_shapes = [shapes[i] for i in bottom_ids]
        layer = cls(lp, bottom_shapes, lp.phase, source)
        if len(layer.top_shapes) != len(tops):
            raise layer.error(f"produced {len(layer.top_shapes)} top shapes for {len(tops)} tops")  # internal
        for j, b in enumerate(bottoms):
            consumers.setdefault(bottom_ids[j], []).append((index, j))
        # Consumed blobs leave the available set (Caffe's AppendBottom), so outputs are what remains at the end.
        for b in bottoms:
            unconsumed.pop(b, None)
        top_ids = []
        for j, t in enumerate(tops):
            in_place = j < len(bottoms) and bottoms[j] == t
            if in_place:
                versions[t] = versions.get(t, 0) + 1
                tid = f"{t}@{versions[t]}"
            else:
                if t in versions or t in shapes:
                    prev = producer.get(t)
                    by = net.layer[prev[0]].name if prev else "an earlier layer"
                    raise NetError(f"{source}: blob {t!r} is produced by layer {lp.name!r} and also by {by!r}. A top "
                                   f"may reuse a name only in place (as the bottom at the same index); rename the top.")
                versions[t] = 0
                tid = t
            shapes[tid] = layer.top_shapes[j]
            producer[tid] = (index, j)
            available[t] = tid
            unconsumed[t] = tid
            top_ids.append(tid)
        if lp.type == "Input":
            inputs.extend(tops)
        loss_weights = _loss_weights(lp, cls, source)
        specs = _blob_specs(layer, owners, source)
        nodes.append(LayerNode(index, layer, bottoms, tops, bottom_ids, top_ids, loss_weights, specs))

    outputs = sorted(unconsumed)
    return NetGraph(net.name, source, phase, net, nodes, inputs, outputs, [unconsumed[o] for o in outputs], shapes,
                    producer, consumers)


def _loss_weights(lp, cls, source: str) -> List[float]:
    n = len(lp.top)
    if lp.loss_weight:
        if len(lp.loss_weight) != n:
            raise NetError(f"{source}: layer {lp.name!r} gives {len(lp.loss_weight)} loss_weight values for {n} tops; "
                           f"give none or exactly one per top.")
        return list(lp.loss_weight)
    if cls.is_loss and n > 1:
        # Caffe's LossLayer adds a single default weight, which then fails the one-per-top check.
        raise NetError(f"{source}: loss layer {lp.name!r} has {n} tops but no loss_weight; Caffe needs one weight per "
                       f"top here, e.g. loss_weight: 1 loss_weight: 0.")
    return [1.0 if (cls.is_loss and j == 0) else 0.0 for j in range(n)]


def _blob_specs(layer: Layer, owners, source: str) -> List[BlobSpec]:
    lp = layer.param
    nblobs = len(layer.blob_shapes)
    if len(lp.param) > nblobs:
        raise NetError(f"{source}: layer {lp.name!r} has {len(lp.param)} param {{}} entries but only {nblobs} blobs; "
                       f"remove the extra param entries.")
    specs = []
    for i, shape in enumerate(layer.blob_shapes):
        ps = lp.param[i] if i < len(lp.param) else None
        lr = ps.lr_mult if ps is not None else 1.0
        decay = ps.decay_mult if ps is not None else 1.0
        forced = layer.forced_lr_mult(i)
        if forced is not None:
            if ps is not None and ps.HasField("lr_mult") and ps.lr_mult != forced:
                raise NetError(f"{source}: layer {lp.name!r} ({layer.type}) blob {i} must have lr_mult {forced:g} (its "
                               f"statistics are not learned by gradient), found {ps.lr_mult:g}. Remove the lr_mult.")
            lr = forced
            if ps is None or not ps.HasField("decay_mult"):
                decay = 0.0
        spec = BlobSpec(lr, decay)
        if ps is not None and ps.name:
            if ps.name in owners:
                oname, oidx, oshape, ospec = owners[ps.name]
                strict = ps.share_mode == pb.ParamSpec.STRICT
                if (strict and tuple(oshape) != tuple(shape)) or count(oshape) != count(shape):
                    mode = "shape" if strict else "element count"
                    raise NetError(f"{source}: layer {lp.name!r} shares param {ps.name!r} with layer {oname!r}, but "
                                   f"its blob {i} {mode} {shape} differs from the owner's {oshape}. Make the shapes "
                                   f"match or use a different param name.")
                # Caffe: the first explicitly set multiplier wins; sharers must agree with an explicit owner value.
                spec = BlobSpec(ospec.lr_mult, ospec.decay_mult, owner=(oname, oidx))
            else:
                owners[ps.name] = (lp.name, i, shape, spec)
        specs.append(spec)
    return specs
