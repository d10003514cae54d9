"""Full and read-only disks, planted symlinks, leftover temporary files and unpaired snapshots (issue 15).

A full disk is simulated by a file whose writes fail with ENOSPC past a byte budget, a read-only folder by
creation failing with EROFS (these tests run as root, for whom permission bits do not stop writes). Where the
machine lets the tests mount a small tmpfs, the same is checked on a real full and a real read-only file system.
"""

import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from slim.cli import main
from slim.errors import OutputError, SolverError
from slim.io import atomic, parse_net, read_caffemodel, write_caffemodel
from slim.solver import Hook, Solver, TrainConfig, train
from slim.solver.logs import MetricsFile
from solver_helpers import tiny_net, write_solver

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
"""


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget[0]`` more bytes have been written (a disk filling up)."""

    def __init__(self, f, budget):
        self._f, self._budget = f, budget

    def write(self, data):
        size = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        if size > self._budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.fixture
def disk(monkeypatch):
    """``disk.fill(n)``: from now on only ``n`` more bytes fit (``disk.free()`` ends that); ``disk.read_only()``: no
    file can be created."""
    real_fdopen, real_mkstemp = os.fdopen, atomic.tempfile.mkstemp
    budget = [None]

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return f if budget[0] is None else _FullDisk(f, budget)

    class Controls:
        @staticmethod
        def fill(room=0):
            budget[0] = room
            monkeypatch.setattr(atomic.os, "fdopen", fdopen)

        @staticmethod
        def free():
            budget[0] = None

        @staticmethod
        def read_only():
            def mkstemp(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)

    return Controls


def temp_files(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".partial"))


# ----- atomic writes -----------------------------------------------------------------------------------------


def test_a_full_disk_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path, disk):
    target = tmp_path / "w.caffemodel"
    net = parse_net(NET)
    write_caffemodel(target, net, {"fc": [np.ones((3, 64), np.float32), np.ones(3, np.float32)]})
    before = target.read_bytes()
    disk.fill(100)
    with pytest.raises(OutputError, match=rf"Cannot write {target}: the folder {tmp_path} has no space left .* "
                                          r"any previous w\.caffemodel is unchanged"):
        write_caffemodel(target, net, {"fc": [np.zeros((3, 64), np.float32), np.zeros(3, np.float32)]})
    assert target.read_bytes() == before
    assert temp_files(tmp_path) == []


def test_a_read_only_folder_is_one_clear_error(tmp_path, disk):
    disk.read_only()
    with pytest.raises(OutputError, match=rf"the folder {tmp_path} is on a read-only file system"):
        write_caffemodel(tmp_path / "w.caffemodel", parse_net(NET), {})
    assert list(tmp_path.iterdir()) == []


# ----- training ----------------------------------------------------------------------------------------------


class At(Hook):
    """Calls ``action(solver)`` at the start of iteration ``iter``."""

    def __init__(self, iter, action):
        self.iter, self.action = iter, action

    def before_step(self, solver):
        if solver.iter == self.iter:
            self.action(solver)


@pytest.mark.parametrize("room", ["none", "caffemodel only"])
def test_a_disk_filling_up_stops_training_at_that_snapshot_and_keeps_the_last_good_one(tmp_path, disk, room):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=8, snapshot=2)
    sizes = {}

    def fill(solver):
        model = tmp_path / "solver_iter_2.caffemodel"
        sizes["model"] = model.stat().st_size
        disk.fill(0 if room == "none" else sizes["model"] + 10)

    solver = Solver(path, metrics=False, hooks=[At(3, fill)])
    with pytest.raises(OutputError, match=r"^Iteration 4: training stopped because its snapshot could not be written\. "
                                          rf"Cannot write .*: the folder {tmp_path} has no space left.* The last good "
                                          rf"snapshot, {tmp_path}/solver_iter_2\.solverstate, is kept"):
        solver.solve()
    assert solver.iter == 4  # stopped at once, not at max_iter
    names = sorted(p.name for p in tmp_path.iterdir() if "_iter_" in p.name)
    assert names == ["solver_iter_2.caffemodel", "solver_iter_2.solverstate"]  # no half pair at 4
    assert temp_files(tmp_path) == []
    disk.free()
    resumed = Solver(path, snapshot=str(tmp_path / "solver_iter_2.solverstate"), metrics=False)
    assert resumed.iter == 2  # the kept snapshot resumes


def test_a_full_disk_at_the_metrics_file_stops_training_at_once(tmp_path, disk):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=8, display=2)
    solver = Solver(path, hooks=[At(3, lambda s: disk.fill(0))])
    with pytest.raises(OutputError, match=r"^Iteration 4: training stopped because the metrics file could not be "
                                          r"written\. Cannot write .*solver\.metrics\.jsonl: .* no space left.* No "
                                          r"snapshot had been written yet"):
        solver.solve()
    assert solver.iter == 4


