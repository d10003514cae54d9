"""Several training processes: Caffe's multi-GPU semantics on torch.distributed (NCCL on GPUs, gloo on CPUs).

Caffe's rules, kept here (REFERENCE §2.1 step 7):

* every process reads the prototxt's ``batch_size`` (its own shard of the data, slim.data shards by rank with
  the same data seed everywhere), so the effective batch is ``batch_size x processes x iter_size``;
* after the ``iter_size`` passes, the gradients are summed over processes and scaled by ``1 / processes``;
* only the root process (rank 0) tests, logs and writes snapshots.

Unlike Caffe (where ``random_seed + rank`` seeds fillers too), every process starts from the same weights: the
fillers are seeded with ``random_seed`` alone and the root's initial blobs are broadcast anyway; ``random_seed +
rank`` seeds only torch's global generator (Dropout).

The gradient all-reduce is coalesced: the gradients of the learnable params live as views in a few flat buffers
(about 25 MB each, as torch's DDP buckets), one collective per buffer. The last buffer carries a few extra
numbers, the *flags*, which cost no extra collective: whether a process failed in this iteration, whether a
stop or snapshot was requested (a signal), whether its loss was not finite. So every process learns of a
failure, a signal or a divergence in the same iteration and all stop together instead of waiting for a peer that
is gone. A process that dies outside that window (in a test or a snapshot on rank 0) is caught by the launcher:
``torch.multiprocessing`` spawn and torchrun both terminate the other processes when one exits with an error;
the process-group timeout (30 minutes, as torch's default) is the last resort.

Processes start in one of three ways (:func:`slim.solver.train.train` decides):

* ``--gpus 0,1,...`` / ``all``: one process per GPU, spawned here, NCCL;
* ``--procs N``: N CPU processes, spawned here, gloo (for tests and CPU clusters);
* torchrun: the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) says
  this process's place; see :func:`from_environment`.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
import socket
from typing import Callable, Optional, Sequence

import torch
import torch.distributed

from slim.errors import SolverError

__all__ = ["Distributed", "GradientReducer", "FLAGS", "init_process_group", "from_environment", "free_port",
           "spawn", "broadcast_tensors", "all_gather_bytes", "BUCKET_BYTES", "TIMEOUT"]

_log = logging.getLogger(__name__)

#: Size of one all-reduce buffer (torch's DDP uses 25 MiB buckets).
BUCKET_BYTES = 25 << 20
#: How long a collective waits for a missing peer before failing (torch's default for gloo and NCCL).
TIMEOUT = datetime.timedelta(minutes=30)
#: The flags all-reduced with the gradients, by slot; each is summed over processes.
FLAGS = ("failed", "stop", "snapshot", "nonfinite")


@dataclasses.dataclass
class Distributed:
    """This process's place among the training processes.

    Attributes:
        rank: 0 .. world_size - 1; rank 0 is the root (tests, logs, snapshots).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU under torchrun).
        device: where this process trains.
        backend: "nccl", "gloo", or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, which tests, logs and writes snapshots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there are several processes (collectives are needed)."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group (if this process joined one)."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port on localhost that nobody listens on now (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, device: torch.device, *, init_method: str,
                       local_rank: int = 0) -> Distributed:
    """Join a process group: NCCL when training on CUDA, gloo otherwise.

    Args:
        rank: this process.
        world_size: number of processes.
        device: this process's device (a CUDA device becomes the current one).
        init_method: e.g. ``tcp://127.0.0.1:PORT`` or ``env://``.
        local_rank: rank on this machine.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                         timeout=TIMEOUT)
    return Distributed(rank, world_size, local_rank, device, backend)


def from_environment(gpus: Optional[Sequence[int]]) -> Optional[Distributed]:
    """Join the process group torchrun (or any launcher setting its variables) describes, if there is one.

    ``RANK`` and ``WORLD_SIZE`` place the process; ``LOCAL_RANK`` picks the GPU: ``gpus[LOCAL_RANK]`` when
    ``--gpus`` lists ids, ``cuda:LOCAL_RANK`` for ``--gpus all``; without ``--gpus`` the processes train on the
    CPU with gloo.

    Returns:
        The joined group, or None when the environment names no multi-process run.

    Raises:
        SolverError: incomplete or inconsistent variables, or fewer GPUs than local processes.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SolverError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; start "
                          f"multi-process training with torchrun (which sets them all), or with --procs/--gpus.")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if gpus is not None:
        ids = list(gpus) if gpus else list(range(torch.cuda.device_count()))
        if local_rank >= len(ids):
            raise SolverError(f"process with LOCAL_RANK {local_rank} has no GPU: --gpus gives {len(ids)} "
                              f"({ids}). Start at most {len(ids)} processes per machine, or list more GPUs.")
        device = torch.device("cuda", ids[local_rank])
    return init_process_group(rank, world, device, init_method="env://", local_rank=local_rank)


