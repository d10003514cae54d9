"""Caffe's ``Net::ForwardFromTo`` and ``BackwardFromTo`` over a slim Net: every blob in a named buffer, one layer at a
time.

pycaffe reads and writes blobs between layers (``forward(start=..., end=...)``, ``blobs['prob'].diff[...] = g`` then
``backward(start='prob')``), so a pycaffe net cannot run as one torch function. :class:`LayerRunner` keeps Caffe's
model over slim's layers (the registry's forwards, the same code ``slim.Net`` runs):

* one data and one diff buffer per blob name, in Caffe's blob order. An in-place layer's top becomes the data of
  the name it read, so after a forward a name holds its last version, as Caffe's in-place blobs do, and both
  versions share the name's diff;
* forward runs layers start..end: each reads its bottoms from the buffers, runs its torch forward, and its tops
  become the buffers of their names (nothing is copied: a Flatten's or Split's top shares its bottom's memory, as
  Caffe's ShareData does; a data layer's tops are copied, so writes never reach its dataset). A layer that takes
  part in backward keeps its bottoms and tops (a small autograd graph of its own) until the next forward. A blob
  written between forward and backward is what backward reads, as in Caffe;
* backward runs layers start..end in reverse: each takes its tops' diffs from the buffers, writes its bottoms' diffs
  (the first writer of a blob version overwrites, later ones add: the sum Caffe's Split layers form for a blob with
  several consumers) and adds its parameters' gradients to their ``.grad`` (Caffe accumulates param diffs until
  ``ClearParamDiffs``);
* which layers, bottoms and params take part in backward is Caffe's ``Net::Init`` rule: a blob needs backward when a
  param with lr_mult != 0 lies below it; a layer none of whose tops leads to a loss is skipped; ``propagate_down``
  overrides it per bottom; ``force_backward`` makes every layer, and every bottom its type allows, compute gradients;
* a loss top's diff starts as its loss_weight (Caffe's ``SetLossWeights``), so ``backward()`` after ``forward()``
  gives the gradient of the weighted loss.

Fan-out is implicit (slim does not insert Split layers), so the ``*_split_*`` blobs Caffe adds are not among the
blobs; the blob they split holds the summed diff.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from slim import proto as pb
from slim.caffe._mode import MIRRORS
from slim.errors import NetError
from slim.graph import NetGraph, build_graph
from slim.net import Net, NetOutput

__all__ = ["LayerRunner"]


class LayerRunner:
    """Runs a slim Net layer by layer over Caffe's named blob buffers (see the module docstring).

    Attributes:
        net: the slim Net whose layers and parameters run.
        graph: the graph being run: the net's, or one re-inferred for new input shapes (:meth:`reshape`).
        names: blob names in Caffe's order (first producer first).
        data, diff: blob name -> tensor buffer.
        loss_weights: blob name -> loss weight, for every blob (0 for non-loss blobs).
    """

    def __init__(self, net: Net) -> None:
        self.net = net
        self.graph: NetGraph = net.graph
        # Data layers hold their source and position: the original instances keep running after a reshape.
        self._data_layers = {n.name: n.layer for n in net.graph.layers if n.layer.is_data}
        self._tape: Dict[int, Tuple[list, list, list]] = {}
        self.data: Dict[str, torch.Tensor] = {}
        self.diff: Dict[str, torch.Tensor] = {}
        self._allocate(keep=())
        self._plan_backward()

    @property
    def device(self) -> torch.device:
        return self.net.device

    # ----- buffers ---------------------------------------------------------------------------------------------
    def _allocate(self, keep) -> None:
        """Fresh buffers in the graph's shapes (the blobs named in ``keep`` keep theirs), loss diffs at their weight."""
        names: List[str] = []
        shapes: Dict[str, tuple] = {}
        self.loss_weights: Dict[str, float] = {}
        for node in self.graph.layers:
            for t, tid, w in zip(node.tops, node.top_ids, node.loss_weights):
                if t not in shapes:
                    names.append(t)
                shapes[t] = tuple(self.graph.shapes[tid])
                self.loss_weights[t] = float(w)
        self.names = names
        device = self.device
        for name in names:
            if name not in keep:
                self.data[name] = torch.zeros(shapes[name], device=device)
            self.diff[name] = torch.full(shapes[name], self.loss_weights[name], device=device)
        for stale in set(self.data) - set(names):
            del self.data[stale], self.diff[stale]

    def to(self, device: torch.device) -> None:
        """Move the net and every buffer to ``device`` (Caffe's mode changed); the saved forward is dropped."""
        self.net.to(device)
        self.data = {k: v.to(device) for k, v in self.data.items()}
        self.diff = {k: v.to(device) for k, v in self.diff.items()}
        self._tape.clear()

    def reshape_blob(self, name: str, shape: Tuple[int, ...]) -> None:
        """A new (zeroed) buffer of ``shape`` for blob ``name`` (pycaffe's ``blob.reshape``)."""
        self.data[name] = torch.zeros(shape, device=self.device)
        self.diff[name] = torch.zeros(shape, device=self.device)

    def _write(self, name: str, top: torch.Tensor, copy: bool = False) -> None:
        """``top`` becomes blob ``name``'s data (a copy when ``copy``); its diff keeps its memory unless the shape
        changed."""
        top = top.detach().to(self.device, torch.float32)
        self.data[name] = top.clone() if copy else top
        if tuple(self.diff[name].shape) != tuple(top.shape):
            self.diff[name] = torch.full(tuple(top.shape), self.loss_weights[name], device=top.device)

    # ----- shapes ----------------------------------------------------------------------------------------------
    def reshape(self) -> None:
        """Carry the input blobs' current shapes through the net (Caffe's ``Net::Reshape``): the graph is inferred
        again and every other blob gets a buffer of its new shape.

        Raises:
            NetError: a layer's parameters would change shape (e.g. an InnerProduct after a larger image), or a shape
                is impossible.
        """
        inputs = {name: tuple(self.data[name].shape) for name in self.graph.inputs}
        if all(tuple(self.graph.shapes[name]) == shape for name, shape in inputs.items()):
            return
        net = pb.NetParameter()
        net.CopyFrom(self.graph.net)
        for lp in net.layer:
            # The layers are already chosen by the net's state; filtering again must not drop any.
            del lp.include[:]
            del lp.exclude[:]
            if lp.type == "Input":
                del lp.input_param.shape[:]
                for top in lp.top:
                    lp.input_param.shape.add().dim.extend(inputs[top])
        graph = build_graph(net, self.graph.phase, source=self.graph.source)
        params = self.net.params
        for node in graph.layers:
            have = [tuple(p.shape) for p in params.get(node.name, [])]
            want = [tuple(s) for s in node.blob_shapes]
            if have and have != want:
                shapes = ", ".join(f"{n} {s}" for n, s in inputs.items())
                raise NetError(f"{self.graph.source}: with input shape(s) {shapes}, layer {node.name!r} would need "
                               f"parameters of shape {want}, but its parameters have shape {have}. Caffe refuses this "
                               f"reshape too; feed inputs of a size the net's weights fit.")
        self.graph = graph
        self._tape.clear()
        self._allocate(keep=set(inputs))
        self._plan_backward()

    # ----- which layers take part in backward (Caffe's Net::Init) ------------------------------------------------
    def _plan_backward(self) -> None:
        layers = self.graph.layers
        blob_need: Dict[str, bool] = {}
        self.layer_need: List[bool] = []
        self.bottom_need: List[List[bool]] = []
        self.param_need: List[List[bool]] = []
        for node in layers:
            lp = node.param
            if lp.propagate_down and len(lp.propagate_down) != len(node.bottoms):
                raise NetError(f"{self.graph.source}: layer {node.name!r} gives {len(lp.propagate_down)} "
                               f"propagate_down values for {len(node.bottoms)} bottoms; give none or one per bottom.")
            need = False
            bottoms = []
            for j, bid in enumerate(node.bottom_ids):
                below = blob_need.get(bid, False)
                need |= below
                bottoms.append(bool(lp.propagate_down[j]) if lp.propagate_down else below)
            params = [spec.lr_mult != 0 for spec in node.blob_specs]
            need |= any(params)
            for tid in node.top_ids:
                blob_need[tid] = need
            self.layer_need.append(need)
            self.bottom_need.append(bottoms)
            self.param_need.append(params)
        # Backwards: a layer whose tops lead to no loss, or whose consumers want no gradient, is skipped.
        under_loss = set()
        for node in reversed(layers):
            i = node.index
            contributes = any(w != 0 or tid in under_loss for tid, w in zip(node.top_ids, node.loss_weights))
            skip = all(self._consumers_skip(tid) for tid in node.top_ids)
            if (self.layer_need[i] and skip) or not contributes:
                self.layer_need[i] = False
                self.bottom_need[i] = [False] * len(node.bottoms)
            if contributes:
                under_loss.update(node.bottom_ids)
        if self.graph.net.force_backward:
            for node in layers:
                i = node.index
                allow = getattr(node.layer, "allow_force_backward", None)
                self.layer_need[i] = True
                self.bottom_need[i] = [b or (allow(j) if allow is not None else True)
                                       for j, b in enumerate(self.bottom_need[i])]
                self.param_need[i] = [True] * len(node.blob_specs)

    def _consumers_skip(self, tid: str) -> bool:
        """Caffe's blobs_skip_backp for a blob version: it has consumers and none of them wants its gradient."""
        users = self.graph.consumers.get(tid, [])
        return bool(users) and not any(self.bottom_need[i][j] for i, j in users)

    # ----- forward and backward ----------------------------------------------------------------------------------
    def _follow_inputs(self) -> None:
        if any(tuple(self.data[name].shape) != tuple(self.graph.shapes[name]) for name in self.graph.inputs):
            self.reshape()

    def _bottom(self, node, j: int) -> torch.Tensor:
        # A leaf of this layer's own graph, sharing the blob's memory. An in-place layer after it replaces the
        # blob's buffer instead of writing into it, so the values saved here stay those this layer read.
        return self.data[node.bottoms[j]].detach().requires_grad_(self.bottom_need[node.index][j])

    def forward(self, start: int, end: int, record: bool = True) -> float:
        """Run layers ``start``..``end`` (indices, inclusive); returns the weighted loss of the loss tops computed.
        With ``record`` False nothing is kept for backward (a solver's test pass)."""
        MIRRORS.push()
        self._follow_inputs()
        params = self.net.params
        loss = 0.0
        for node in self.graph.layers[start:end + 1]:
            i = node.index
            self._tape.pop(i, None)
            if node.type == "Input":
                continue                    # its tops are the input buffers, filled by the caller
            layer = self._data_layers.get(node.name, node.layer)
            blobs = params.get(node.name, [])
            if layer.is_data:
                layer.device = self.device
                with torch.no_grad():
                    tops = layer.forward([], [])
            elif self.layer_need[i] and record:
                bottoms = [self._bottom(node, j) for j in range(len(node.bottoms))]
                with torch.enable_grad():
                    tops = layer.forward(blobs, bottoms)
                self._tape[i] = (bottoms, tops, blobs)
            else:
                with torch.no_grad():
                    tops = layer.forward(blobs, [self.data[b] for b in node.bottoms])
            for name, top in zip(node.tops, tops):
                self._write(name, top, copy=layer.is_data)
            for top, w in zip(tops, node.loss_weights):
                if w:
                    loss += w * float(top.detach().sum())
        return loss

    def backward(self, start: int, end: int) -> None:
        """Run the backward of layers ``start`` down to ``end`` (indices, inclusive), from the diffs in the buffers.

        Raises:
            NetError: a top's diff no longer has its data's shape, or the saved forward was overwritten.
        """
        MIRRORS.push()
        written = set()
        for i in range(start, end - 1, -1):
            node = self.graph.layers[i]
            if not self.layer_need[i] or node.layer.is_data:
                continue
            record = self._tape.get(i)
            if record is None:
                raise NetError(f"{self.graph.source}: layer {node.name!r} has no forward to go back through (it has "
                               f"not run since the net was built or reshaped, or only in a solver's test); run "
                               f"forward over it before backward.")
            bottoms, tops, blobs = record
            outs, grads_out = [], []
            for name, top in zip(node.tops, tops):
                if top.requires_grad:
                    d = self.diff[name]
                    if tuple(d.shape) != tuple(top.shape):
                        raise NetError(f"{self.graph.source}: the diff of blob {name!r} has shape {tuple(d.shape)}, "
                                       f"its data {tuple(top.shape)}; run forward again before backward.")
                    outs.append(top)
                    grads_out.append(d)
            want_b = [j for j, b in enumerate(bottoms) if self.bottom_need[i][j] and b.requires_grad]
            want_p = [k for k, p in enumerate(blobs) if self.param_need[i][k] and p.requires_grad]
            if not outs or not (want_b or want_p):
                continue
            try:
                grads = torch.autograd.grad(outs, [bottoms[j] for j in want_b] + [blobs[k] for k in want_p],
                                            grads_out, retain_graph=True, allow_unused=True)
            except RuntimeError as e:
                raise NetError(f"{self.graph.source}: backward of layer {node.name!r} failed ({e}); run forward over "
                               f"the layers again before backward.") from e
            for j, g in zip(want_b, grads):
                name, bid = node.bottoms[j], node.bottom_ids[j]
                target = self.diff[name]
                if g is None:
                    g = torch.zeros_like(target)
                with torch.no_grad():
                    if bid in written:
                        target.add_(g.reshape(target.shape))
                    else:
                        target.copy_(g.reshape(target.shape))
                written.add(bid)
            for k, g in zip(want_p, grads[len(want_b):]):
                if g is not None:
                    _accumulate(blobs[k], g)

    def outputs(self, loss: float) -> NetOutput:
        """The net's output blobs (copies) and the loss, as slim.Net returns them (for the solver's passes)."""
        out = NetOutput((name, self.data[name].clone()) for name in self.graph.outputs)
        out.loss = torch.tensor(loss, dtype=torch.float32)
        return out


def leaf_of(param: torch.Tensor) -> torch.Tensor:
    """The Parameter behind a layer's blob (a PERMISSIVE sharer sees the owner's Parameter through a view)."""
    return param if param._base is None else param._base


def grad_of(param: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a layer's blob, in the blob's shape; allocated (zero) when the Parameter has none."""
    leaf = leaf_of(param)
    if leaf.grad is None:
        leaf.grad = torch.zeros_like(leaf)
    return leaf.grad.view(param.shape)


def _accumulate(param: torch.Tensor, g: torch.Tensor) -> None:
    with torch.no_grad():
        grad_of(param).add_(g.reshape(param.shape))
