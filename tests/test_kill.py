"""kill -9, for real (issue 15): ``slim train`` is SIGKILLed while a snapshot's solverstate is about to be renamed into
place, halfway through writing a snapshot's caffemodel, and between snapshots; each time it is resumed with
``--snapshot`` from the newest complete pair. Every start removes the temporary files the killed writer left for its
prefix (and nothing else), the resume names the pair it uses and any newer caffemodel left without its solverstate,
and the run ends with the weights, history and data positions of a run that was never interrupted, bit for bit.

The child processes are ``slim train`` itself; to stop them at an exact point, the test's driver (below, not slim)
wraps the functions the writes go through and pauses there until the kill arrives.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slim.io import read_caffemodel, read_solverstate
from slim.solver import Solver
from solver_helpers import tiny_net, write_solver

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="this platform has no SIGKILL")

# Random crops and mirrors, Dropout, BatchNorm statistics, a multistep schedule, momentum, a test net: every piece
# of state an exact resumption restores.
NET = tiny_net(batch=8, channels=4, crop=6, mirror=True, dropout=0.3)
SOLVER = dict(lr_policy="multistep", gamma=0.5, stepvalue=[3, 7], max_iter=10, snapshot=2, average_loss=3,
              display=2, test_iter=1, test_interval=4)

# Runs `slim train` (argv[4:]) and pauses, writing the marker file argv[1], at the point argv[2] names:
#   rename NAME     a snapshot file NAME is whole in its temporary file, about to be renamed into place
#   write NAME      half of the first write to NAME's temporary file has reached the disk
#   iteration N     the start of iteration N, between snapshots
DRIVER = r"""
import os, sys, time
from pathlib import Path

marker, where, target = sys.argv[1:4]


def pause():
    Path(marker).write_text("paused")
    time.sleep(600)  # the test kills this process here


import slim.io.atomic as atomic

if where == "rename":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == target:
            pause()
        return real_replace(src, dst, *args, **kwargs)

    atomic.os.replace = replace
