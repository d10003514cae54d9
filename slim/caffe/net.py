"""pycaffe's Net over slim's: the constructors, ``blobs``, ``params``, ``forward``/``backward`` with start and end,
``forward_all``, weights in and out.

    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="w.caffemodel")
    net.blobs["data"].data[...] = image            # numpy views of the blobs (on the CPU, no copy)
    out = net.forward()                            # {output blob: array}
    net.params["conv1"][0].data                    # a layer's parameters, Caffe's layout

Everything runs on slim: the net is a ``slim.Net`` (``net.slim_net``), its layers run one by one over Caffe's named
blobs (slim.caffe._runner), weights go through slim.io.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from slim import proto as pb
from slim.caffe._mode import MIRRORS, current_device
from slim.caffe._runner import LayerRunner, grad_of, leaf_of
from slim.caffe.blob import Blob
from slim.errors import NetError, SlimError
from slim.graph import parse_phase

__all__ = ["Net", "Layer", "TRAIN", "TEST"]

TRAIN = pb.TRAIN
TEST = pb.TEST


class Layer:
    """One layer as pycaffe lists it in ``net.layers``: its ``type`` and its parameter ``blobs``.

    In Caffe this is also the base class of Python layers. slim never runs code named in a net file: a net with a
    ``Python`` layer is refused when it is built, with a message saying so.
    """

    def __init__(self, name: str, type: str, blobs: List[Blob]) -> None:
        self.name = name
        self.type = type
        self.blobs = blobs

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, {self.type}, {len(self.blobs)} blobs)"


class Net:
    """A Caffe net with pycaffe's interface.

    ``Net(network_file, phase, level=0, stages=None, weights=None)`` or pycaffe's older
    ``Net(network_file, weights, phase)``; ``phase`` is ``caffe.TRAIN`` or ``caffe.TEST``. The net is built on the
    device of the current mode (``caffe.set_mode_cpu()`` / ``set_mode_gpu()``).

    Raises:
        NetError: no phase, or a net slim cannot build (unknown or Python layer, impossible shapes).
        WeightsError: weights that do not fit the net.
    """

    def __init__(self, network_file, *args, level: int = 0, stages: Optional[Sequence[str]] = None,
                 weights=None, phase=None) -> None:
        from slim.net import Net as SlimNet

        if len(args) == 1:
            phase = args[0] if phase is None else _twice("phase")
        elif len(args) == 2:
            if weights is not None or phase is not None:
                _twice("weights or phase")
            weights, phase = args
        elif len(args) > 2:
            raise NetError(f"caffe.Net takes (network_file, phase) or (network_file, weights, phase); "
                           f"{1 + len(args)} positional arguments were given.")
        if phase is None:
            raise NetError(f"caffe.Net({network_file!r}): no phase given; pass caffe.TRAIN or caffe.TEST, e.g. "
                           f"caffe.Net(prototxt, caffe.TEST, weights=caffemodel).")
        model = network_file if isinstance(network_file, pb.NetParameter) else str(network_file)
        net = SlimNet(model, phase=parse_phase(phase), level=level, stages=tuple(stages or ()),
                      device=current_device(), fuse_bn=False)
        self._setup(net, solver_owned=False)
        if weights is not None:
            self.copy_from(weights)

    @classmethod
    def _wrap(cls, net, solver_owned: bool) -> "Net":
        """A pycaffe view of an existing slim Net (a solver's train or test net)."""
        self = cls.__new__(cls)
        self._setup(net, solver_owned)
        return self

    def _setup(self, net, solver_owned: bool) -> None:
        self._net = net
        self._solver_owned = solver_owned
        self._runner = LayerRunner(net)
        self._blobs: Dict[str, Blob] = {}
        self._params: Dict[tuple, Blob] = {}

    # ----- structure ---------------------------------------------------------------------------------------------
    @property
    def slim_net(self):
        """The slim.Net underneath (slim's own API: ``net(data=x)``, ``net.params`` as tensors, ...)."""
        return self._net

    def _blob(self, name: str) -> Blob:
        blob = self._blobs.get(name)
        if blob is None:
            runner = self._runner
            blob = self._blobs[name] = Blob(name, lambda: runner.data[name], lambda: runner.diff[name],
                                            lambda shape: runner.reshape_blob(name, shape))
        return blob

    def _param(self, layer: str, index: int) -> Blob:
        blob = self._params.get((layer, index))
        if blob is None:
            net = self._net

            def tensor():
                return net.params[layer][index]

            blob = self._params[layer, index] = Blob(f"{layer}[{index}]", tensor, lambda: grad_of(tensor()))
        return blob

    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        """Every blob by name, in Caffe's order (Caffe's auto-inserted ``*_split_*`` blobs are not materialised)."""
        return OrderedDict((name, self._blob(name)) for name in self._runner.names)

    @property
    def params(self) -> "OrderedDict[str, List[Blob]]":
        """Layer name -> its parameter blobs (Caffe's order and layout), for the layers that have any."""
        return OrderedDict((name, [self._param(name, i) for i in range(len(ts))])
                           for name, ts in self._net.params.items())

    @property
    def layers(self) -> List[Layer]:
        params = self.params
        return [Layer(n.name, n.type, params.get(n.name, [])) for n in self._runner.graph.layers]

    @property
    def layer_dict(self) -> "OrderedDict[str, Layer]":
        return OrderedDict((layer.name, layer) for layer in self.layers)

    @property
    def _layer_names(self) -> List[str]:
        return [n.name for n in self._runner.graph.layers]

    @property
    def _blob_names(self) -> List[str]:
        return list(self._runner.names)

    @property
    def top_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((n.name, list(n.tops)) for n in self._runner.graph.layers)

    @property
    def bottom_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((n.name, list(n.bottoms)) for n in self._runner.graph.layers)

    @property
    def inputs(self) -> List[str]:
        return list(self._runner.graph.inputs)

    @property
    def outputs(self) -> List[str]:
        return list(self._runner.graph.outputs)

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict((name, self._runner.loss_weights[name]) for name in self._runner.names)

    def _index(self, name: str, what: str) -> int:
        names = self._layer_names
        if name not in names:
            raise NetError(f"{self._runner.graph.source}: {what}={name!r} is not a layer of the net; its layers are "
                           f"{', '.join(names)}.")
        return names.index(name)

    def _check_blobs(self, names: Sequence[str], what: str) -> None:
        unknown = [n for n in names if n not in self._runner.data]
        if unknown:
            raise NetError(f"{self._runner.graph.source}: {what} names {', '.join(map(repr, unknown))}, which the net "
                           f"does not have; its blobs are {', '.join(self._runner.names)}.")

    # ----- running -----------------------------------------------------------------------------------------------
    def _follow_mode(self) -> None:
        device = current_device()
        if device == self._net.device:
            return
        if self._solver_owned:
            raise SlimError(f"Caffe's mode is now {device} but this solver's nets live on {self._net.device}; call "
                            f"caffe.set_mode_cpu() or set_mode_gpu() before creating the solver.")
        MIRRORS.push()
        self._runner.to(device)

    def _feed(self, arrays: dict, expected: Sequence[str], kind: str) -> None:
        """Copy ``arrays`` into the ``kind`` ("data" or "diff") of the blobs named ``expected``, as pycaffe does."""
        what = "input blob" if kind == "data" else "top diff"
        if set(arrays) != set(expected):
            raise NetError(f"{self._runner.graph.source}: {what} arguments {sorted(arrays)} do not match the net's "
                           f"{'inputs' if kind == 'data' else 'outputs'} {list(expected)}; pass exactly those.")
        for name, value in arrays.items():
            value = np.asarray(value, dtype=np.float32)
            blob = self._blob(name)
            shape = blob.shape
            if value.ndim == 0 or not shape or value.shape[0] != shape[0]:
                raise NetError(f"{self._runner.graph.source}: {what} {name!r} has shape {value.shape}, but the blob "
                               f"holds a batch of {shape[0] if shape else 'no'} items {shape}. Reshape it first "
                               f"(net.blobs[{name!r}].reshape(...)), or use forward_all, which splits into batches.")
            try:
                getattr(blob, kind)[...] = value
            except ValueError:
                raise NetError(f"{self._runner.graph.source}: {what} {name!r} has shape {value.shape}, the blob "
                               f"{shape}; reshape the blob to the input's shape first.") from None

    def forward(self, blobs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                end: Optional[str] = None, **kwargs) -> "OrderedDict[str, np.ndarray]":
        """Run layers ``start`` .. ``end`` (names, inclusive; default all).

        Args:
            blobs: names of further blobs to return besides the outputs.
            start, end: the first and last layer to run.
            **kwargs: input blob name -> array, copied into the input blobs first (all inputs, batch-sized).

        Returns:
            Blob name -> its ``.data`` (the blob's own array, overwritten by the next forward; copy to keep it): the
            net's outputs, or the tops of ``end`` when it is given, plus ``blobs``.
        """
        extra = list(blobs or [])
        self._check_blobs(extra, "blobs")
        first = self._index(start, "start") if start is not None else 0
        if end is not None:
            last = self._index(end, "end")
            names = self.top_names[end] + extra
        else:
            last = len(self._runner.graph.layers) - 1
            names = self.outputs + extra
        self._follow_mode()
        if kwargs:
            self._feed(kwargs, self.inputs, "data")
        self._runner.forward(first, last)
        return OrderedDict((name, self._blob(name).data) for name in dict.fromkeys(names))

    def backward(self, diffs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                 end: Optional[str] = None, **kwargs) -> "OrderedDict[str, np.ndarray]":
        """Run the backward of layers ``start`` down to ``end`` (names, inclusive; default all).

        Args:
            diffs: names of further blobs whose diffs to return besides the inputs'.
            start, end: the first (topmost) and last layer to run.
            **kwargs: output blob name -> array, copied into the outputs' diffs first (all outputs).

        Returns:
            Blob name -> its ``.diff``: the net's inputs, or the bottoms of ``end`` when it is given, plus ``diffs``.
        """
        extra = list(diffs or [])
        self._check_blobs(extra, "diffs")
        first = self._index(start, "start") if start is not None else len(self._runner.graph.layers) - 1
        if end is not None:
            last = self._index(end, "end")
            names = self.bottom_names[end] + extra
        else:
            last = 0
            names = self.inputs + extra
        self._follow_mode()
        if kwargs:
            self._feed(kwargs, self.outputs, "diff")
        self._runner.backward(first, last)
        return OrderedDict((name, self._blob(name).diff) for name in dict.fromkeys(names))

    def _forward(self, start: int, end: int) -> float:
        """Run layers ``start``..``end`` by index; returns the weighted loss (Caffe's ``ForwardFromTo``)."""
        self._follow_mode()
        return self._runner.forward(int(start), int(end))

    def _backward(self, start: int, end: int) -> None:
        """Backward of layers ``start`` down to ``end`` by index (Caffe's ``BackwardFromTo``)."""
        self._follow_mode()
        self._runner.backward(int(start), int(end))

    def reshape(self) -> None:
        """Carry the input blobs' shapes through the net (after ``net.blobs[name].reshape(...)``)."""
        self._runner.reshape()

    def _batches(self, arrays: dict) -> Iterator[dict]:
        """``arrays`` in chunks of the blobs' batch size, the last chunk padded with zeros (pycaffe's ``_batch``)."""
        counts = {len(v) for v in arrays.values()}
        if len(counts) != 1:
            raise NetError(f"{self._runner.graph.source}: the arrays {sorted(arrays)} have different lengths "
                           f"{sorted(counts)}; give every blob the same number of items.")
        total = counts.pop()
        size = {name: self._blob(name).shape[0] for name in arrays}
        batch = next(iter(size.values()))
        for start in range(0, total, batch):
            chunk = {}
            for name, value in arrays.items():
                part = np.asarray(value[start:start + batch], dtype=np.float32)
                if len(part) < batch:
                    part = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], np.float32)])
                chunk[name] = part
            yield chunk

    def forward_all(self, blobs: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, np.ndarray]:
        """Forward over inputs of any length, batch by batch; returns the outputs (and ``blobs``) joined, without
        the padding of the last batch. A scalar output (a loss) gives one value per batch."""
        names = list(dict.fromkeys(self.outputs + list(blobs or [])))
        if not kwargs:
            out = self.forward(blobs=blobs)
            return {name: np.array(out[name]) for name in names}
        collected: Dict[str, list] = {name: [] for name in names}
        for chunk in self._batches(kwargs):
            out = self.forward(blobs=blobs, **chunk)
            for name in names:
                collected[name].append(np.array(out[name]))
        return _join(collected, len(next(iter(kwargs.values()))), self._batch_size(kwargs))

    def forward_backward_all(self, blobs: Optional[Sequence[str]] = None, diffs: Optional[Sequence[str]] = None,
                             **kwargs):
        """``forward_all`` and ``backward`` batch by batch: keyword arrays named after inputs feed the forward, those
        named after outputs the backward. Returns (outputs, diffs) joined as ``forward_all`` joins them."""
        unknown = set(kwargs) - set(self.inputs) - set(self.outputs)
        if unknown:
            raise NetError(f"{self._runner.graph.source}: {sorted(unknown)} are neither inputs {self.inputs} nor "
                           f"outputs {self.outputs} of the net.")
        fwd = {k: v for k, v in kwargs.items() if k in self.inputs}
        bwd = {k: v for k, v in kwargs.items() if k in self.outputs}
        names = list(dict.fromkeys(self.outputs + list(blobs or [])))
        grads = list(dict.fromkeys(self.inputs + list(diffs or [])))
        outs: Dict[str, list] = {name: [] for name in names}
        back: Dict[str, list] = {name: [] for name in grads}
        for fb, bb in itertools.zip_longest(self._batches(fwd) if fwd else [{}],
                                            self._batches(bwd) if bwd else [{}], fillvalue={}):
            out = self.forward(blobs=blobs, **fb)
            diff = self.backward(diffs=diffs, **bb)
            for name in names:
                outs[name].append(np.array(out[name]))
            for name in grads:
                back[name].append(np.array(diff[name]))
        total = len(next(iter(kwargs.values()))) if kwargs else None
        batch = self._batch_size(kwargs) if kwargs else None
        return _join(outs, total, batch), _join(back, total, batch)

    def _batch_size(self, arrays: dict) -> int:
        return self._blob(next(iter(arrays))).shape[0]

    # ----- weights -----------------------------------------------------------------------------------------------
    def copy_from(self, weights) -> None:
        """Load weights by layer name from a .caffemodel (or an HDF5 file ending in .h5), as Caffe's
        ``CopyTrainedLayersFrom``."""
        MIRRORS.push()
        if str(weights).endswith(".h5"):
            self.load_hdf5(weights)
        else:
            self._net.load_weights(weights if not isinstance(weights, Path) else str(weights))

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s parameters for every layer of the same name (Caffe's ``ShareTrainedLayersWith``)."""
        self._net.share_from(other._net)

    def save(self, filename) -> None:
        """Write the net and its weights as a .caffemodel."""
        MIRRORS.push()
        self._net.save(str(filename))

    def save_hdf5(self, filename) -> None:
        """Write the weights in Caffe's HDF5 layout (needs h5py)."""
        from slim.caffe import _hdf5
        MIRRORS.push()
        _hdf5.save(self._net, str(filename))

    def load_hdf5(self, filename) -> None:
        """Load weights written by ``save_hdf5`` (or Caffe's ``ToHDF5``) by layer name (needs h5py)."""
        from slim.caffe import _hdf5
        MIRRORS.push()
        _hdf5.load(self._net, str(filename))

    def clear_param_diffs(self) -> None:
        """Zero every parameter's diff (Caffe's ``ClearParamDiffs``)."""
        MIRRORS.push()
        with torch.no_grad():
            for ts in self._net.params.values():
                for t in ts:
                    leaf = leaf_of(t)
                    if leaf.grad is not None:
                        leaf.grad.zero_()

    def set_input_arrays(self, data, labels) -> None:
        """Hand arrays to the net's MemoryData layer (N images, N labels; N a multiple of its batch_size). They are
        copied: later changes to the arrays are not seen (Caffe keeps referring to them)."""
        labels = np.asarray(labels)
        self._net.set_input_arrays(np.asarray(data, dtype=np.float32), labels.reshape(len(labels)))

    def __repr__(self) -> str:
        g = self._runner.graph
        return (f"caffe.Net({g.name or 'net'} [{'TRAIN' if g.phase == pb.TRAIN else 'TEST'}]: {len(g.layers)} layers, "
                f"inputs {g.inputs}, outputs {g.outputs})")


def _join(collected: Dict[str, list], total: Optional[int], batch: Optional[int]) -> Dict[str, np.ndarray]:
    """Per-batch arrays joined along the batch axis and cut to ``total`` items. A blob without a batch axis (a loss,
    per-class accuracies) gives its values per batch, stacked."""
    out = {}
    for name, parts in collected.items():
        if batch is not None and parts and parts[0].ndim > 0 and parts[0].shape[0] == batch:
            out[name] = np.concatenate(parts)[:total]
        else:
            out[name] = np.stack(parts) if len(parts) > 1 else parts[0]
    return out


def _twice(what: str):
    raise NetError(f"caffe.Net: {what} given both positionally and by keyword; give it once.")