def test_a_read_only_snapshot_folder_is_found_at_start(tmp_path, disk):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=4, snapshot=2)
    disk.read_only()
    with pytest.raises(OutputError, match=rf"Cannot write {tmp_path}/solver_iter_0\.caffemodel: the folder {tmp_path} "
                                          r"is on a read-only file system"):
        Solver(path, metrics=False)


def test_a_folder_without_room_for_a_snapshot_is_found_at_start(tmp_path, monkeypatch):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=4, snapshot=2)
    from slim.solver import snapshot as snapshot_module
    monkeypatch.setattr(snapshot_module.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10, 10, 100))
    with pytest.raises(OutputError, match=r"a snapshot \(caffemodel and solverstate\) takes about .* KiB, but the "
                                          rf"folder {tmp_path} of snapshot_prefix .* has 100 B free"):
        Solver(path, metrics=False)


# ----- prune and deploy ---------------------------------------------------------------------------------------


@pytest.fixture
def pruneable(tmp_path):
    from slim.net import Net
    model = tmp_path / "net.prototxt"
    model.write_text(NET)
    weights = tmp_path / "net.caffemodel"
    Net(str(model), seed=1).save(weights)
    return model, weights


@pytest.mark.parametrize("failure", ["read_only", "fill"])
def test_prune_to_a_full_or_read_only_folder_is_one_message_and_leaves_nothing(pruneable, tmp_path, disk, capsys,
                                                                               failure):
    model, weights = pruneable
    out = tmp_path / "out"
    out.mkdir()
    getattr(disk, failure)()
    status = main(["prune", "--model", str(model), "--weights", str(weights), "--percent", "0.5", "--output",
                   str(out / "pruned")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("error:") == 1
    assert ("read-only file system" if failure == "read_only" else "no space left") in err
    assert list(out.iterdir()) == []


def test_deploy_to_a_full_disk_is_one_message_and_leaves_nothing(pruneable, tmp_path, disk, capsys):
    model, _ = pruneable
    out = tmp_path / "deploy.prototxt"
    out.write_text("previous")
    disk.fill(0)
    assert main(["deploy", str(model), "--output", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err
    assert out.read_text() == "previous" and temp_files(tmp_path) == []


# ----- a real small file system (tmpfs), where the machine allows mounting one --------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 512 KiB tmpfs at tmp_path/fs, unmounted afterwards; skipped where mounting is not allowed."""
    mount = shutil.which("mount")
    point = tmp_path / "fs"
    point.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(point)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill_up(folder: Path) -> None:
    """Write a file until the file system is full."""
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_on_a_real_tmpfs_filling_up_and_turning_read_only(tmp_path, tmpfs):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=8, snapshot=2,
                        snapshot_prefix=str(tmpfs / "run"))
    solver = Solver(path, metrics=False, hooks=[At(3, lambda s: fill_up(tmpfs))])
    with pytest.raises(OutputError, match=r"^Iteration 4: .*\(No space left on device\).* The last good snapshot"):
        solver.solve()
    assert sorted(p.name for p in tmpfs.iterdir()) == ["ballast", "run_iter_2.caffemodel", "run_iter_2.solverstate"]
    assert read_caffemodel(tmpfs / "run_iter_2.caffemodel").layers  # intact
    with pytest.raises(OutputError, match="has no space left"):  # a full disk is now found at start
        Solver(path, metrics=False)
    (tmpfs / "ballast").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(OutputError, match="is on a read-only file system"):
        Solver(path, metrics=False)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["run_iter_2.caffemodel", "run_iter_2.solverstate"]


# ----- symlinks ------------------------------------------------------------------------------------------------


def test_no_file_slim_writes_follows_a_planted_symlink(tmp_path, caplog):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=4, snapshot=2, display=2)
    for name in ("solver.metrics.jsonl", "solver_iter_2.caffemodel", "solver_iter_2.solverstate",
                 "solver_iter_0.tempfile"):  # the last: Caffe's start-up probe, which slim no longer opens
        (tmp_path / name).symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger="slim"):
        Solver(path).solve()
    assert victim.read_text() == "precious\n"
    for name in ("solver.metrics.jsonl", "solver_iter_2.caffemodel", "solver_iter_2.solverstate"):
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).stat().st_size > 0
    assert "was a symbolic link" in caplog.text
    assert (tmp_path / "solver_iter_0.tempfile").is_symlink()  # untouched


