"""slim.threads: the torch thread count from flags, the environment, the cores available and the load."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slim.errors import SlimError
from slim.threads import ThreadChoice, available_cores, choose_threads, use_threads

ROOT = Path(__file__).resolve().parents[1]


def choose(requested=None, procs=1, environ=None, cores=8, load=0.0):
    return choose_threads(requested, procs, environ=environ or {}, cores=(cores, "CPU affinity"), load=load)


def test_idle_machine_uses_every_available_core_shared_among_processes():
    assert choose().threads == 8
    assert choose(procs=3).threads == 2
    assert choose(procs=16).threads == 1
    assert "8 cores by CPU affinity / 3 processes" in choose(procs=3).reason


def test_busy_machine_uses_the_cores_left_idle():
    assert choose(load=5.5).threads == 3
    assert choose(load=0.3).threads == 8                     # a light background load costs no thread
    assert choose(load=7.2).threads == 1
    assert choose(load=9.0).threads == 1
    assert choose(cores=2, load=11.3).threads == 1          # the shared 2-core machine of issue 14
    assert "load average 11.3: busy" in choose(cores=2, load=11.3).reason
    assert choose(procs=2, load=1.0).threads == 4            # the share, when more is idle


def test_flag_then_slim_threads_then_omp_num_threads_win():
    env = {"SLIM_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert choose(2, environ=env, load=100) == ThreadChoice(2, "--threads")
    assert choose(environ=env, load=100).threads == 3
    assert choose(environ={"OMP_NUM_THREADS": "5"}, load=100).threads == 5


@pytest.mark.parametrize("requested,env", [(0, {}), (-1, {}), (None, {"SLIM_THREADS": "two"}),
                                           (None, {"SLIM_THREADS": "0"})])
def test_bad_counts_are_refused(requested, env):
    with pytest.raises(SlimError, match="positive number of threads"):
        choose(requested, environ=env)


def test_available_cores_is_at_least_one_and_at_most_the_machine():
    cores, how = available_cores()
    assert 1 <= cores <= (os.cpu_count() or cores) and how


def test_use_threads_sets_torch_when_loaded():
    import torch
    before = torch.get_num_threads()
    try:
        use_threads(ThreadChoice(1, "test"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_commands_apply_the_choice_before_torch_loads():
    code = ("import sys, os; from slim.cli import main; "
            "rc = main(['calflop', 'nets/demo_digits_deploy.prototxt', '--measure', '--repeats', '1', "
            "'--warmup', '0', '--threads', '1', '--json']); "
            "import torch; assert torch.get_num_threads() == 1, torch.get_num_threads(); "
            "assert os.environ['OMP_NUM_THREADS'] == '1'; sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLIM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr


def test_train_logs_the_choice(tmp_path, capsys):
    import torch
    from slim.cli import main
    from slim.solver.logs import reset_logging
    from solver_helpers import tiny_net, write_solver
    before = torch.get_num_threads()
    path = write_solver(tmp_path, tiny_net(), max_iter=1, display=1, test_iter=1, test_interval=100)
    try:
        assert main(["train", "--solver", str(path), "--threads", "1"]) == 0
        assert "Using 1 torch thread (--threads)" in capsys.readouterr().out
        assert torch.get_num_threads() == 1
    finally:
        reset_logging()
        torch.set_num_threads(before)
