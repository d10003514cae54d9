"""Net: a Caffe net as a torch.nn.Module, with Caffe's blobs, weight loading by layer name and .caffemodel output.

    net = slim.Net("deploy.prototxt", weights="w.caffemodel", phase="TEST")
    out = net(data=x)            # dict: output blob name -> tensor (Caffe's output order); out.loss when it has losses
    net.params["conv1"]          # [weight, bias] as tensors, Caffe's order and layout
    net.save("out.caffemodel")   # every layer's blobs, readable by Caffe and OpenCV

The net is an ordinary module for PyTorch's tools: inputs go positionally in ``net.inputs`` order or by blob name,
the NetOutput is a registered pytree (``torch.export.export``, ``torch.compile``, ``torch.onnx.export`` with either
exporter flatten it; under ``torch.jit.trace`` it is a plain dict), ``net.train()``/``net.eval()`` switch the
phase-dependent behaviour of BatchNorm and Dropout (never which layers exist), and ``print(net)`` lists the layers.

Every Caffe blob is an ``nn.Parameter`` (BatchNorm's statistics too, with ``requires_grad`` off, because Caffe keeps
them among the learnable params with lr_mult 0 and the solver's history follows that order). Shared params (ParamSpec
names) are the same Parameter object in every layer that names them.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree

from slim import proto as pb
from slim.errors import NetError, WeightsError
from slim.graph import LayerNode, NetGraph, build_graph, parse_phase
from slim.layers import _lazy
from slim.layers.data import _SourceLayer

__all__ = ["Net", "NetOutput", "LearnableParam"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class LearnableParam:
    """A blob the solver updates: an owner (not a sharer), in Caffe's learnable_params order."""

    layer: str
    index: int
    tensor: nn.Parameter
    lr_mult: float = 1.0      # ParamSpec's defaults
    decay_mult: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.layer}[{self.index}]"


class NetOutput(dict):
    """The net's output blobs by name, in Caffe's order, plus ``loss``: the weighted sum of all loss tops (a
    0-dim tensor), or None when the net has no loss.

    A registered pytree node: its leaves are the output tensors in order, then ``loss`` when it is set, so
    ``torch.export``, ``torch.compile`` and the ONNX exporters see a flat list of tensors.
    """

    loss: Optional[torch.Tensor] = None


def _flatten_output(out: NetOutput):
    values = list(out.values()) + ([out.loss] if out.loss is not None else [])
    return values, (tuple(out.keys()), out.loss is not None)


def _unflatten_output(values, context) -> NetOutput:
    keys, has_loss = context
    values = list(values)
    out = NetOutput(zip(keys, values))
    out.loss = values[len(keys)] if has_loss else None
    return out


def _flatten_output_with_keys(out: NetOutput):
    values, context = _flatten_output(out)
    keys = [_pytree.MappingKey(k) for k in context[0]] + ([_pytree.GetAttrKey("loss")] if context[1] else [])
    return list(zip(keys, values)), context


_pytree.register_pytree_node(
    NetOutput, _flatten_output, _unflatten_output, serialized_type_name="slim.net.NetOutput",
    to_dumpable_context=lambda c: [list(c[0]), c[1]], from_dumpable_context=lambda c: (tuple(c[0]), bool(c[1])),
    flatten_with_keys_fn=_flatten_output_with_keys)


def _module_key(name: str, taken: set) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    while key in taken:
        key += "_"
    taken.add(key)
    return key


def _gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused. Building a net allocates tens of thousands of objects,
    none of them cyclic garbage, and each collection they trigger scans every object torch holds: a third of the
    build time of a deep net. The collector resumes (if it ran before) when ``fn`` returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return wrapper