def test_atomic_write_over_a_link_keeps_its_own_mode(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x")
    victim.chmod(0o600)
    link = tmp_path / "out.prototxt"
    link.symlink_to(victim)
    with atomic.atomic_write(link, "w") as f:
        f.write("new")
    assert victim.read_text() == "x" and link.read_text() == "new" and not link.is_symlink()
    umask = os.umask(0)
    os.umask(umask)
    assert link.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_fifo_at_the_metrics_file_is_an_error_not_a_hang(tmp_path):
    fifo = tmp_path / "m.jsonl"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on the FIFO"))
    signal.alarm(10)
    try:
        with pytest.raises(OutputError, match="not a regular file"):
            MetricsFile(fifo).write({"iter": 1})
        MetricsFile(fifo).truncate_from(0)  # reading skips it
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----- leftovers -------------------------------------------------------------------------------------------------


def test_start_up_removes_only_stale_temporary_files_of_its_own_prefix(tmp_path, caplog):
    old = time.time() - 3600
    stale = [".run_iter_4.caffemodel.abcd_123.tmp", ".run_iter_4.solverstate.x1y2z3w4.tmp",
             ".run.metrics.jsonl.qwertyui.tmp"]
    kept = [".run_iter_4.caffemodel.abc.tmp",             # not mkstemp's 8 characters
            ".other_iter_4.caffemodel.abcd1234.tmp",      # another prefix
            ".run_iter_4.caffemodel.abcd1234.tmp.bak",    # not the pattern's end
            "run_iter_4.caffemodel.abcd1234.tmp",         # not hidden
            ".run_iter_x.caffemodel.abcd1234.tmp"]        # not an iteration
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (old, old))
    fresh = tmp_path / ".run_iter_6.caffemodel.fresh123.tmp"   # being written right now
    fresh.write_bytes(b"partial")
    locked = tmp_path / ".run_iter_8.caffemodel.locked12.tmp"  # old, but a live writer holds its lock
    locked.write_bytes(b"partial")
    os.utime(locked, (old, old))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / ".run_iter_9.caffemodel.linkname.tmp"
    link.symlink_to(victim)
    os.utime(link, (old, old), follow_symlinks=False)
    fifo = tmp_path / ".run_iter_10.caffemodel.fifo1234.tmp"  # opening it must not block the start-up
    os.mkfifo(fifo)
    os.utime(fifo, (old, old))
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=2, snapshot=2,
                        snapshot_prefix=str(tmp_path / "run"))
    with open(locked, "rb") as holder, caplog.at_level(logging.WARNING, logger="slim"):
        fcntl.flock(holder, fcntl.LOCK_EX)
        Solver(path, metrics=False)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(stale)
    assert set(kept) | {fresh.name, locked.name, link.name, fifo.name} <= left
    assert victim.read_text() == "precious"
    assert caplog.text.count("left by a snapshot write that was interrupted") == len(stale)


def test_resume_says_which_pair_it_uses_and_announces_weights_without_a_solverstate(tmp_path, caplog):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), max_iter=6, snapshot=2)
    Solver(path, metrics=False).solve()
    (tmp_path / "solver_iter_4.solverstate").unlink()  # as a kill -9 between the two files leaves it
    (tmp_path / "solver_iter_6.solverstate").unlink()
    with caplog.at_level(logging.INFO, logger="slim"):
        Solver(path, snapshot=str(tmp_path / "solver_iter_2.solverstate"), metrics=False)
    assert f"Resuming at iteration 2 from {tmp_path}/solver_iter_2.solverstate with its weights " \
           f"{tmp_path}/solver_iter_2.caffemodel" in caplog.text
    for it in (4, 6):
        assert f"solver_iter_{it}.caffemodel is newer than the snapshot resumed from but has no .solverstate" \
               in caplog.text


# ----- several processes ------------------------------------------------------------------------------------


def test_two_processes_that_diverge_print_one_true_message(tmp_path, capfd):
    path = write_solver(tmp_path, tiny_net(bn=False), base_lr=1e6, momentum=0.0, snapshot=2, max_iter=50)
    with pytest.raises(SolverError, match="training process 0 of 2 exited with status 2"):
        train(TrainConfig(str(path), procs=2, progress=False))
    captured = capfd.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("slim train (process 0): error: Iteration")
    assert "is kept" in errors[0] or "no snapshot was written" in errors[0]


class FillDiskOnRoot(Hook):
    """In the root training process only, the disk fills up at the start of iteration 3."""

    def before_step(self, solver):
        if solver.dist.rank == 0 and solver.iter == 3:
            real, budget = os.fdopen, [0]
            atomic.os.fdopen = lambda fd, *args, **kwargs: _FullDisk(real(fd, *args, **kwargs), budget)


def test_two_processes_stop_together_when_the_roots_disk_fills_up(tmp_path, capfd):
    path = write_solver(tmp_path, tiny_net(batch=4, channels=3), snapshot=2, max_iter=50)
    with pytest.raises(SolverError, match="training process 0 of 2 exited with status 2"):
        train(TrainConfig(str(path), procs=2, hooks=[FillDiskOnRoot()], progress=False))
    captured = capfd.readouterr()
    errors = [line for line in (captured.out + captured.err).splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert errors[0].startswith("slim train (process 0): error: Iteration 4: training stopped because its snapshot "
                                "could not be written") and "solver_iter_2.solverstate, is kept" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir() if "_iter_" in p.name) == [
        "solver_iter_2.caffemodel", "solver_iter_2.solverstate"]
    assert temp_files(tmp_path) == []
