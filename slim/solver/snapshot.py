"""Snapshots: ``prefix_iter_N.caffemodel`` + ``prefix_iter_N.solverstate``, written atomically, read back exactly.

The pair is Caffe's (REFERENCE §2.4): the caffemodel holds every layer of the train net with its blobs
(BatchNorm statistics included); the SolverState holds ``iter`` (completed updates), ``learned_net`` (the
caffemodel's path), ``current_step`` (multistep) and ``history`` (the update rule's blobs). Caffe can resume from
slim's snapshots and slim from Caffe's.

What an *exact* resumption needs beyond that lives in ``SolverState.slim_state`` (a SlimResumeState, field 1000,
which Caffe skips as an unknown field):

=================  ==============================================================================================
torch_rng_state    ``torch.get_rng_state()`` of every process, concatenated in rank order (one state, 5056
                   bytes, per process; Dropout draws from it)
cuda_rng_state     the same for the current CUDA device of every process, when training on CUDA
data               where every data layer of the train net and of the test nets is in its sample order, by layer
                   name (slim.data resumes there; its random transforms are a function of that position, so they
                   need no generator state)
smoothed_loss      the losses in the ``average_loss`` window, oldest first
loss_scale,        the fp16 gradient scaler's scale and growth count (``--amp fp16``)
loss_scale_growth
world_size         the number of processes; resuming with another count is refused, because the data shards and
                   the per-process random streams would differ
=================  ==============================================================================================

A run stopped at iteration K and resumed from its snapshot therefore ends with the same weights and the same test
outputs, bit for bit on a CPU, as the run that never stopped. Older slim snapshots kept one data position
(``data_epoch``, ``data_position``) for all the train net's data layers; they are still read that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from slim import proto as pb
from slim.errors import OutputError, SolverError
from slim.io.atomic import probe_folder, remove_stale_temps
from slim.io.limits import format_bytes

__all__ = ["snapshot_paths", "check_prefix", "unpaired_caffemodels", "write_snapshot", "read_snapshot", "ResumeState",
           "DataPosition"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where one data layer is in its sample order.

    Attributes:
        layer: the data layer's name.
        epoch: the epoch of its sample order.
        position: samples of this process's shard already drawn in that epoch.
        test_net: the test net it belongs to (0-based), or None for the train net.
    """

    layer: str
    epoch: int
    position: int
    test_net: Optional[int] = None


def snapshot_paths(prefix: str, iter: int) -> tuple[str, str]:
    """(``prefix_iter_N.caffemodel``, ``prefix_iter_N.solverstate``), Caffe's names for iteration ``iter``."""
    base = f"{prefix}_iter_{iter}"
    return base + ".caffemodel", base + ".solverstate"


def check_prefix(prefix: str, iter: int, source: str, snapshot_bytes: int = 0) -> None:
    """Caffe's check at start-up that snapshots can be written, made safe for shared folders.

    Caffe creates and removes ``prefix_iter_N.tempfile``; slim instead writes and syncs a block through the same
    atomic writer the snapshots use (a temporary file, never through a planted link), so a full disk is found
    now and not hours later. It also removes temporary files that killed snapshot writers left for this prefix,
    and checks that the folder has room for one snapshot pair (``snapshot_bytes``).

    Raises:
        SolverError: the prefix holds a NUL byte, or the folder does not exist.
        OutputError: the folder is full, read-only or not writable, or has no room for a snapshot.
    """
    if "\0" in prefix:
        raise SolverError(f"{source}: snapshot_prefix {prefix!r} contains a NUL byte, which no file name may hold. "
                          f"Fix snapshot_prefix.")
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        raise SolverError(f"{source}: snapshot_prefix \"{prefix}\" puts snapshots in the folder \"{folder}\", which "
                          f"does not exist. Create it, or change snapshot_prefix.")
    for path in remove_stale_temps(folder, _snapshot_name_regex(prefix)):
        _log.warning("Removed %s, left by a snapshot write that was interrupted.", path)
    model_path, _ = snapshot_paths(prefix, iter)
    probe_folder(model_path)
    free = shutil.disk_usage(folder).free
    if snapshot_bytes > free:
        raise OutputError(f"{source}: a snapshot (caffemodel and solverstate) takes about "
                          f"{format_bytes(snapshot_bytes)}, but the folder {folder} of snapshot_prefix \"{prefix}\" "
                          f"has {format_bytes(free)} free. Free space there or change snapshot_prefix.")


def _snapshot_name_regex(prefix: str) -> str:
    """The names of the files of ``prefix``'s snapshots (and its metrics file), as a regular expression."""
    base = re.escape(os.path.basename(prefix))
    return rf"{base}_iter_\d+\.(?:caffemodel|solverstate)|{base}\.metrics\.jsonl"