class _Blobs(nn.Module):
    """Holds one layer's blobs as parameters named "0", "1", ..."""

    def __init__(self, tensors: Sequence[nn.Parameter]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(str(i), t)

    def list(self) -> List[nn.Parameter]:
        return [self._parameters[str(i)] for i in range(len(self._parameters))]


class Net(nn.Module):
    """A Caffe net built from a prototxt, NetParameter or NetGraph.

    Args:
        model: prototxt path, NetParameter or NetGraph.
        weights: a .caffemodel path (or a slim.io.CaffeModel) to load by layer name.
        phase: "TRAIN" or "TEST" (Caffe's default for a standalone net is TEST).
        level, stages: NetState level and stages.
        state: a complete NetState (overrides phase, level and stages).
        seed: seeds the fillers; None uses torch's global generator.
        device: where blobs live and data layers deliver batches.
        rank, world_size: this process's share of the data (data layers shard by rank).
        data_seed: seed of the data order and random transforms (defaults to ``seed``).
        allow_unknown_fields: when reading a prototxt path, skip unknown fields with a warning.
        fuse_bn: run a BatchNorm followed by an in-place Scale as one batch_norm op (same results, faster).
    """

    @_gc_paused
    def __init__(self, model: Union[str, Path, "pb.NetParameter", NetGraph], weights=None, phase="TEST", *,
                 level: int = 0, stages: Sequence[str] = (), state: Optional["pb.NetState"] = None,
                 seed: Optional[int] = None, device=None, rank: int = 0, world_size: int = 1,
                 data_seed: Optional[int] = None, allow_unknown_fields: bool = False, fuse_bn: bool = True):
        super().__init__()
        _lazy.load()  # the layers' torch proxies, resolved before any forward (torch.compile cannot trace imports)
        if isinstance(model, NetGraph):
            graph = model
        else:
            graph = build_graph(model, parse_phase(phase) if state is None else state.phase, level=level,
                                stages=stages, state=state, allow_unknown_fields=allow_unknown_fields)
        self.graph = graph
        self.phase = graph.phase
        _check_blob_memory(graph)
        generator = torch.Generator().manual_seed(seed) if seed is not None else torch.default_generator
        self.blobs = blob_modules = nn.ModuleDict()   # a local name: self.blobs is nn.Module's slow __getattr__
        self._keys: Dict[str, str] = {}
        taken: set = set()
        created: Dict[str, List[nn.Parameter]] = {}
        self._views: Dict[str, List[tuple]] = {}
        for node in graph.layers:
            fresh = node.layer.init_blobs(generator)
            assert len(fresh) == len(node.blob_shapes), node
            tensors = []
            for i, t in enumerate(fresh):
                spec = node.blob_specs[i]
                if spec.owner is not None:
                    tensors.append(created[spec.owner[0]][spec.owner[1]])
                    if tuple(tensors[-1].shape) != tuple(node.blob_shapes[i]):
                        # PERMISSIVE sharing: Caffe's sharer keeps its own shape over the owner's data.
                        self._views[node.name] = [tuple(s) for s in node.blob_shapes]
                else:
                    trainable = node.layer.forced_lr_mult(i) != 0.0
                    tensors.append(nn.Parameter(t.to(torch.float32).contiguous(), requires_grad=trainable))
            created[node.name] = tensors
            if tensors:
                key = _module_key(node.name, taken)
                self._keys[node.name] = key
                blob_modules[key] = _Blobs(tensors)
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self.training = graph.phase == pb.TRAIN  # a net starts in the torch mode of its phase (see train())
        self._fuse_bn = fuse_bn
        self._plan = self._make_plan(fuse_bn)
        self._release = self._release_after(self._plan)
        if device is not None:
            self.to(device)
        self._source_layers = [n.layer for n in graph.layers if isinstance(n.layer, _SourceLayer)]
        # What forward accepts by name: the Input tops, and the tops of data layers (a batch read by next_batch).
        self._feedable = set(graph.inputs) | {t for n in graph.layers if n.layer.is_data for t in n.tops}
        for layer in self._source_layers:
            layer.attach(rank, world_size, data_seed if data_seed is not None else seed, None)
        if weights is not None:
            self.load_weights(weights)

    # ----- structure ---------------------------------------------------------------------------------------
    @property
    def params(self) -> "OrderedDict[str, List[nn.Parameter]]":
        """Layer name -> its blobs as tensors (Caffe's order), for every layer that has blobs."""
        return OrderedDict((n.name, self._layer_blobs(n.name)) for n in self.graph.layers
                           if n.name in self._keys)

    def _layer_blobs(self, name: str) -> List[torch.Tensor]:
        """A layer's blobs in Caffe's order; a PERMISSIVE sharer sees the owner's data in its own shape."""
        tensors = self.blobs[self._keys[name]].list()
        shapes = self._views.get(name)
        if shapes is None:
            return tensors
        return [t if tuple(t.shape) == s else t.view(s) for t, s in zip(tensors, shapes)]

    @property
    def learnable_params(self) -> List[LearnableParam]:
        """The blobs the solver owns, in Caffe's learnable_params order (layer order, then blob index)."""
        out = []
        params = self.params
        for node in self.graph.layers:
            for i, spec in enumerate(node.blob_specs):
                if spec.owner is None:
                    out.append(LearnableParam(node.name, i, params[node.name][i], spec.lr_mult, spec.decay_mult))
        return out

    @property
    def inputs(self) -> List[str]:
        return self.graph.inputs

    @property
    def outputs(self) -> List[str]:
        return self.graph.outputs

    def batch_dynamic_shapes(self, dim=None) -> dict:
        """``dynamic_shapes`` for ``torch.export.export`` (and ``torch.onnx.export(dynamo=True)``) that make the batch
        axis of every input dynamic, for inputs passed positionally (forward takes ``*args``, so torch expects them
        under "args"). torch 2.13 cannot combine dynamic shapes with inputs passed as keywords.

            program = torch.export.export(net, (x,), dynamic_shapes=net.batch_dynamic_shapes())

        Args:
            dim: a ``torch.export.Dim`` for the batch axis (default: ``Dim("batch")``), shared by all inputs.
        """
        dim = torch.export.Dim("batch") if dim is None else dim
        return {"args": tuple({0: dim} for _ in self.graph.inputs)}

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def scaling_factors(self) -> "OrderedDict[str, nn.Parameter]":
        """Network slimming's channel scaling factors: the gamma of every Scale layer that directly follows a
        BatchNorm (1 bottom, per-channel), by Scale layer name."""
        out = OrderedDict()
        params = self.params
        for node in self.graph.layers:
            if node.type != "Scale" or len(node.bottoms) != 1 or node.name not in params:
                continue
            prod = self.graph.producer.get(node.bottom_ids[0])
            if prod is not None and self.graph.layers[prod[0]].type == "BatchNorm":
                out[node.name] = params[node.name][0]
        return out

    def train(self, mode: bool = True) -> "Net":
        """Set torch's train or eval mode, which here switches Caffe's phase-dependent layer behaviour.

        A net starts in the mode of its phase (TRAIN: train, TEST: eval). In train mode BatchNorm normalises with the
        batch statistics and updates its running sums, and Dropout drops; in eval mode BatchNorm uses the stored
        statistics and Dropout is the identity. A BatchNorm whose prototxt sets ``use_global_stats`` keeps it, and so
        does a layer whose own ``phase`` differs from the net's (Caffe's explicit settings win). Which layers exist
        (the NetState include/exclude rules) never changes: that is fixed when the net is built for its phase.
        """
        super().train(mode)
        if hasattr(self, "_plan"):
            self._plan = self._make_plan(self._fuse_bn)
            self._release = self._release_after(self._plan)
        return self

    def _make_plan(self, fuse_bn: bool):
        """Execution steps: (node, its layer in the current mode, fused Scale node or None); a fused Scale is
        skipped on its own."""
        plan, skip = [], set()
        layers = self.graph.layers
        for node in layers:
            if node.index in skip:
                continue
            fused = None
            if fuse_bn and node.type == "BatchNorm" and node.index + 1 < len(layers):
                nxt = layers[node.index + 1]
                users = self.graph.consumers.get(node.top_ids[0], [])
                if (nxt.type == "Scale" and len(nxt.bottoms) == 1 and nxt.bottom_ids[0] == node.top_ids[0]
                        and users == [(nxt.index, 0)] and nxt.layer.axis == 1 and len(nxt.layer.pshape) == 1
                        and node.top_ids[0] not in self.graph.output_ids and not any(node.loss_weights)
                        and len(node.top_shapes[0]) >= 2):
                    fused = nxt
                    skip.add(nxt.index)
            # A layer given its own phase in the prototxt (Caffe's LayerParameter.phase) keeps it in either mode.
            follows = node.layer.phase == self.graph.phase
            plan.append((node, node.layer.for_mode(self.training) if follows else node.layer, fused))
        return plan

    def _release_after(self, plan) -> List[Tuple[str, ...]]:
        """For each step of ``plan``, the blob names that no later step reads or writes: forward drops them then.

        A name is a blob with its in-place chain (``values[name]`` holds its latest version), so a name is live
        from its first top to the last layer that reads or rewrites it. The net's outputs are never dropped.
        """
        # Steps a prototxt writes in place whose layer can overwrite its bottom (ReLU): see _overwritable.
        self._in_place = frozenset(i for i, (node, layer, fused) in enumerate(plan)
                                   if fused is None and hasattr(layer, "apply_in_place") and len(node.bottoms) == 1
                                   and node.tops == node.bottoms)
        last: Dict[str, int] = {}
        for i, (node, _, fused) in enumerate(plan):
            for name in node.bottoms + (fused or node).tops:
                last[name] = i
        release: List[List[str]] = [[] for _ in plan]
        outputs = set(self.graph.outputs)
        for name, i in last.items():
            if name not in outputs:
                release[i].append(name)
        return [tuple(names) for names in release]

    # ----- run ---------------------------------------------------------------------------------------------
    def forward(self, *args, **inputs) -> NetOutput:
        """Run the net.

        Args:
            *args: input tensors in the order of ``net.inputs`` (alternatively pass them by blob name).
            **inputs: input tensors by blob name (``net(data=x)``); the keyword ``return_blobs=True`` also returns
                every intermediate blob (as pycaffe's net.blobs), ``return_blobs=["conv1", ...]`` the outputs and
                the named blobs (each in its latest in-place version).

        Returns:
            NetOutput: output blobs by name (Caffe's order); ``.loss`` is the weighted loss when the net has one.
            Under ``torch.jit.trace`` a plain dict of the same blobs, the only mapping the tracer accepts.

        Every other blob is dropped after the last layer that reads it, so memory holds only the live blobs, as in
        a hand-written forward (under autograd, the tensors autograd saves for backward stay until backward).
        """
        # return_blobs travels in **inputs so that the signature holds only the inputs: the legacy ONNX exporter
        # appends every defaulted parameter of forward as a positional argument.
        return_blobs = inputs.pop("return_blobs", False)
        keep = self._requested_blobs(return_blobs)
        if args:
            if len(args) > len(self.graph.inputs):
                raise NetError(f"{self.graph.source}: {len(args)} positional inputs given, the net has "
                               f"{len(self.graph.inputs)} ({', '.join(self.graph.inputs)}).")
            inputs.update(zip(self.graph.inputs, args))
        unknown = set(inputs) - self._feedable
        if unknown:
            raise NetError(f"{self.graph.source}: {', '.join(sorted(unknown))} is not an input of the net; its inputs "
                           f"are {', '.join(self.graph.inputs) or 'none (it reads its data itself)'}.")
        values: Dict[str, torch.Tensor] = {}
        loss = None
        device = self._device_probe.device
        params = {name: self._layer_blobs(name) for name in self._keys}
        # Inference in eager mode may overwrite a blob that nothing else holds (a hand-written model's inplace=True);
        # under autograd the old value may be saved for backward, and compilers plan memory themselves.
        overwrite = not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing())
        given = set()   # storages of the data layers' tops: the caller's or a dataset's memory, never overwritten
        for step, (node, layer, fused) in enumerate(self._plan):
            if node.type == "Input":
                tops = []
                for t, shape in zip(node.tops, node.top_shapes):
                    if t not in inputs:
                        raise NetError(f"{self.graph.source}: input blob {t!r} was not given; call the net as "
                                       f"net({t}=tensor) with shape {shape}.")
                    x = inputs[t]
                    if not torch.is_tensor(x):
                        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
                    if tuple(x.shape[1:]) != tuple(shape[1:]):
                        raise NetError(f"{self.graph.source}: input {t!r} has shape {tuple(x.shape)}, the net expects "
                                       f"{shape} (any batch size).")
                    tops.append(x.to(device) if x.device != device else x)
            elif layer.is_data and all(t in inputs for t in node.tops):
                tops = [inputs[t] for t in node.tops]   # a batch the caller read (next_batch)
            elif layer.is_data and isinstance(layer, _SourceLayer):
                layer.device = device
                tops = layer.forward([], [])
            elif overwrite and step in self._in_place and _overwritable(node.bottoms[0], values, given):
                tops = [layer.apply_in_place(values[node.bottoms[0]])]
            else:
                node, tops = self._step(node, layer, fused, params, values)
            if overwrite and layer.is_data:
                given.update(t.untyped_storage().data_ptr() for t in tops)
            for t, v in zip(node.tops, tops):
                values[t] = v
            for j, w in enumerate(node.loss_weights):
                if w:
                    term = tops[j].sum() * w if w != 1 else tops[j].sum()
                    loss = term if loss is None else loss + term
            if keep is not True:
                for name in self._release[step]:
                    if name not in keep:
                        del values[name]
        names = values if keep is True else list(self.graph.outputs) + [n for n in keep if n not in self.graph.outputs]
        if torch.jit.is_tracing():
            return {name: values[name] for name in names}
        out = NetOutput((name, values[name]) for name in names)
        out.loss = loss
        return out

    def next_batch(self) -> Dict[str, torch.Tensor]:
        """Run the data layers (all but Input) without the rest of the net: data top -> tensor.

        ``net(**net.next_batch())`` equals ``net()``. A compiled forward takes the batch this way, so the data path
        (sources, random transforms, file reads) stays outside the graph (see Solver's compile option).
        """
        device = self._device_probe.device
        batch: Dict[str, torch.Tensor] = {}
        for node, layer, _ in self._plan:
            if layer.is_data and node.type != "Input":
                layer.device = device
                batch.update(zip(node.tops, layer.forward([], [])))
        return batch

    def check_labels(self, values: Mapping[str, torch.Tensor]) -> None:
        """Run the label checks of the loss layers that read one of ``values`` as labels (a compiled forward skips
        them: they read data values); NetError on labels out of range."""
        for node in self.graph.layers:
            check = getattr(node.layer, "check_labels", None)
            if check is not None and len(node.bottoms) > 1 and node.bottoms[1] in values:
                check(values[node.bottoms[1]])

    def _requested_blobs(self, return_blobs):
        """``return_blobs`` as True (keep every blob) or the set of blob names to keep besides the outputs."""
        if return_blobs is True or return_blobs is False or return_blobs is None:
            return bool(return_blobs) or frozenset()
        names = [return_blobs] if isinstance(return_blobs, str) else list(return_blobs)
        blobs = dict.fromkeys(t for node in self.graph.layers for t in node.tops)
        unknown = [n for n in names if n not in blobs]
        if unknown:
            raise NetError(f"{self.graph.source}: return_blobs names {', '.join(map(repr, unknown))}, which the net "
                           f"does not have; its blobs are {_names(list(blobs))}.")
        return dict.fromkeys(names)

    @staticmethod
    def _step(node: LayerNode, layer, fused: Optional[LayerNode], params, values) -> Tuple[LayerNode, list]:
        """Run one computing layer (``layer``: the node's layer in the current mode) or a BatchNorm fused with its
        Scale on ``values``; returns the node whose tops were computed (the Scale for a fused pair) and the tops."""
        bottoms = [values[b] for b in node.bottoms]
        if fused is not None:
            sb = params.get(fused.name, [])
            beta = sb[1] if len(sb) > 1 else None
            return fused, layer.forward(params[node.name], bottoms, weight=sb[0], bias=beta)
        return node, layer.forward(params.get(node.name, []), bottoms)

    def run_layers(self, values: Dict[str, torch.Tensor], end: Optional[str] = None,
                   visit: Optional[Callable[[LayerNode, Dict[str, torch.Tensor]], None]] = None) \
            -> Dict[str, torch.Tensor]:
        """Run the computing layers in order on given blob values, up to and including layer ``end``.

        Data layers (Input and the dataset layers) are not run: their tops must be in ``values``. Blob names follow
        Caffe's in-place rule: ``values[name]`` always holds the latest version, so ``visit(node, values)``, called
        after each layer, sees that layer's tops and the bottoms it read (no later layer has run yet). Used for
        calibration (slim.prune.calibrate), where only the forward prefix up to a layer is needed.

        Args:
            values: blob name -> tensor for every data top; updated in place and returned.
            end: the last layer to run (None: all of them).
            visit: called after each layer (for a BatchNorm fused with its Scale, once, with the Scale).

        Raises:
            NetError: ``end`` is not a layer of the net, or a data top is missing from ``values``.
        """
        if end is not None and end not in {n.name for n in self.graph.layers}:
            raise NetError(f"{self.graph.source}: there is no layer {end!r} to stop at.")
        params = {name: self._layer_blobs(name) for name in self._keys}
        for node, layer, fused in self._plan:
            if layer.is_data:
                missing = [t for t in node.tops if t not in values]
                if missing:
                    raise NetError(f"{self.graph.source}: blob {missing[0]!r} of data layer {node.name!r} was not "
                                   f"given.")
                ran = node
            else:
                ran, tops = self._step(node, layer, fused, params, values)
                for t, v in zip(ran.tops, tops):
                    values[t] = v
            if visit is not None:
                visit(ran, values)
            if end is not None and (node.name == end or (fused is not None and fused.name == end)):
                break
        return values

    def set_input_arrays(self, data, labels, layer: Optional[str] = None) -> None:
        """Hand arrays to a MemoryData layer (pycaffe's set_input_arrays)."""
        targets = [l for l in self._source_layers if l.type == "MemoryData" and (layer is None or l.name == layer)]
        if not targets:
            raise NetError(f"{self.graph.source}: the net has no MemoryData layer"
                           f"{'' if layer is None else f' named {layer!r}'}.")
        targets[0].source.set_data(data, labels)

    def data_state(self) -> Dict[str, Tuple[int, int]]:
        """Data layer name -> (epoch, position) in its sample order, for exact resumption."""
        return {l.name: tuple(l.source.state()) for l in self._source_layers}

    def load_data_state(self, states: Mapping[str, Tuple[int, int]]) -> None:
        """Restore data positions saved by ``data_state`` (layers not named there keep theirs)."""
        for layer in self._source_layers:
            if layer.name in states:
                epoch, pos = states[layer.name]
                layer.source.load_state(int(epoch), int(pos))

    # ----- weights -----------------------------------------------------------------------------------------
    def share_from(self, other: "Net") -> None:
        """Use ``other``'s blobs for every layer of the same name (Caffe's ShareTrainedLayersWith): test nets see
        the train net's weights and BatchNorm statistics without copies."""
        theirs = {name: other.blobs[key].list() for name, key in other._keys.items()}
        for node in self.graph.layers:
            if node.name not in self._keys or node.name not in theirs:
                continue
            src = theirs[node.name]
            mine = self.blobs[self._keys[node.name]].list()
            if len(src) != len(mine) or any(a.shape != b.shape for a, b in zip(src, mine)):
                raise WeightsError(f"layer {node.name!r} has blobs {[tuple(t.shape) for t in mine]} in "
                                   f"{self.graph.source} and {[tuple(t.shape) for t in src]} in the net it shares "
                                   f"with; the two nets must agree on layers of the same name.")
            self.blobs[self._keys[node.name]] = _Blobs(src)

    def load_weights(self, weights) -> List[str]:
        """Copy blobs from a .caffemodel (path or slim.io.CaffeModel) into the layers of the same name.

        Caffe's CopyTrainedLayersFrom: source layers without a match are ignored (each logged, as Caffe does);
        blob counts and shapes must match exactly (legacy 4-D blobs compare against the last four axes, padded with
        1s). The net's layers that the file does not hold keep their filler values, with a warning naming them.
        Returns the names of the layers that were loaded.

        Raises:
            WeightsError: no layer of the file matches a layer of the net that has blobs (weights of another net:
                scoring or training from them would silently use fillers); a blob count or shape mismatch, naming
                the layer, blob index, expected and found shapes.
        """
        from slim.io import read_caffemodel
        model = read_caffemodel(weights) if isinstance(weights, (str, Path)) else weights
        source = getattr(model, "path", "<weights>")
        params = self.params
        names = {node.name for node in self.graph.layers}
        loaded = []
        with torch.no_grad():
            for entry in model.layers:
                if entry.name not in params:
                    if entry.name not in names:
                        _log.info("Ignoring source layer %s", entry.name)
                    elif entry.blobs:
                        raise WeightsError(
                            f"{source}: layer {entry.name!r} has {len(entry.blobs)} blobs, the net's layer "
                            f"({self.graph.layer(entry.name).type}) has none. The weights belong to another net, "
                            f"or the layer changed type: rename it in the prototxt.")
                    continue
                target = params[entry.name]
                if len(entry.blobs) != len(target):
                    raise WeightsError(
                        f"{source}: layer {entry.name!r} has {len(entry.blobs)} blobs, the net's layer "
                        f"({self.graph.layer(entry.name).type}) expects {len(target)}. If the layer changed on "
                        f"purpose, rename it in the prototxt so it is initialised from its fillers instead.")
                for i, (arr, t) in enumerate(zip(entry.blobs, target)):
                    legacy = entry.legacy_shape[i] if i < len(entry.legacy_shape) else False
                    if not _shape_matches(tuple(arr.shape), tuple(t.shape), legacy):
                        raise WeightsError(
                            f"{source}: layer {entry.name!r} blob {i} has shape {tuple(arr.shape)}, the net expects "
                            f"{tuple(t.shape)}. Rename the layer in the prototxt to train it from scratch, or use "
                            f"weights made for this net.")
                    src = np.ascontiguousarray(arr, dtype=np.float32)
                    with warnings.catch_warnings():
                        # The reader's arrays are read-only views of the mapped file; torch warns on wrapping one,
                        # although it is only read here (copying it first would double the memory of big blobs).
                        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                        t.copy_(torch.from_numpy(src).reshape(t.shape))
                loaded.append(entry.name)
        _check_loaded(source, self.graph, params, model, loaded)
        return loaded

    def save(self, path) -> None:
        """Write every layer (structure and blobs) as a .caffemodel that Caffe and OpenCV load by layer name."""
        from slim.io import write_caffemodel
        net = pb.NetParameter()
        net.name = self.graph.name
        for node in self.graph.layers:
            lp = net.layer.add()
            lp.CopyFrom(node.param)
            del lp.blobs[:]
        blobs = {name: [t.detach().cpu().numpy() for t in ts] for name, ts in self.params.items()}
        write_caffemodel(path, net, blobs)

    def caffe_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """A flat view "layer/index" -> tensor of every layer's blobs (shared blobs appear under each user)."""
        return OrderedDict((f"{name}/{i}", t) for name, ts in self.params.items() for i, t in enumerate(ts))

    def extra_repr(self) -> str:
        g = self.graph
        return (f"{g.name or 'net'} [{'TRAIN' if g.phase == pb.TRAIN else 'TEST'}, "
                f"{'train' if self.training else 'eval'} mode]: {len(g.layers)} layers, inputs {g.inputs}, outputs "
                f"{g.outputs}, {g.param_count:,} learnable params")

    def __repr__(self) -> str:
        """The net's summary, then one line per layer in execution order: type, bottoms -> tops with their
        shapes, and blob shapes (instead of nn.Module's listing of blob holders)."""
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for node in self.graph.layers:
            tops = ", ".join(f"{t} {'x'.join(map(str, s))}" for t, s in zip(node.tops, node.top_shapes))
            flow = f"{', '.join(node.bottoms)} -> {tops}" if node.bottoms else f"-> {tops}"
            blobs = " ".join("x".join(map(str, s)) or "scalar" for s in node.blob_shapes)
            lines.append(f"  ({node.name}): {node.type}({flow}{f'; blobs {blobs}' if blobs else ''})")
        return "\n".join(lines) + "\n)"


