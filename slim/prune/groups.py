"""Channel groups, from the graph alone: which channel slots must keep the same indices.

Every layer class declares its ``channel_role`` (slim.layers.base.ChannelRole); this module walks the NetGraph once,
in execution order, and follows channels through the roles:

* a producer (Convolution, Deconvolution, InnerProduct) creates one fresh *atom* per output channel; a barrier and a
  data layer create atoms too, pinned (they may not be removed);
* a passthrough layer hands its bottom's atoms to its tops; a flatten repeats each atom over the values it became;
* ``ties`` (Eltwise) unites its bottoms' atoms position by position (union-find), so the branches of a residual sum
  keep or lose a channel together;
* a Concat on the channel axis lays its bottoms' atoms side by side (a consumer then reads several groups at their
  offsets); a Slice cuts them into ranges;
* a grouped convolution: with one input channel per group (depthwise) output channel ``o`` *is* input channel
  ``o // (C_out / group)``, so the group itself is removed; with several, its input and output channels stay free,
  but every group must keep as many as the others (``group`` stays, each group reads its own kept inputs): an
  EqualCounts constraint the plan meets by keeping back the best removed channels of the groups that lost more. (A
  grouped Deconvolution, whose output axis is per group in its weight, still ties the j-th channel of every group);
* a Power with scale 0 (the zero channels of an option-A shortcut) is element-wise like any other: its channel i is
  its bottom's channel i, so the Concat ``[x, 0 * x]`` holds each channel of ``x`` twice and a removal takes both.

Every blob also lies on a *chain*: a run of per-channel layers with no fan-out, begun by a producer (a depthwise
convolution continues its input's chain), a tie, a concatenation or a blob read by several layers. Along one chain
a channel's factors multiply (MobileNet's expand Scale, depthwise convolution and its Scale), so a zero anywhere on
it kills the channel; the criteria combine a channel's members on one chain by their minimum (slim.prune.importance).

Atoms united by ties are one *channel*: one keep-or-remove decision. A ChannelGroup is a set of channels created
together (one producer's outputs, merged with every producer they were tied to); each slot of a layer blob maps its
positions to channels, so one channel may own several positions of a slot (repeats, multiplicity).

A channel is *pinned* (never removed) when it reaches a barrier or a net output, comes from data, belongs to a layer
that shares its parameters or a layer named by ``--protect``, or when removing it would not be exact: a removed
channel is silenced in the "masked original" by zeroing its producing filter, bias, BatchNorm mean and Scale gamma
and beta, and must then be zero wherever a layer reads it. An element-wise layer with f(0) != 0 (Sigmoid, BNLL,
Exp, a Power with a shift) turns the silenced channel into a constant; that constant can be folded into the
reader's bias only where every output of the reader sees all of it (a Convolution without padding, InnerProduct)
and nothing in between reshaped it (AVE pooling with padding); otherwise the channel is pinned. A product (Eltwise
PROD, a Scale by a second bottom) of a silenced channel is zero again whatever its other factor holds: HardSwish's
``x * hardsigmoid(x)`` and squeeze-and-excitation's ``x * sigmoid(...)`` gate a silenced channel by 0.5, and
the padded convolutions after them still read zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from slim.errors import PruneError
from slim.graph import NetGraph
from slim.layers.base import ChannelRole, count

__all__ = ["BlobSlot", "GroupSlot", "EqualCounts", "ProducerInfo", "ChannelGroup", "ChannelAnalysis", "analyze"]

# Whether a removed (silenced) channel is zero where it is read: structural, from the roles alone.
_ZERO, _CONSTANT, _FIELD = 0, 1, 2


@dataclasses.dataclass
class BlobSlot:
    """An axis of one of a layer's blobs whose positions are channels.

    Attributes:
        layer: the layer name.
        type: its type.
        blob: the blob index (Caffe's order).
        axis: the axis of that blob.
        side: "output" (a producer's filters and bias), "input" (a producer's weights by bottom channel) or
            "param" (per-channel parameters of a passthrough layer: BatchNorm statistics, Scale gamma, ...).
        channels: the channel id of each position along the axis; with ``groups`` > 1, of each position in each
            group's rows: position j read by the rows of group gi is ``channels[gi * n + j]`` (n the axis length).
        masked: zeroed to silence a removed channel in the masked original.
        factor: holds network slimming's scaling factor (Scale's gamma).
        groups: 1, or the convolution group count of a grouped convolution's input axis (see ``channels``).
        chain: the chain of the layer's top (see the module docstring) for output and param slots, -1 for inputs.
    """

    layer: str
    type: str
    blob: int
    axis: int
    side: str
    channels: np.ndarray
    masked: bool = False
    factor: bool = False
    groups: int = 1
    chain: int = -1


@dataclasses.dataclass
class EqualCounts:
    """Channels split into ``parts`` equal runs that must each keep as many: a grouped convolution's inputs or
    outputs (``group`` cannot change, and every group has the same width).

    Attributes:
        layer: the grouped convolution.
        side: "input" or "output".
        channels: the channel id of each position (of the bottom or top axis 1), in order.
        parts: the group count.
    """

    layer: str
    side: str
    channels: np.ndarray
    parts: int


@dataclasses.dataclass
class GroupSlot:
    """The part of a BlobSlot that belongs to one group: ``positions`` along the axis and their group channels
    (for a grouped convolution's input slot, positions into its ``channels``: see BlobSlot)."""

    slot: BlobSlot
    positions: np.ndarray
    local: np.ndarray


@dataclasses.dataclass
class ProducerInfo:
    """What the rewrite needs about a producer: its channels in and out, and how its ``group`` follows them.

    Attributes:
        layer: the layer name.
        index: its index in the graph.
        mode: "dense" (group 1), "depthwise" (one input channel per group: the group count follows the kept input
            channels), "grouped" (several per group: every group keeps as many, group unchanged) or "positional"
            (a grouped Deconvolution: every group keeps the same positions).
        group: the convolution group.
        inputs: channel ids of bottom 0 along axis 1.
        outputs: channel ids of top 0 along axis 1.
        absorbs: a constant input channel can be folded into a bias (ChannelRole.absorbs_constants).
    """

    layer: str
    index: int
    mode: str
    group: int
    inputs: np.ndarray
    outputs: np.ndarray
    absorbs: bool


@dataclasses.dataclass
class _Touch:
    layer: str
    type: str
    verb: str
    positions: int
    total: int
    offset: Optional[int]


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are created together and travel together; each is kept or removed as one.

    Example (the residual stream of nets/resnet20_cifar10, from ``slim prune --explain``, shortened): 16 channels,
    held twice by the 32-channel stream of the second stage and four times by the 64-channel third stage::

        group 1: 16 channels (prunable)
          produced by     conv1 (Convolution), res2_1/conv2 (Convolution), res2_2/conv2 (Convolution), ... 7 more
          normalised by   conv1/bn (BatchNorm), res2_1/conv2/bn (BatchNorm), ...
          scaled by       conv1/scale (Scale), res2_1/conv2/scale (Scale), ...
          carried by      conv1/relu (ReLU), res2_1/relu (ReLU), res2_2/relu (ReLU), ... 12 more
          tied by         res2_1 (Eltwise), res2_2 (Eltwise), ...
          concatenated by res3_1/shortcut (Concat) [0:16 of 32], res3_1/shortcut (Concat) [16:32 of 32], ...
          read by         res2_1/conv1 (Convolution) [0:16 of 16], ..., res3_2/conv1 (Convolution) [0:32 of 32], ...

    Attributes:
        index: the group's number, in order of creation.
        channels: the global channel ids of the group, in order (local channel i is ``channels[i]``).
        slots: every blob axis position of the group, with its local channel.
        pinned: local channel -> why it may not be removed.
        touches: the layers that produce, carry, tie, read or pin the group (for the printout).
    """

    index: int
    channels: np.ndarray
    slots: List[GroupSlot]
    pinned: Dict[int, str]
    touches: List[_Touch] = dataclasses.field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Number of channels (independent keep-or-remove decisions)."""
        return len(self.channels)

    @property
    def prunable(self) -> int:
        """Channels that are not pinned."""
        return self.size - len(self.pinned)

    @property
    def layers(self) -> List[str]:
        """Names of the layers whose blobs or tops hold the group's channels, in graph order."""
        seen = []
        for t in self.touches:
            if t.layer not in seen:
                seen.append(t.layer)
        return seen

    @property
    def producers(self) -> List[str]:
        """Names of the layers that create the group's channels."""
        return [t.layer for t in self.touches if t.verb == "produced by"]

    def __str__(self) -> str:
        status = "all pinned" if self.prunable == 0 else (
            f"{self.prunable} prunable" if self.pinned else "prunable")
        lines = [f"group {self.index}: {self.size} channel{'s' if self.size != 1 else ''} ({status})"]
        order = ["produced by", "normalised by", "scaled by", "shifted by", "weighted by", "carried by", "tied by",
                 "concatenated by", "sliced by", "flattened by", "read by", "grouped by", "pinned by"]
        for verb in order:
            items = []
            for t in self.touches:
                if t.verb != verb:
                    continue
                where = ""
                if verb in ("read by", "concatenated by", "flattened by") and t.offset is not None:
                    where = f" [{t.offset}:{t.offset + t.positions}" + (f" of {t.total}]" if t.total else "]")
                elif verb == "grouped by":
                    where = f" [as many kept in each of its {t.total} groups]"
                items.append(f"{t.layer} ({t.type}){where}")
            if verb == "carried by" and len(items) > 4:
                items = items[:3] + [f"... {len(items) - 3} more"]
            if items:
                shown = items if len(items) <= 8 else items[:7] + [f"... {len(items) - 7} more"]
                lines.extend(_wrap(shown, f"  {verb:<15} ", 118))
        if self.pinned:
            reasons: Dict[str, int] = {}
            for reason in self.pinned.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            for reason, n in reasons.items():
                lines.append(f"  {'pinned':<15} {n} channel{'s' if n != 1 else ''}: {reason}")
        return "\n".join(lines)


def _wrap(items: List[str], head: str, width: int) -> List[str]:
    """Comma-separated items on lines of at most ``width`` characters, never splitting an item."""
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and len(line) + 1 + len(piece) > width and line != head:
            lines.append(line.rstrip())
            line = " " * len(head)
        line += piece + " "
    lines.append(line.rstrip())
    return lines


@dataclasses.dataclass
class ChannelAnalysis:
    """The channel structure of a net: groups, and every slot that holds their channels.

    Attributes:
        graph: the analysed NetGraph.
        groups: the ChannelGroups, in order of creation.
        group_of: channel id -> group index.
        local_of: channel id -> index within its group.
        pinned: channel id -> bool.
        blob_channels: blob version id -> channel ids along its axis 1 (blobs with at least two axes).
        slots: every channel-indexed blob axis.
        producers: producer layer name -> ProducerInfo.
        constant_at: (reader layer, bottom id) pairs where a removed channel arrives as a foldable constant
            (after an f(0) != 0 element-wise layer): bottom positions mask.
        equal_counts: the EqualCounts constraints of grouped convolutions.
    """

    graph: NetGraph
    groups: List[ChannelGroup]
    group_of: np.ndarray
    local_of: np.ndarray
    pinned: np.ndarray
    blob_channels: Dict[str, np.ndarray]
    slots: List[BlobSlot]
    producers: Dict[str, ProducerInfo]
    constant_at: Dict[Tuple[str, str], np.ndarray]
    equal_counts: List[EqualCounts] = dataclasses.field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return len(self.group_of)

    def slots_of(self, layer: str) -> List[BlobSlot]:
        """The channel-indexed blob axes of a layer."""
        return [s for s in self.slots if s.layer == layer]

    def group_of_layer(self, layer: str) -> List[ChannelGroup]:
        """The groups holding the channels of a layer's tops (a Concat's top spans several)."""
        node = self.graph.layer(layer)
        ids = [self.blob_channels[t] for t in node.top_ids if t in self.blob_channels]
        found = sorted({int(g) for arr in ids for g in self.group_of[arr]})
        return [self.groups[g] for g in found]

    def explain(self) -> str:
        """Every group's printout, after a one-line summary."""
        prunable = int((~self.pinned).sum())
        head = (f"net {self.graph.name or '(unnamed)'} from {self.graph.source}: {len(self.groups)} channel groups, "
                f"{self.num_channels} channels, {prunable} prunable")
        return "\n".join([head] + [str(g) for g in self.groups])


class _UnionFind:
    """Union-find over atom ids, resolved at the end in bulk; the root of a set is its smallest atom (so channel ids
    follow creation order). Ties are recorded as arrays of pairs while the graph is walked."""

    def __init__(self):
        self.size = 0
        self.pairs: List[Tuple[np.ndarray, np.ndarray]] = []

    def add(self, n: int) -> np.ndarray:
        start = self.size
        self.size += n
        return np.arange(start, start + n, dtype=np.int64)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        differ = a != b
        if differ.any():
            self.pairs.append((a[differ], b[differ]))

    def roots(self) -> np.ndarray:
        """The root (smallest member) of every atom's set."""
        return _components(self.size, self.pairs)


def _components(n: int, pairs: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected components of n nodes joined by the pairs: each node's smallest component member.

    Hook-and-compress: hook the larger root of every joined pair under the smaller, then shorten every path to its
    root, until no pair spans two roots. Labels only decrease, so the smallest member stays a root.
    """
    labels = np.arange(n, dtype=np.int64)
    if not pairs:
        return labels
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    while True:
        ra, rb = labels[a], labels[b]
        split = ra != rb
        if not split.any():
            return labels
        lo, hi = np.minimum(ra[split], rb[split]), np.maximum(ra[split], rb[split])
        np.minimum.at(labels, hi, lo)
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


class _Walker:
    """One pass over the graph, building atoms, slots, pins and the silenced-channel state of every blob."""

    def __init__(self, graph: NetGraph):
        self.graph = graph
        self.uf = _UnionFind()
        self.atoms: Dict[str, np.ndarray] = {}      # blob id -> atom ids along axis 1
        self.chain: Dict[str, int] = {}             # blob id -> its chain
        self.state: Dict[str, np.ndarray] = {}      # blob id -> _ZERO / _CONSTANT / _FIELD per position
        self.dirtied_by: Dict[str, str] = {}        # blob id -> the f(0) != 0 layer that made it non-zero
        self.slots: List[Tuple[BlobSlot, np.ndarray]] = []   # slot (channels filled later) and its atoms
        self.pins: List[Tuple[np.ndarray, str]] = []
        self.touches: List[Tuple[_Touch, np.ndarray]] = []
        self.producers: List[Tuple[ProducerInfo, np.ndarray, np.ndarray]] = []
        self.constant_at: List[Tuple[str, str, np.ndarray]] = []
        self.equal_counts: List[Tuple[EqualCounts, np.ndarray]] = []   # constraint (channels filled later), atoms
        self.alloc_starts: List[int] = []           # first atom of each fresh allocation
        self.chains = 0

    # -- helpers -------------------------------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        atoms = self.uf.add(n)
        self.alloc_starts.append(int(atoms[0]))
        return atoms

    def set_top(self, blob_id: str, shape, atoms: np.ndarray, state: Optional[np.ndarray] = None,
                chain: Optional[int] = None) -> None:
        if len(shape) < 2:
            return
        assert len(atoms) == shape[1], (blob_id, len(atoms), shape)
        self.atoms[blob_id] = atoms
        self.chain[blob_id] = chain if chain is not None else self.new_chain()
        self.state[blob_id] = np.zeros(len(atoms), np.uint8) if state is None else state

    def new_chain(self) -> int:
        self.chains += 1
        return self.chains - 1

    def chain_after(self, node, blob_id: str) -> int:
        """The chain of ``node``'s tops: its bottom's, when ``node`` is that blob's only reader."""
        readers = self.graph.consumers.get(blob_id, [])
        if blob_id in self.chain and len(readers) == 1 and readers[0][0] == node.index:
            return self.chain[blob_id]
        return self.new_chain()

    def pin(self, atoms: np.ndarray, reason: str) -> None:
        if len(atoms):
            self.pins.append((atoms, reason))

    def touch(self, node, verb: str, atoms: np.ndarray, total: int = 0, offset: Optional[int] = None) -> None:
        self.touches.append((_Touch(node.name, node.type, verb, len(atoms), total, offset), atoms))

    def slot(self, node, blob: int, axis: int, side: str, atoms: np.ndarray, masked: bool, factor: bool,
             groups: int = 1, chain: int = -1) -> None:
        shape = node.blob_shapes[blob]
        assert shape[axis] * groups == len(atoms), (node.name, blob, axis, shape, len(atoms))
        self.slots.append((BlobSlot(node.name, node.type, blob, axis, side, np.empty(0, np.int64), masked, factor,
                                    groups, chain), atoms))

    # -- the walk ------------------------------------------------------------------------------------------------
    def run(self, protect: Sequence[str]) -> None:
        graph = self.graph
        shared = _sharing_layers(graph)
        for node in graph.layers:
            role = node.layer.channel_role()
            handler = getattr(self, f"_{role.kind}", None)
            if handler is None:
                raise AssertionError(f"layer {node.name!r} ({node.type}) declares unknown channel role {role.kind!r}")
            handler(node, role)
            if node.name in shared:
                for slot, atoms in self.slots:
                    if slot.layer == node.name:
                        self.pin(atoms, f"layer {node.name!r} shares its parameters with {shared[node.name]}")
        for blob_id in graph.output_ids:
            atoms = self.atoms.get(blob_id)
            if atoms is not None:
                self.pin(atoms, f"net output {blob_id.split('@')[0]!r}")
        names = {n.name for n in graph.layers}
        for name in protect:
            if name not in names:
                close = [n for n in names if name.lower() in n.lower()][:5]
                hint = f" Similar names: {', '.join(close)}." if close else ""
                raise PruneError(f"--protect names layer {name!r}, which is not in the "
                                 f"{'TRAIN' if graph.phase == 0 else 'TEST'} net of {graph.source}.{hint} Use the "
                                 f"layer names of the prototxt.")
            node = graph.layer(name)
            for t in node.top_ids:
                if t in self.atoms:
                    self.pin(self.atoms[t], f"protected (--protect {name})")

    def _barrier(self, node, role: ChannelRole) -> None:
        for b in node.bottom_ids:
            atoms = self.atoms.get(b)
            if atoms is not None:
                self.pin(atoms, f"read by {node.type} layer {node.name!r}, which mixes channels")
                self.touch(node, "pinned by", atoms)
        data = not node.bottoms
        for t, shape in zip(node.top_ids, node.top_shapes):
            if len(shape) >= 2:
                atoms = self.fresh(shape[1])
                self.set_top(t, shape, atoms)
                self.pin(atoms, f"net input {t!r}" if data else f"produced by {node.type} layer {node.name!r}, "
                                                              f"which mixes channels")
                self.touch(node, "pinned by", atoms)

    def _sink(self, node, role: ChannelRole) -> None:
        pass

    def _produces(self, node, role: ChannelRole) -> None:
        ins = [self.atoms.get(b) for b in node.bottom_ids]
        if any(a is None for a in ins) or any(len(s) < 2 for s in node.top_shapes):
            return self._barrier(node, role)
        in_atoms = ins[0]
        for other in ins[1:]:  # several bottoms share the weights: their channels line up
            self.uf.union_arrays(in_atoms, other)
        cin, cout, g = node.bottom_shapes[0][1], node.top_shapes[0][1], role.group
        a, b = cin // g, cout // g
        per_group_out = None
        chain = self.new_chain()
        if g > 1 and cin == g:
            mode, a = "depthwise", 1
            out_atoms = np.repeat(in_atoms, b)       # output o belongs to input channel o // b
            chain = self.chain_after(node, node.bottom_ids[0]) if len(node.bottom_ids) == 1 else chain
        elif g > 1 and all(node.blob_shapes[blob][axis] == cout for blob, axis in role.channel_blobs):
            mode = "grouped"                         # free channels, as many kept in every group
            out_atoms = self.fresh(cout)
            for side, atoms in (("input", in_atoms), ("output", out_atoms)):
                self.equal_counts.append((EqualCounts(node.name, side, np.empty(0, np.int64), g), atoms))
            self.touch(node, "grouped by", in_atoms, total=g)
            self.touch(node, "grouped by", out_atoms, total=g)
        else:
            mode = "positional" if g > 1 else "dense"
            for gi in range(1, g):                   # the j-th input of every group is one channel
                self.uf.union_arrays(in_atoms[:a], in_atoms[gi * a:(gi + 1) * a])
            per_group_out = self.fresh(b)
            out_atoms = np.tile(per_group_out, g)
        for blob, axis in role.channel_blobs:
            size = node.blob_shapes[blob][axis]
            if size == cout:
                self.slot(node, blob, axis, "output", out_atoms, True, False, chain=chain)
            elif size == b and per_group_out is not None:
                self.slot(node, blob, axis, "output", per_group_out, True, False, chain=chain)
        repeat = count(node.bottom_shapes[0], 2)
        for blob, axis in role.input_blobs:
            size = node.blob_shapes[blob][axis]
            if size == cin:
                self.slot(node, blob, axis, "input", in_atoms, False, False)
            elif size == a and mode == "positional":
                self.slot(node, blob, axis, "input", in_atoms[:a], False, False)
            elif size == a and mode == "grouped":
                self.slot(node, blob, axis, "input", in_atoms, False, False, groups=g)
            elif size == cin * repeat and repeat > 1:
                self.slot(node, blob, axis, "input", np.repeat(in_atoms, repeat), False, False)
        for b_id in node.bottom_ids:
            self._check_read(node, b_id, role.absorbs_constants)
            self.touch(node, "read by", self.atoms[b_id], total=cin, offset=0)
        for t, shape in zip(node.top_ids, node.top_shapes):
            self.set_top(t, shape, out_atoms, chain=chain if len(node.top_ids) == 1 else None)
        self.touch(node, "produced by", out_atoms)
        info = ProducerInfo(node.name, node.index, mode, g, np.empty(0, np.int64), np.empty(0, np.int64),
                            role.absorbs_constants)
        self.producers.append((info, in_atoms, out_atoms))

    def _check_read(self, node, blob_id: str, absorbs: bool) -> None:
        """Pin what a removed channel would change here; note where its constant must be folded into a bias."""
        state = self.state[blob_id]
        atoms = self.atoms[blob_id]
        bad = (state == _FIELD) | ((state == _CONSTANT) & (not absorbs))
        if bad.any():
            cause = self.dirtied_by.get(blob_id, "an earlier layer")
            if node.type == "Convolution" and not absorbs:
                why = "it pads its input (a border output sees only part of the constant)"
            elif absorbs:
                why = "padding on the way made the constant uneven"
            else:
                why = f"a {node.type} layer cannot absorb a constant into a bias"
            self.pin(atoms[bad], f"removal would not be exact: {cause} turns a silenced channel into a non-zero "
                                 f"constant, and {node.name!r} cannot fold it into its bias because {why}")
        folded = state == _CONSTANT
        if folded.any() and absorbs:
            self.constant_at.append((node.name, blob_id, folded.copy()))

    def _passthrough(self, node, role: ChannelRole) -> None:
        b_id = node.bottom_ids[0] if node.bottom_ids else None
        atoms = self.atoms.get(b_id) if b_id is not None else None
        if atoms is None:
            if any(len(shape) >= 2 for shape in node.top_shapes):  # channels out of a blob without channels
                self._barrier(node, role)
            return
        if any(len(s) >= 2 and s[1] != len(atoms) for s in node.top_shapes):
            return self._barrier(node, role)
        masked = set(range(len(node.blob_shapes))) if role.masked is None else set(role.masked)
        chain = self.chain_after(node, b_id) if len(node.top_ids) == 1 else self.new_chain()
        for blob, axis in role.channel_blobs:
            self.slot(node, blob, axis, "param", atoms, blob in masked, blob == role.factor, chain=chain)
        if role.factor is not None:
            verb = "scaled by"
        elif role.channel_blobs:
            verb = {"BatchNorm": "normalised by", "Bias": "shifted by"}.get(node.type, "weighted by")
        else:
            verb = "carried by"
        state = self.state[b_id].copy()
        cause = self.dirtied_by.get(b_id)
        if role.factor is not None and all(blob in masked for blob, _ in role.channel_blobs):
            state[:] = _ZERO  # x * 0 + 0: the silenced channel is zero again, whatever came in
            cause = None
        else:
            if not role.pointwise and not role.keeps_constants:
                state[state == _CONSTANT] = _FIELD
            if not role.zero_preserving:
                state = np.maximum(state, _CONSTANT if role.pointwise else _FIELD).astype(np.uint8)
                cause = f"{node.type} {node.name!r}"
        for t, shape in zip(node.top_ids, node.top_shapes):
            self.set_top(t, shape, atoms, state.copy(), chain=chain if len(node.top_ids) == 1 else None)
            if cause:
                self.dirtied_by[t] = cause
        self.touch(node, verb, atoms)

    def _ties(self, node, role: ChannelRole) -> None:
        ins = [(b, self.atoms.get(b)) for b in node.bottom_ids]
        present = [(b, a) for b, a in ins if a is not None]
        if not present or any(a is None for _, a in ins):
            return self._barrier(node, role)
        first = present[0][1]
        if any(len(a) != len(first) for _, a in present):
            return self._barrier(node, role)
        state = np.zeros(len(first), np.uint8)
        cause = None
        for b, a in present:
            self.uf.union_arrays(first, a)
            state = np.maximum(state, self.state[b])
            cause = cause or self.dirtied_by.get(b)
        if not role.keeps_constants and not role.pointwise:
            state[state == _CONSTANT] = _FIELD
        if not role.zero_preserving:
            state = np.maximum(state, _CONSTANT if role.pointwise else _FIELD).astype(np.uint8)
            cause = f"{node.type} {node.name!r}"
        if role.product:
            # x * g(x) with g(0) != 0 (HardSwish), x * sigmoid(...) (squeeze-and-excitation): a channel silenced in
            # one factor is zero again, whatever the other holds.
            state[np.any([self.state[b] == _ZERO for b, _ in present], axis=0)] = _ZERO
            cause = cause if state.any() else None
        for t, shape in zip(node.top_ids, node.top_shapes):
            self.set_top(t, shape, first, state)
            if cause:
                self.dirtied_by[t] = cause
        self.touch(node, "tied by", first)

    def _concat(self, node, role: ChannelRole) -> None:
        ins = [self.atoms.get(b) for b in node.bottom_ids]
        if any(a is None for a in ins):
            return self._barrier(node, role)
        atoms = np.concatenate(ins)
        state = np.concatenate([self.state[b] for b in node.bottom_ids])
        offset = 0
        for a in ins:
            self.touch(node, "concatenated by", a, total=len(atoms), offset=offset)
            offset += len(a)
        self._inherit_cause(node)
        self.set_top(node.top_ids[0], node.top_shapes[0], atoms, state)

    def _slice(self, node, role: ChannelRole) -> None:
        atoms = self.atoms.get(node.bottom_ids[0])
        if atoms is None:
            return self._barrier(node, role)
        state = self.state[node.bottom_ids[0]]
        start = 0
        self._inherit_cause(node)
        for t, shape in zip(node.top_ids, node.top_shapes):
            n = shape[1]
            self.set_top(t, shape, atoms[start:start + n], state[start:start + n].copy())
            start += n
        self.touch(node, "sliced by", atoms)

    def _flatten(self, node, role: ChannelRole) -> None:
        atoms = self.atoms.get(node.bottom_ids[0])
        if atoms is None:
            return self._barrier(node, role)
        state = np.repeat(self.state[node.bottom_ids[0]], role.repeat)
        self._inherit_cause(node)
        self.set_top(node.top_ids[0], node.top_shapes[0], np.repeat(atoms, role.repeat), state)
        self.touch(node, "flattened by", atoms, total=0, offset=None)

    def _inherit_cause(self, node) -> None:
        for b in node.bottom_ids:
            if b in self.dirtied_by:
                for t in node.top_ids:
                    self.dirtied_by.setdefault(t, self.dirtied_by[b])


def _sharing_layers(graph: NetGraph) -> Dict[str, str]:
    """Layers that share a blob through a ParamSpec name -> the layer(s) they share with."""
    partners: Dict[str, List[str]] = {}
    for node in graph.layers:
        for spec in node.blob_specs:
            if spec.owner is not None:
                partners.setdefault(node.name, []).append(spec.owner[0])
                partners.setdefault(spec.owner[0], []).append(node.name)
    return {k: ", ".join(repr(v) for v in sorted(set(vs))) for k, vs in partners.items()}


def analyze(graph: NetGraph, protect: Iterable[str] = ()) -> ChannelAnalysis:
    """Find the channel groups of a net from its graph alone.

    Args:
        graph: the NetGraph (usually the TEST phase of the net to prune).
        protect: layer names whose top channels must never be removed.

    Returns:
        The ChannelAnalysis: groups, slots, producers and pinned channels.

    Raises:
        PruneError: a protected layer does not exist.
    """
    w = _Walker(graph)
    w.run(list(protect))
    n_atoms = w.uf.size
    roots = w.uf.roots()
    # Groups: atoms created together (one fresh allocation) stay together; ties merge allocations.
    starts = np.asarray(w.alloc_starts + [n_atoms], np.int64)
    alloc = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    moved = np.nonzero(roots != np.arange(n_atoms))[0]
    alloc_root = _components(len(starts) - 1, [(alloc[moved], alloc[roots[moved]])])
    unique_roots = np.unique(roots)           # sorted: channel ids follow creation order
    channel_of_root = np.full(n_atoms, -1, np.int64)
    channel_of_root[unique_roots] = np.arange(len(unique_roots))
    channel = channel_of_root[roots]          # atom -> channel id
    group_key = alloc_root[alloc[unique_roots]]
    keys, group_of = np.unique(group_key, return_inverse=True)
    group_of = group_of.astype(np.int64)
    local_of = np.zeros(len(unique_roots), np.int64)
    members: List[np.ndarray] = []
    for g in range(len(keys)):
        ids = np.nonzero(group_of == g)[0]
        local_of[ids] = np.arange(len(ids))
        members.append(ids)

    pinned = np.zeros(len(unique_roots), bool)
    reasons: Dict[int, str] = {}
    for atoms, reason in w.pins:
        for c in _distinct(channel[atoms]):
            if not pinned[c]:
                pinned[c] = True
                reasons[c] = reason

    slots = []
    for slot, atoms in w.slots:
        slot.channels = channel[atoms]
        slots.append(slot)
    blob_channels = {b: channel[a] for b, a in w.atoms.items()}
    producers = {}
    for info, ins, outs in w.producers:
        info.inputs, info.outputs = channel[ins], channel[outs]
        producers[info.layer] = info
    constant_at = {(layer, blob): mask for layer, blob, mask in w.constant_at}
    equal_counts = []
    for constraint, atoms in w.equal_counts:
        constraint.channels = channel[atoms]
        equal_counts.append(constraint)

    groups = [ChannelGroup(g, members[g], [], {}) for g in range(len(keys))]
    for c, reason in reasons.items():
        groups[group_of[c]].pinned[int(local_of[c])] = reason
    for slot in slots:
        gs = group_of[slot.channels]
        for g in _distinct(gs):
            pos = np.nonzero(gs == g)[0]
            groups[g].slots.append(GroupSlot(slot, pos, local_of[slot.channels[pos]]))
    for touch, atoms in w.touches:
        gs = group_of[channel[atoms]]
        for g in _distinct(gs):
            where = np.nonzero(gs == g)[0]
            offset = None
            if touch.offset is not None and where[-1] - where[0] + 1 == len(where):  # contiguous: show the range
                offset = touch.offset + int(where[0])
            groups[g].touches.append(_Touch(touch.layer, touch.type, touch.verb, len(where), touch.total, offset))
    return ChannelAnalysis(graph, groups, group_of, local_of, pinned, blob_channels, slots, producers, constant_at,
                           equal_counts)


def _distinct(values: np.ndarray) -> List[int]:
    """The sorted distinct values; most slots lie in one group, which needs no sort."""
    if len(values) and (values == values[0]).all():
        return [int(values[0])]
    return np.unique(values).tolist()
