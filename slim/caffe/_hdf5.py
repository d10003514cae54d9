"""Weights in Caffe's HDF5 layout (``Net::ToHDF5`` / ``CopyTrainedLayersFromHDF5``), through the optional h5py.

The file holds a group ``data`` with one group per layer (named as the layer) and in it one dataset per blob the
layer owns, named by its index ("0", "1", ...); a blob shared from another layer is not written again.
"""

from __future__ import annotations

import numpy as np
import torch

from slim.errors import SlimError, WeightsError
from slim.io.atomic import atomic_write

__all__ = ["save", "load"]


def _h5py():
    try:
        import h5py
    except ImportError:
        raise SlimError("HDF5 weights need the optional h5py package, which is not installed; run "
                        "`pip install slim[hdf5]` (or `pip install h5py`), or save and load .caffemodel files "
                        "(net.save, net.copy_from).") from None
    return h5py


def save(net, path: str) -> None:
    """Write every layer's owned blobs of a slim Net to ``path``."""
    h5py = _h5py()
    params = net.params
    # Through atomic_write (h5py writes to a file object): a full disk leaves no partial file and a link at the
    # name is replaced, not followed.
    with atomic_write(path, "w+b") as fobj, h5py.File(fobj, "w") as f:
        data = f.create_group("data")
        for node in net.graph.layers:
            group = data.create_group(node.name)
            for i, t in enumerate(params.get(node.name, [])):
                if node.blob_specs[i].owner is None:
                    group.create_dataset(str(i), data=t.detach().cpu().numpy())


def load(net, path: str) -> None:
    """Copy the blobs stored in ``path`` into the layers of the same name; stored layers the net lacks are ignored.

    Raises:
        WeightsError: a layer with more stored blobs than it has, a missing owned blob, a shape mismatch, or a file
            with no layer of this net.
    """
    h5py = _h5py()
    params = net.params
    matched = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise WeightsError(f"{path}: no 'data' group; this is not a weights file written by Caffe's or slim's "
                               f"save_hdf5.")
        data = f["data"]
        with torch.no_grad():
            for node in net.graph.layers:
                if node.name not in data or not isinstance(data[node.name], h5py.Group):
                    continue
                group = data[node.name]
                targets = params.get(node.name, [])
                stored = [k for k in group if isinstance(group[k], h5py.Dataset)]
                if len(stored) > len(targets):
                    raise WeightsError(f"{path}: layer {node.name!r} has {len(stored)} stored blobs, the net's layer "
                                       f"({node.type}) has {len(targets)}.")
                for i, t in enumerate(targets):
                    if str(i) not in group:
                        if node.blob_specs[i].owner is not None:
                            continue    # shared from another layer, stored there
                        raise WeightsError(f"{path}: layer {node.name!r} has no blob {i}; the net's layer "
                                           f"({node.type}) needs {len(targets)}.")
                    arr = np.asarray(group[str(i)][()], dtype=np.float32)
                    if tuple(arr.shape) != tuple(t.shape):
                        raise WeightsError(f"{path}: layer {node.name!r} blob {i} has shape {tuple(arr.shape)}, the "
                                           f"net expects {tuple(t.shape)}. Use weights made for this net.")
                    t.copy_(torch.from_numpy(arr).reshape(t.shape))
                matched.append(node.name)
    if params and not matched:
        raise WeightsError(f"{path}: none of its layers is a layer of {net.graph.source}; these are the weights of "
                           f"another net.")