def unpaired_caffemodels(prefix: str, after: int = -1) -> list[str]:
    """The ``prefix_iter_N.caffemodel`` files (N > ``after``) without their ``.solverstate``, by iteration."""
    folder = os.path.dirname(prefix) or "."
    pattern = re.compile(rf"{re.escape(os.path.basename(prefix))}_iter_(\d+)\.caffemodel")
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = pattern.fullmatch(name)
            if m and int(m.group(1)) > after and not os.path.exists(snapshot_paths(prefix, int(m.group(1)))[1]):
                found.append((int(m.group(1)), os.path.join(folder, name)))
    return [path for _, path in sorted(found)]


def write_snapshot(prefix: str, iter: int, net, *, current_step: int, history: Sequence, rng_states: Sequence[bytes],
                   cuda_rng_states: Sequence[bytes] = (), data: Sequence[DataPosition] = (),
                   smoothed_loss: Sequence[float] = (), world_size: int = 1,
                   loss_scale: Optional[tuple[float, int]] = None) -> tuple[str, str]:
    """Write the caffemodel, then the solverstate, of iteration ``iter`` (each atomically; when the solverstate
    cannot be written, the new caffemodel is removed again, so no half pair is left).

    Args:
        prefix: snapshot_prefix.
        iter: completed updates.
        net: the train net (a slim Net); all its layers' blobs are written.
        current_step: the lr schedule's multistep position.
        history: the update rule's history tensors, in SolverState order.
        rng_states: each process's torch CPU generator state, in rank order.
        cuda_rng_states: each process's CUDA generator state, or empty.
        data: the position of every data layer of the train net and the test nets.
        smoothed_loss: the average_loss window, oldest first.
        world_size: number of training processes.
        loss_scale: (scale, growth count) of the fp16 gradient scaler, or None without one.

    Returns:
        (caffemodel path, solverstate path).
    """
    from slim.io import write_solverstate

    model_path, state_path = snapshot_paths(prefix, iter)
    _log.info("Snapshotting to binary proto file %s", model_path)
    net.save(model_path)
    state = pb.SolverState(iter=iter, learned_net=model_path, current_step=current_step)
    slim = state.slim_state
    slim.torch_rng_state = b"".join(rng_states)
    if cuda_rng_states:
        slim.cuda_rng_state = b"".join(cuda_rng_states)
    for d in data:
        entry = slim.data.add(layer=d.layer, epoch=int(d.epoch), position=int(d.position))
        if d.test_net is not None:
            entry.test_net = int(d.test_net)
    slim.smoothed_loss.extend(float(v) for v in smoothed_loss)
    slim.world_size = world_size
    if loss_scale is not None:
        slim.loss_scale, slim.loss_scale_growth = float(loss_scale[0]), int(loss_scale[1])
    _log.info("Snapshotting solver state to binary proto file %s", state_path)
    try:
        write_solverstate(state_path, state, [h.detach() for h in history])
    except BaseException:
        # A snapshot is the pair: weights without their solverstate cannot be resumed and would only mislead.
        with contextlib.suppress(OSError):
            os.unlink(model_path)
        raise
    return model_path, state_path


@dataclasses.dataclass
class ResumeState:
    """A solverstate, read and checked, ready to be put back into a solver.

    Attributes:
        path: the solverstate file.
        iter: completed updates.
        current_step: multistep position.
        history: the history arrays, read-only views into the mapped solverstate (copied into the solver once
            their shapes are checked against it).
        learned_net: the caffemodel to load, resolved to an existing path, or None (Caffe's states may omit it).
        rng_states: one torch CPU generator state per process, or None (a Caffe solverstate).
        cuda_rng_states: one CUDA generator state per process, or None.
        data: the data positions, or None (a Caffe solverstate, or an older slim one: see ``shared_data``).
        shared_data: (epoch, position) shared by all the train net's data layers, from an older slim snapshot.
        smoothed_loss: the average_loss window, oldest first.
        world_size: the process count that wrote it, or None (a Caffe solverstate).
        loss_scale: (scale, growth count) of the fp16 gradient scaler, or None.
    """

    path: str
    iter: int
    current_step: int
    history: list[np.ndarray]
    learned_net: Optional[str]
    rng_states: Optional[list[bytes]] = None
    cuda_rng_states: Optional[list[bytes]] = None
    data: Optional[list[DataPosition]] = None
    shared_data: Optional[tuple[int, int]] = None
    smoothed_loss: list[float] = dataclasses.field(default_factory=list)
    world_size: Optional[int] = None
    loss_scale: Optional[tuple[float, int]] = None


def _split(blob: bytes, parts: int, what: str, path: str) -> list[bytes]:
    if len(blob) % parts:
        raise SolverError(f"{path}: slim_state.{what} holds {len(blob)} bytes, which do not split into {parts} "
                          f"equal per-process states; the file is damaged. Resume from another snapshot.")
    size = len(blob) // parts
    return [blob[i * size:(i + 1) * size] for i in range(parts)]


