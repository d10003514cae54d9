"""``slim train`` and ``slim test`` (caffe train / caffe test), tools/solve.py, the demo's solver, and ``--source``
on the commands that read data."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slim.cli import main
from slim.io import read_solver
from slim.solver import Solver
from slim.solver.logs import reset_logging
from solver_helpers import lmdb_tiny_net, tiny_net, write_solver

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _logging():
    yield
    reset_logging()  # the commands install a stdout handler; do not leave it pointing at a captured stream


def test_train_runs_to_the_end_with_caffes_lines(tmp_path, capsys):
    path = write_solver(tmp_path, tiny_net(), max_iter=4, display=2, test_iter=1, test_interval=4,
                        snapshot_after_train=True)
    assert main(["train", "--solver", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Solving tiny" in out and "Iteration 2, lr = 0.1" in out and "Test net output #0: acc = " in out
    assert out.rstrip().endswith("Optimization Done.")
    assert (tmp_path / "solver_iter_4.caffemodel").exists() and (tmp_path / "solver_iter_4.solverstate").exists()
    # Resume from the final snapshot: nothing left to train, the run ends at once.
    assert main(["train", "--solver", str(path), "--snapshot", str(tmp_path / "solver_iter_4.solverstate")]) == 0
    assert "Restoring previous solver status" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--weights", "a.caffemodel", "--snapshot", "b.solverstate"], "--weights and --snapshot were both given"),
    (["--gpus", "0", "--procs", "2"], "--gpus and --procs were both given"),
    (["--gpus", "x"], "--gpus must be 'all' or comma-separated GPU ids"),
    (["--snapshot", "missing.solverstate"], "--snapshot missing.solverstate does not exist"),
])
def test_train_flag_errors_are_one_line_with_status_2(tmp_path, capsys, args, message):
    path = write_solver(tmp_path, tiny_net())
    assert main(["train", "--solver", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("slim train: error: ")


def test_train_without_cuda_refuses_gpus(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_solver(tmp_path, tiny_net())
    assert main(["train", "--solver", str(path), "--gpus", "all"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_test_prints_each_batch_and_the_means(tmp_path, capsys):
    path = write_solver(tmp_path, tiny_net(test_batch=60), max_iter=2, snapshot_after_train=True)
    Solver(path, metrics=False).solve()
    net = tmp_path / "solver_net.prototxt"
    assert main(["test", "--model", str(net), "--weights", str(tmp_path / "solver_iter_2.caffemodel"),
                 "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "Running for 3 iterations." in out
    batches = [float(v) for v in re.findall(r"Batch \d, acc = ([\d.e+-]+)", out)]
    losses = [float(v) for v in re.findall(r"Batch \d, loss = ([\d.e+-]+)", out)]
    assert len(batches) == len(losses) == 3
    mean_acc = float(re.search(r"\] acc = ([\d.e+-]+)", out).group(1))
    mean_loss = re.search(r"\] loss = ([\d.e+-]+) \(\* 1 = ([\d.e+-]+) loss\)", out)
    assert mean_acc == pytest.approx(np.mean(batches), rel=1e-5)
    assert float(mean_loss.group(1)) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(re.search(r"Loss: ([\d.e+-]+)", out).group(1)) == pytest.approx(np.mean(losses), rel=1e-5)
    assert main(["test", "--model", str(net), "--weights", ""]) == 2


def test_test_and_train_refuse_weights_of_another_net(tmp_path, capsys):
    # The first hour of a real user: `slim test` with an unrelated caffemodel scored a random net and exited 0.
    from slim.net import Net
    other = tmp_path / "other.prototxt"
    renamed = tiny_net()
    for name in ("conv", "bn", "scale", "ip"):
        renamed = renamed.replace(f'name: "{name}"', f'name: "other_{name}"')
    other.write_text(renamed)
    Net(str(other), seed=0).save(tmp_path / "other.caffemodel")
    path = write_solver(tmp_path, tiny_net())
    net = tmp_path / "solver_net.prototxt"
    for argv in (["test", "--model", str(net), "--iterations", "1"], ["train", "--solver", str(path)]):
        assert main([*argv, "--weights", str(tmp_path / "other.caffemodel")]) == 2
        err = capsys.readouterr().err
        assert "holds no weights for any layer" in err and "Traceback" not in err, err


def test_a_solverstate_as_weights_and_a_caffemodel_as_snapshot_are_named(tmp_path, capsys):
    # The first hour of a real user: either swap was reported as "truncated or corrupt; re-download it".
    path = write_solver(tmp_path, tiny_net(), max_iter=2, snapshot_after_train=True)
    Solver(path, metrics=False).solve()
    state, weights = tmp_path / "solver_iter_2.solverstate", tmp_path / "solver_iter_2.caffemodel"
    assert main(["test", "--model", str(tmp_path / "solver_net.prototxt"), "--weights", str(state)]) == 2
    err = capsys.readouterr().err
    assert "This is a .solverstate (a solver snapshot at iteration 2), not a caffemodel" in err
    assert f"fine-tune from the weights it names, {weights}, with --weights" in err and "re-download" not in err
    assert main(["train", "--solver", str(path), "--snapshot", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "This is a .caffemodel (the weights of net tiny), not a solverstate: pass it as --weights" in err
    assert "re-download" not in err


def test_training_logs_the_effective_batch(tmp_path, capsys):
    # Caffe's rule multiplies the batch by the processes (and iter_size); the log says so at the start.
    path = write_solver(tmp_path, tiny_net(batch=16), max_iter=1, iter_size=2)
    assert main(["train", "--solver", str(path)]) == 0
    assert "Effective batch: 32 images per update (batch 16 x 1 process x iter_size 2)" in capsys.readouterr().out


def test_nan_scores_are_wrong_and_a_nan_test_output_is_flagged(tmp_path, caplog):
    # The first hour of a real user: ResNet-164's iteration-0 test printed accuracy = 1 beside loss = nan, because
    # NaN logits passed Accuracy (as in Caffe, where NaN compares false).
    import torch

    from slim.io import parse_net
    from slim.net import Net
    net = Net(parse_net("""
        layer { name: "in" type: "Input" top: "s" top: "l" input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
        layer { name: "acc" type: "Accuracy" bottom: "s" bottom: "l" top: "acc" }"""))
    scores = torch.tensor([[3.0, 1, 0], [float("nan")] * 3, [0, float("nan"), 5], [0, 2, 1]])
    assert float(net(s=scores, l=torch.tensor([0.0, 0, 2, 1]))["acc"]) == 0.5     # rows 0 and 3 right, 1 and 2 NaN
    broken = tiny_net().replace('bottom: "ip" bottom: "label" top: "loss"', 'bottom: "nan" bottom: "label" top: "loss"')
    broken = broken.replace('bottom: "ip" bottom: "label" top: "acc"', 'bottom: "nan" bottom: "label" top: "acc"')
    broken = broken.replace('layer { name: "loss"', 'layer { name: "sqrt" type: "Power" bottom: "ip" top: "nan" '
                            'power_param { power: 0.5 scale: -1 shift: -1000 } }\nlayer { name: "loss"')
    path = write_solver(tmp_path, broken, test_iter=1, test_interval=1)
    with caplog.at_level("INFO", logger="slim"):
        Solver(path, metrics=False).test(0)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith("Test net output #0: acc = 0") for m in messages), messages
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "loss not finite" in warning[0] and "test_initialization: false" in warning[0]


def test_the_zoo_solvers_that_train_from_scratch_skip_the_iteration_0_test():
    # An untrained net's BatchNorm has no statistics: the iteration-0 test is NaN noise.
    for path in sorted((ROOT / "solvers").glob("*.prototxt")):
        if path.name.startswith(("vgg19", "resnet164", "densenet40", "demo_digits")) and "finetune" not in path.name:
            assert read_solver(path).test_initialization is False, path.name


def test_tools_solve_is_the_train_command(tmp_path):
    path = write_solver(tmp_path, tiny_net(), max_iter=2, snapshot_after_train=True)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "solve.py"), "--solver", str(path), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "solver_iter_2.caffemodel").exists()


def test_the_demo_baseline_solver_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # net paths are read from the working directory, as Caffe
    param = read_solver("solvers/demo_digits_baseline.prototxt")
    assert param.max_iter == 800 and param.net == "nets/demo_digits.prototxt"
    param.max_iter, param.test_interval = 20, 20
    param.snapshot_prefix = str(tmp_path / "demo")
    solver = Solver(param, solver_path="solvers/demo_digits_baseline.prototxt")
    solver.param.test_initialization = False
    solver.solve()
    ev = solver.test(0)
    assert ev.as_dict()["accuracy"] > 0.5 and solver.loss < 1.5  # chance is 0.1 and 2.3
    assert (tmp_path / "demo_iter_20.caffemodel").exists()


def test_source_points_data_layers_elsewhere_without_editing_the_net(tmp_path, capsys):
    # A net made elsewhere names LMDBs that are not on this machine; --source runs it on the local ones, unedited.
    text, train_db, test_db = lmdb_tiny_net(tmp_path)
    path = write_solver(tmp_path, text, max_iter=2, test_iter=1, test_interval=2, snapshot_after_train=True)
    net = tmp_path / "solver_net.prototxt"
    assert main(["train", "--solver", str(path)]) == 2
    assert "examples/digits/train_lmdb' (data_param.source) does not exist" in capsys.readouterr().err
    # Caffe's single-dash spelling works for the new flag too.
    assert main(["train", "--solver", str(path), "--source", f"data@TRAIN={train_db}", "-source",
                 f"data@TEST={test_db}"]) == 0
    out = capsys.readouterr().out
    assert "Test net output #0: acc = " in out and out.rstrip().endswith("Optimization Done.")
    assert "examples/digits/train_lmdb" in net.read_text()  # the prototxt was not rewritten
    weights = str(tmp_path / "solver_iter_2.caffemodel")
    assert main(["test", str(net), "--weights", weights, "--iterations", "1", "--source", f"data@TEST={test_db}"]) == 0
    assert "Batch 0, acc = " in capsys.readouterr().out
    assert main(["time", str(net), "--iterations", "1", "--source", f"data@TRAIN={train_db}"]) == 0
    assert "Average Forward pass" in capsys.readouterr().out


def test_train_reads_a_caffe_forks_files_with_allow_unknown_fields(tmp_path, capsys):
    # The first hour of a real user: the parse error advised --allow-unknown-fields, which slim train lacked.
    # Fork-only fields in the solver and in its net: refused with that advice, then trained once the flag is given,
    # as the same files without those fields train.
    text = tiny_net().replace('name: "ip"', 'name: "ip" fork_only_param { keep: true }', 1)
    assert "fork_only_param" in text
    path = write_solver(tmp_path, text, max_iter=2, snapshot_after_train=True)
    path.write_text(path.read_text() + "fork_solver_field: 7\n")
    assert main(["train", "--solver", str(path)]) == 2
    err = capsys.readouterr().err
    assert 'no field named "fork_solver_field"' in err and "--allow-unknown-fields" in err, err
    assert main(["train", "--solver", str(path), "--allow-unknown-fields"]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip().endswith("Optimization Done.")
    # Each skip is said, as one line in slim's own form (not Python's warning with its source line).
    assert re.search(r"slim train: warning: .*solver.prototxt: skipped 1 field.*fork_solver_field", captured.err)
    assert re.search(r"slim train: warning: .*solver_net.prototxt: skipped 1 field.*fork_only_param", captured.err)
    assert "UnknownFieldWarning" not in captured.err
    clean = tmp_path / "clean"
    clean.mkdir()
    assert main(["train", "--solver", str(write_solver(clean, tiny_net(), max_iter=2, snapshot_after_train=True))]) == 0
    from slim.io import read_caffemodel
    forked, plain = (read_caffemodel(folder / "solver_iter_2.caffemodel") for folder in (tmp_path, clean))
    assert [layer.name for layer in forked.layers] == [layer.name for layer in plain.layers]
    for a, b in zip(forked.layers, plain.layers):
        assert all(np.array_equal(x, y) for x, y in zip(a.blobs, b.blobs)), a.name


@pytest.mark.parametrize("command", ["train", "test", "time"])
def test_a_source_flag_for_no_data_layer_is_one_clear_error(tmp_path, capsys, command):
    text, _, test_db = lmdb_tiny_net(tmp_path)
    path = write_solver(tmp_path, text)
    argv = {"train": ["train", "--solver", str(path)],
            "test": ["test", str(tmp_path / "solver_net.prototxt"), "--weights", "w.caffemodel"],
            "time": ["time", str(tmp_path / "solver_net.prototxt")]}[command]
    assert main([*argv, "--source", f"dat={test_db}"]) == 2
    err = capsys.readouterr().err
    assert f"--source dat={test_db}: there is no layer named 'dat'. The data layers are: 'data' (Data, TRAIN, " \
           "data_param.source 'examples/digits/train_lmdb'), 'data' (Data, TEST, data_param.source " \
           "'examples/digits/test_lmdb')." in err and "Traceback" not in err, err
    assert main([*argv, "--source", f"data={test_db}"]) == 2
    assert "is ambiguous: 2 layers are named 'data' (Data in TRAIN, Data in TEST). Say which with --source " \
           f"data@TRAIN={test_db} or --source data@TEST={test_db}" in capsys.readouterr().err
