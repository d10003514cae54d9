"""Caffe's process-wide mode (pycaffe's ``set_mode_cpu``, ``set_mode_gpu``, ``set_device``, ``set_random_seed``) and
the host copies of blobs that live on a GPU.

Caffe keeps one mode per process and every net follows it; pycaffe's API is built on that, so this module holds the
facade's only state: the device new nets and solvers are built on, and the numpy copies handed out for GPU blobs.

On the CPU a blob's ``.data`` and ``.diff`` are numpy views of the tensors themselves: a write is seen by the next
computation and nothing is copied. On a GPU they are host copies with Caffe's SyncedMemory rule: an array handed out
is written back to the device before the next computation (forward, backward, a solver step, save), and the next
access after a computation copies the device's values in again. An array kept across a computation is therefore
stale on a GPU, as in Caffe; read ``.data`` again after each step.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from slim.errors import SlimError

__all__ = ["set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "current_device", "MIRRORS"]


class _Mode:
    """The device of Caffe's mode: CPU, or GPU ``gpu_id``."""

    def __init__(self) -> None:
        self.gpu = False
        self.gpu_id = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.gpu_id) if self.gpu else torch.device("cpu")


_MODE = _Mode()


def set_mode_cpu() -> None:
    """Run nets and solvers created from now on on the CPU (Caffe's default)."""
    _MODE.gpu = False


def set_mode_gpu() -> None:
    """Run nets and solvers created from now on on GPU ``set_device(id)`` (0 by default).

    Raises:
        SlimError: torch sees no CUDA device.
    """
    if not torch.cuda.is_available():
        raise SlimError("caffe.set_mode_gpu(): torch sees no CUDA device (this torch build or machine has none). "
                        "Call caffe.set_mode_cpu(), or install a CUDA build of torch on a machine with a GPU.")
    _MODE.gpu = True


def set_device(device_id: int) -> None:
    """Choose the GPU used in GPU mode (Caffe's ``Caffe::SetDevice``).

    Raises:
        SlimError: there is no such CUDA device.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= int(device_id) < max(count, 1):
        raise SlimError(f"caffe.set_device({device_id}): torch sees {count} CUDA device(s); give an id below "
                        f"{max(count, 1)}.")
    _MODE.gpu_id = int(device_id)


def set_random_seed(seed: int) -> None:
    """Seed the random streams fillers, data order and Dropout draw from (Caffe's ``Caffe::set_random_seed``)."""
    torch.manual_seed(int(seed))


def current_device() -> torch.device:
    """The device of the current mode."""
    return _MODE.device


class HostMirrors:
    """numpy copies of device tensors handed out as ``.data``/``.diff``, written back before the next computation.

    ``always`` makes CPU tensors take the same path (tests use it to exercise the GPU rule without a GPU).
    """

    def __init__(self) -> None:
        self.always = False
        self._arrays: "weakref.WeakKeyDictionary[object, Dict[str, np.ndarray]]" = weakref.WeakKeyDictionary()
        self._pending: Dict[Tuple[int, str], Tuple[object, np.ndarray, Callable[[], torch.Tensor]]] = {}

    def view(self, owner: object, kind: str, get: Callable[[], torch.Tensor]) -> np.ndarray:
        """The array for the tensor ``get()`` returns: a view on the CPU; else the host copy, owned by ``owner``
        (kept per ``kind``), to be written back by :meth:`push`."""
        t = get()
        if t.device.type == "cpu" and not self.always:
            return t.detach().numpy()
        key = (id(owner), kind)
        pending = self._pending.get(key)
        if pending is not None and pending[1].shape == tuple(t.shape):
            return pending[1]       # handed out since the last computation: it may hold writes not yet pushed
        arrays = self._arrays.setdefault(owner, {})
        arr = arrays.get(kind)
        if arr is None or arr.shape != tuple(t.shape):
            arr = arrays[kind] = np.empty(tuple(t.shape), np.float32)
        arr[...] = t.detach().cpu().numpy()
        self._pending[key] = (owner, arr, get)
        return arr

    def push(self) -> None:
        """Write every array handed out since the last push back to its tensor (call before computing)."""
        for _, arr, get in self._pending.values():
            t = get()
            if tuple(t.shape) == arr.shape:
                # Through .data: a blob written between forward and backward is what backward reads, as in Caffe,
                # without tripping autograd's check on tensors saved for backward.
                t.data.copy_(torch.from_numpy(arr))
        self._pending.clear()


MIRRORS = HostMirrors()