def spawn(fn: Callable, args: tuple, nprocs: int, *, env: Optional[dict] = None) -> None:
    """Run ``fn(index, *args)`` in ``nprocs`` fresh processes (spawn) and wait for all of them.

    SIGINT and SIGHUP sent to this (parent) process are passed on to the children, whose handlers decide what
    they mean (a Ctrl-C in a terminal reaches the children directly too; they merge a request that arrives twice
    in one iteration). When a child exits with an error, the others are terminated.

    Args:
        fn: a module-level function (it is pickled by name).
        args: picklable arguments after the process index.
        nprocs: number of processes.
        env: variables set in the environment the children inherit (restored afterwards).

    Raises:
        SolverError: a child exited with a non-zero status (its own message is on its stderr).
    """
    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGHUP)}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        raise SolverError(f"training process {e.error_index} of {nprocs} exited with status {e.exit_code}; the "
                          f"others were stopped. Its error message is printed above.") from None
    except mp.ProcessRaisedException as e:
        raise SolverError(f"training process {e.error_index} of {nprocs} failed; the others were stopped. Its "
                          f"error: {str(e).strip().splitlines()[-1]}") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _flat_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices grouped into buckets of at most ``bucket_bytes`` (one tensor may exceed it)."""
    buckets, current, size = [], [], 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if current and (size + nbytes > bucket_bytes or t.dtype != tensors[current[0]].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


class GradientReducer:
    """Averages gradients over processes with one all-reduce per flat bucket, plus the :data:`FLAGS`.

    The ``.grad`` of every param that requires a gradient is made a view into a flat buffer, so backward
    accumulates straight into it (``zero()`` clears the buffers, Caffe's ClearParamDiffs) and the all-reduce
    needs no copies. Should something replace a ``.grad`` by another tensor, its values are copied in first.

    Args:
        tensors: the learnable tensors, in a fixed order (the same on every process).
        dist: the process group.
        bucket_bytes: target size of one buffer.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dist: Distributed, bucket_bytes: int = BUCKET_BYTES):
        self.dist = dist
        self.tensors = [t for t in tensors if t.requires_grad]
        self._buckets = []  # (flat buffer, [param indices], [views])
        groups = _flat_buckets(self.tensors, bucket_bytes) or [[]]
        for k, idx in enumerate(groups):
            extra = len(FLAGS) if k == len(groups) - 1 else 0
            numel = sum(self.tensors[i].numel() for i in idx)
            dtype = self.tensors[idx[0]].dtype if idx else torch.float32
            flat = torch.zeros(numel + extra, dtype=dtype, device=dist.device)
            views, offset = [], 0
            for i in idx:
                t = self.tensors[i]
                views.append(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
            self._buckets.append((flat, idx, views))
        self._flags = self._buckets[-1][0][-len(FLAGS):]
        self.zero()

    @property
    def num_buckets(self) -> int:
        """All-reduce calls per iteration."""
        return len(self._buckets)

    def zero(self) -> None:
        """Zero every gradient (and the flags); point each ``.grad`` at its view again if it was replaced."""
        for flat, idx, views in self._buckets:
            flat.zero_()
            for i, v in zip(idx, views):
                if self.tensors[i].grad is not v:
                    self.tensors[i].grad = v

    def all_reduce(self, flags: Sequence[float]) -> list[float]:
        """Sum the gradients and the flags over processes, then scale the gradients by ``1 / world_size``.

        Args:
            flags: this process's values, one per :data:`FLAGS` slot.

        Returns:
            The flags summed over all processes.
        """
        for flat, idx, views in self._buckets:
            for i, v in zip(idx, views):
                g = self.tensors[i].grad
                if g is not v:  # replaced (e.g. set to None and re-created): bring its values into the buffer
                    if g is not None:
                        v.copy_(g)
                    self.tensors[i].grad = v
        self._flags.copy_(torch.tensor(list(flags), dtype=self._flags.dtype))
        for flat, _, _ in self._buckets:
            torch.distributed.all_reduce(flat)
        summed = self._flags.tolist()
        scale = 1.0 / self.dist.world_size
        for flat, _, _ in self._buckets[:-1]:
            flat.mul_(scale)
        last = self._buckets[-1][0]
        last[:last.numel() - len(FLAGS)].mul_(scale)
        return summed


def broadcast_tensors(tensors: Sequence[torch.Tensor], dist: Distributed, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` into every process's, coalesced into few broadcasts."""
    if not dist.enabled or not tensors:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    with torch.no_grad():
        for idx in _flat_buckets(tensors, BUCKET_BYTES):
            group = [tensors[i] for i in idx]
            flat = _flatten_dense_tensors([t.contiguous() for t in group])
            torch.distributed.broadcast(flat, src)
            for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(v)


def all_gather_bytes(data: bytes, dist: Distributed) -> list[bytes]:
    """Every process's ``data``, in rank order (a collective: all processes must call it)."""
    if not dist.enabled:
        return [data]
    device = dist.device
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(dist.world_size)]
    torch.distributed.all_gather(lengths, length)
    longest = max(int(n.item()) for n in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, mine)
    return [bytes(g[:int(n.item())].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths)]