elif where == "write":
    real_mkstemp, real_fdopen, watched = atomic.tempfile.mkstemp, os.fdopen, set()

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if os.path.basename(name).startswith(f".{target}."):
            watched.add(fd)
        return fd, name

    class Half:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            data = bytes(memoryview(data).cast("B"))
            self._f.write(data[: max(1, len(data) // 2)])
            self._f.flush()
            pause()

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return Half(f) if fd in watched else f

    atomic.tempfile.mkstemp, atomic.os.fdopen = mkstemp, fdopen
elif where == "iteration":
    from slim.solver.solver import Solver

    real_zero = Solver._zero_grads

    def zero_grads(self):
        if self.iter == int(target):
            pause()
        return real_zero(self)

    Solver._zero_grads = zero_grads

from slim.cli import main

sys.exit(main(sys.argv[4:]))
"""

TEMP = re.compile(r"\.solver_iter_\d+\.(caffemodel|solverstate)\.[a-z0-9_]{8}\.tmp")
# Names like slim's temporary files that are not (another prefix, another pattern): never removed.
FOREIGN = [".solver_iter_4.solverstate.abc.tmp", ".other_iter_4.caffemodel.abcd1234.tmp",
           "solver_iter_4.solverstate.abcd1234.tmp", ".solver_iter_4.solverstate.abcd1234.tmp.bak"]


def start(folder: Path, where: str, target, *args) -> tuple:
    """Start `slim train` in a child process that will pause at ``where``/``target``."""
    marker = folder / f"paused-{where}"
    log = folder / f"log-{where}.txt"
    argv = [sys.executable, "-c", DRIVER, str(marker), where, str(target),
            "train", "--solver", str(folder / "solver.prototxt"), "--threads", "1", *args]
    with open(log, "w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    return child, marker, log


def kill_when_paused(child, marker: Path, log: Path) -> str:
    """SIGKILL the child once it has paused; returns what it logged."""
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"slim train exited ({child.returncode}) before its kill point:\n{log.read_text()}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"slim train did not reach its kill point in 120 s:\n{log.read_text()}")
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    return log.read_text()


def snapshot_files(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("solver_iter_") and not p.name.endswith("tmp"))


def temps(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if TEMP.fullmatch(p.name))


def age(folder: Path, names) -> None:
    """Date leftovers an hour back. A temporary file counts as stale only once it has not changed for 2 s (the
    instant between a writer creating its file and locking it is not mistaken for a leftover); a real restart
    comes later than that, these come within a second."""
    old = time.time() - 3600
    for name in names:
        os.utime(folder / name, (old, old))


def pair(it: int) -> list:
    return [f"solver_iter_{it}.caffemodel", f"solver_iter_{it}.solverstate"]


def resumed_from(folder: Path, it: int) -> str:
    return (f"Resuming at iteration {it} from {folder}/solver_iter_{it}.solverstate with its weights "
            f"{folder}/solver_iter_{it}.caffemodel")


def removed(folder: Path, name: str) -> str:
    return f"Removed {folder}/{name}, left by a snapshot write that was interrupted"


def test_kill_9_at_any_point_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    write_solver(ref, NET, **SOLVER)
    write_solver(run, NET, **SOLVER)
    for name in FOREIGN:
        (run / name).write_bytes(b"not slim's")
    age(run, FOREIGN)

    # 1. Killed with snapshot 4's caffemodel in place and its solverstate still a temporary file.
    child = start(run, "rename", "solver_iter_4.solverstate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (--threads 1): the same arithmetic
    try:
        assert Solver(str(ref / "solver.prototxt"), metrics=False).solve()   # meanwhile: the run never stopped
    finally:
        torch.set_num_threads(threads)
    kill_when_paused(*child)
    assert snapshot_files(run) == pair(2) + ["solver_iter_4.caffemodel"]
    [left1] = temps(run)
    assert left1.startswith(".solver_iter_4.solverstate.")
    age(run, [left1])

    # 2. Resumed from the last complete pair (iteration 2); killed halfway through snapshot 6's caffemodel.
    log = kill_when_paused(*start(run, "write", "solver_iter_6.caffemodel",
                                  "--snapshot", str(run / "solver_iter_2.solverstate")))
    assert removed(run, left1) in log and log.count("left by a snapshot write that was interrupted") == 1
    assert resumed_from(run, 2) in log
    assert (f"{run}/solver_iter_4.caffemodel is newer than the snapshot resumed from but has no .solverstate: that "
            f"snapshot was interrupted while it was written") in log
    assert snapshot_files(run) == pair(2) + pair(4)    # snapshot 4 written again, whole
    [left2] = temps(run)
    assert left2.startswith(".solver_iter_6.caffemodel.") and 0 < (run / left2).stat().st_size < 100
    age(run, [left2])

    # 3. Resumed from iteration 4; killed at the start of iteration 7, between snapshots.
    log = kill_when_paused(*start(run, "iteration", 7, "--snapshot", str(run / "solver_iter_4.solverstate")))
    assert removed(run, left2) in log and resumed_from(run, 4) in log and "has no .solverstate" not in log
    assert snapshot_files(run) == pair(2) + pair(4) + pair(6) and temps(run) == []

    # 4. Resumed from iteration 6 to the end: the weights, history and data positions of the run never stopped.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = Solver(str(run / "solver.prototxt"), snapshot=str(run / "solver_iter_6.solverstate"))
        assert resumed.solve() and resumed.iter == 10
    finally:
        torch.set_num_threads(threads)
    for name in ("caffemodel", "solverstate"):
        assert (ref / f"solver_iter_10.{name}").exists() and (run / f"solver_iter_10.{name}").exists()
    a, b = (read_caffemodel(folder / "solver_iter_10.caffemodel") for folder in (ref, run))
    blobs_a = {layer.name: [np.array(x) for x in layer.blobs] for layer in a.layers if layer.blobs}
    blobs_b = {layer.name: [np.array(x) for x in layer.blobs] for layer in b.layers if layer.blobs}
    assert blobs_a.keys() == blobs_b.keys() == {"conv", "bn", "scale", "ip"}
    for name in blobs_a:
        assert all(np.array_equal(x, y) for x, y in zip(blobs_a[name], blobs_b[name])), name
    (sa, ha), (sb, hb) = (read_solverstate(folder / "solver_iter_10.solverstate") for folder in (ref, run))
    assert len(ha) == len(hb) > 0 and all(np.array_equal(x, y) for x, y in zip(ha, hb))
    assert sa.current_step == sb.current_step == 2
    assert list(sa.slim_state.data) == list(sb.slim_state.data)
    assert list(sa.slim_state.smoothed_loss) == list(sb.slim_state.smoothed_loss)
    assert list(sa.slim_state.torch_rng_state) == list(sb.slim_state.torch_rng_state)
    # The foreign look-alikes were never touched.
    assert all((run / name).read_bytes() == b"not slim's" for name in FOREIGN) and temps(run) == []