def read_snapshot(path: str | os.PathLike, world_size: int = 1) -> ResumeState:
    """Read a solverstate (and find its caffemodel) for a run of ``world_size`` processes.

    ``learned_net`` is used as stored (relative to the working directory, as Caffe); when it is not there but a
    file of the same name is beside the solverstate, that one is used, so a folder of snapshots can be moved.

    Raises:
        SolverError: an HDF5 state, a missing caffemodel, or a state written by another number of processes.
        ParseError: the file is not a readable SolverState.
    """
    from slim.io import read_solverstate

    path = os.fspath(path)
    if path.endswith(".h5"):
        raise SolverError(f"{path}: HDF5 solver states are not supported; resume from a .solverstate (binary proto) "
                          f"snapshot, written with snapshot_format: BINARYPROTO (Caffe's default).")
    if "\0" in path:
        raise SolverError(f"--snapshot {path!r} contains a NUL byte, which no file name may hold. Give the "
                          f".solverstate file of a snapshot (prefix_iter_N.solverstate).")
    if not os.path.exists(path):
        raise SolverError(f"--snapshot {path} does not exist. Give the .solverstate file of a snapshot "
                          f"(prefix_iter_N.solverstate).")
    # Views, not copies: the history is copied into the solver only once its shapes are checked against the net,
    # so a state declaring a huge blob costs nothing before it is refused.
    state, history = read_solverstate(path)
    _check_state(state, path)
    learned = None
    if state.learned_net:
        learned = state.learned_net
        if not os.path.exists(learned):
            beside = os.path.join(os.path.dirname(path), Path(state.learned_net).name)
            if not os.path.exists(beside):
                raise SolverError(f"{path}: its weights file learned_net \"{state.learned_net}\" does not exist, "
                                  f"neither from the working directory nor beside the solverstate ({beside}). Put the "
                                  f"caffemodel back, or resume from another snapshot.")
            learned = beside
    out = ResumeState(path, int(state.iter), int(state.current_step), list(history), learned)
    if state.HasField("slim_state"):
        s = state.slim_state
        if s.world_size and s.world_size != world_size:
            raise SolverError(f"{path}: this snapshot was trained by {s.world_size} process(es) and cannot resume "
                              f"with {world_size}: the data shards and random streams depend on the process count. "
                              f"Resume with {s.world_size} process(es) (--procs/--gpus), or fine-tune from its "
                              f"caffemodel with --weights instead.")
        saved_world = s.world_size or 1
        if s.torch_rng_state:
            out.rng_states = _split(s.torch_rng_state, saved_world, "torch_rng_state", path)
        if s.cuda_rng_state:
            out.cuda_rng_states = _split(s.cuda_rng_state, saved_world, "cuda_rng_state", path)
        if len(s.data):
            out.data = [DataPosition(d.layer, int(d.epoch), int(d.position),
                                     int(d.test_net) if d.HasField("test_net") else None) for d in s.data]
        elif s.HasField("data_epoch") or s.HasField("data_position"):
            out.shared_data = (int(s.data_epoch), int(s.data_position))
        out.smoothed_loss = [float(v) for v in s.smoothed_loss]
        out.world_size = saved_world
        if s.HasField("loss_scale"):
            out.loss_scale = (float(s.loss_scale), int(s.loss_scale_growth))
    return out


def _check_state(state: "pb.SolverState", path: str) -> None:
    """Refuse values no run can have written (a damaged or forged file), before anything is resumed from them.

    What depends on the solver and the net (history shapes, the generator states' size, iter against max_iter,
    data positions against the datasets) is checked by the solver.
    """
    def bad(what: str) -> SolverError:
        return SolverError(f"{path}: {what}, which no training run writes; the file is damaged. Resume from another "
                           f"snapshot.")

    if state.iter < 0:
        raise bad(f"iter is {state.iter}")
    if state.current_step < 0:
        raise bad(f"current_step is {state.current_step}")
    if not state.HasField("slim_state"):
        return
    s = state.slim_state
    if s.world_size < 0:
        raise bad(f"slim_state.world_size is {s.world_size}")
    for d in s.data:
        if d.epoch < 0 or d.position < 0 or (d.HasField("test_net") and d.test_net < 0):
            raise bad(f"the data layer '{d.layer}' is at epoch {d.epoch}, position {d.position}")
    if s.data_epoch < 0 or s.data_position < 0:
        raise bad(f"the data position is epoch {s.data_epoch}, position {s.data_position}")
    if not all(math.isfinite(v) for v in s.smoothed_loss):
        raise bad("slim_state.smoothed_loss holds a value that is not finite")
    if s.HasField("loss_scale") and not (math.isfinite(s.loss_scale) and s.loss_scale > 0 and
                                         s.loss_scale_growth >= 0):
        raise bad(f"the fp16 loss scale is {s.loss_scale} (growth {s.loss_scale_growth})")