def _overwritable(name: str, values: Mapping[str, torch.Tensor], given: set) -> bool:
    """Whether blob ``name`` may be overwritten: no other live blob shares its memory (a Split's tops, a Reshape's
    view), it is not the data layers' memory (the caller's input, a dataset, a cached constant) and not a tensor
    that requires grad. Layers' results are otherwise their own memory or views of their bottoms."""
    x = values[name]
    if x.requires_grad:
        return False
    ptr = x.untyped_storage().data_ptr()
    return ptr not in given and all(k == name or v.untyped_storage().data_ptr() != ptr for k, v in values.items())


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_loaded(source: str, graph: NetGraph, params: Mapping[str, list], model, loaded: List[str]) -> None:
    """Refuse weights of which no layer fits the net; warn about the net's layers left at their fillers."""
    if not params:
        return
    missing = [name for name in params if name not in set(loaded)]
    if not loaded:
        theirs = [entry.name for entry in model.layers if entry.blobs]
        raise WeightsError(
            f"{source} holds no weights for any layer of {graph.source}: the net's layers with blobs are "
            f"{_names(list(params))}, the file's are {_names(theirs) or 'none'}. These are weights of another net; "
            f"pass the .caffemodel trained from this prototxt (layers are matched by name).")
    if missing:
        _log.warning("%s: %d of the net's %d layers with blobs are not in %s and keep their filler values: %s",
                     graph.source, len(missing), len(params), source, _names(missing))


def _check_blob_memory(graph: NetGraph) -> None:
    """Refuse, before any filler runs, a net whose blobs cannot fit in memory, with the figure and the largest
    layer (a num_output of 10^9 would otherwise end in a raw allocation failure, or an out-of-memory kill)."""
    from slim.io.limits import check_allocation

    sizes = {node.name: sum(math.prod(shape) for shape, spec in zip(node.blob_shapes, node.blob_specs)
                            if spec.owner is None) * 4 for node in graph.layers}  # float32; shared blobs once
    if not sizes:
        return
    largest = max(sizes, key=sizes.get)
    check_allocation(sum(sizes.values()), f"{graph.source}: the blobs of the net (largest: layer '{largest}', blob "
                                          f"shapes {list(graph.layer(largest).blob_shapes)}) need",
                     "Reduce num_output (or the layer sizes) in the prototxt.")


def _shape_matches(stored, target, legacy: bool) -> bool:
    if not legacy:
        return stored == target
    if len(target) > 4:
        return False
    padded = (1,) * (4 - len(target)) + target
    return tuple(stored[-4:]) == padded if len(stored) == 4 else stored == target
