"""Several training processes (gloo on the CPU): Caffe's gradient averaging, exact resumption, failures."""

import time

import numpy as np
import pytest

from slim.errors import SolverError
from slim.io import read_caffemodel, read_solverstate
from slim.solver import Hook, Solver, TrainConfig, train
from slim.solver.distributed import GradientReducer, _flat_buckets
from solver_helpers import tiny_net, write_solver


def blobs(path):
    return {layer.name: [np.array(b) for b in layer.blobs] for layer in read_caffemodel(path).layers if layer.blobs}


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    # No BatchNorm (per-process batch statistics would differ) and no random transforms. With shuffle off, rank r
    # reads samples r, r+2, r+4, ... so the two batches of 8 hold the same digits as one batch of 16.
    fields = dict(max_iter=5, lr_policy="step", gamma=0.5, stepsize=2, snapshot_after_train=True, display=1)
    two = write_solver(tmp_path, tiny_net(batch=8, bn=False, shuffle=False), name="two", **fields)
    one = write_solver(tmp_path, tiny_net(batch=16, bn=False, shuffle=False), name="one", **fields)
    train(TrainConfig(str(two), procs=2, progress=False))
    Solver(one, metrics=False).solve()
    a, b = blobs(tmp_path / "two_iter_5.caffemodel"), blobs(tmp_path / "one_iter_5.caffemodel")
    assert a.keys() == b.keys() == {"conv", "ip"}
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)
    assert read_solverstate(tmp_path / "two_iter_5.solverstate")[0].slim_state.world_size == 2


def test_two_processes_stopped_and_resumed_end_with_identical_weights(tmp_path):
    text = tiny_net(crop=6, mirror=True, dropout=0.3)
    fields = dict(lr_policy="multistep", gamma=0.5, stepvalue=[2, 5], max_iter=8, snapshot=4, average_loss=2,
                  snapshot_after_train=True)
    full = write_solver(tmp_path, text, name="full", **fields)
    train(TrainConfig(str(full), procs=2, progress=False))
    resumed = write_solver(tmp_path, text, name="resumed", **fields)
    start = str(tmp_path / "full_iter_4.solverstate")
    train(TrainConfig(str(resumed), snapshot=start, procs=2, progress=False))
    a, b = blobs(tmp_path / "full_iter_8.caffemodel"), blobs(tmp_path / "resumed_iter_8.caffemodel")
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert np.array_equal(x, y), name
    state = read_solverstate(start)[0].slim_state
    assert len(state.torch_rng_state) == 2 * 5056  # one generator state per process
    # The same snapshot cannot resume in one process: shards and random streams depend on the process count.
    with pytest.raises(SolverError, match="trained by 2 process"):
        Solver(resumed, snapshot=start, metrics=False)


class FailOnRank1(Hook):
    """Raises on rank 1 at iteration 2, inside the part of the iteration whose failures are shared."""

    def before_step(self, solver):
        if solver.dist.rank == 1 and solver.iter == 2:
            raise RuntimeError("simulated failure on rank 1")


def test_a_failure_on_one_process_stops_all_of_them(tmp_path, capfd):
    path = write_solver(tmp_path, tiny_net(), max_iter=1000)
    start = time.monotonic()
    with pytest.raises(SolverError, match="training process [01] of 2 (exited with status|failed)"):
        train(TrainConfig(str(path), procs=2, hooks=[FailOnRank1()], progress=False))
    assert time.monotonic() - start < 60  # nobody waited for the 30-minute collective timeout
    captured = capfd.readouterr()
    assert "process 1 failed: simulated failure on rank 1" in captured.out + captured.err


def test_buckets_are_few_and_respect_their_size():
    import torch
    tensors = [torch.zeros(n) for n in (10, 20, 5, 100, 1)]
    assert _flat_buckets(tensors, 30 * 4) == [[0, 1], [2], [3], [4]]
    assert _flat_buckets(tensors, 1 << 20) == [[0, 1, 2, 3, 4]]
    assert GradientReducer.__doc__  # the reducer itself runs in the tests above


def test_torchrun_places_each_process_from_the_environment(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from slim.solver.distributed import free_port
    path = write_solver(tmp_path, tiny_net(), max_iter=3, snapshot_after_train=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "slim", "train", "--solver", str(path), "--quiet"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    state = read_solverstate(tmp_path / "solver_iter_3.solverstate")[0]
    assert state.iter == 3 and state.slim_state.world_size == 2
