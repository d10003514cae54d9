"""slim demo and slim pipeline, end to end on the built-in digits with very short training."""

import json
import re
import shutil
from pathlib import Path

import pytest

from slim.cli import main
from slim.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_writes_its_files(tmp_path):
    result = run_demo(tmp_path / "demo", max_iter=24, measure_repeats=2, echo=lambda *a: None)
    names = [s.name for s in result.stages]
    assert names == ["baseline", "sparse", "pruned (no fine-tune)", "pruned + absorb-bias", "fine-tuned"]
    assert all(0.0 <= s.accuracy <= 1.0 for s in result.stages)
    base, last = result.stages[0], result.stages[-1]
    assert last.params < base.params and last.macs < base.macs
    assert result.pruned_fraction == pytest.approx(0.6, abs=0.01)
    assert result.theoretical_speedup == pytest.approx(base.macs / last.macs)
    assert all(s.latency_ms > 0 and s.speedup > 0 for s in result.stages)
    report = json.loads(Path(result.files["report"]).read_text())
    assert [s["name"] for s in report["stages"]] == names
    for key in ("net", "baseline", "sparse", "pruned", "pruned_caffemodel", "pruned_report", "finetune", "plots"):
        assert Path(result.files[key]).exists(), key
    table = result.table()
    assert "fine-tuned" in table and "theoretical speed-up" in table


def test_demo_command_checks_its_flags(capsys):
    assert main(["demo", "--percent", "1.5"]) == 2
    assert "--percent" in capsys.readouterr().err


@pytest.fixture
def _logging():
    from slim.solver.logs import reset_logging
    yield
    reset_logging()  # the pipeline installs a stdout handler; do not leave it pointing at a captured stream


def test_pipeline_two_passes(tmp_path, monkeypatch, capsys, _logging):
    from slim.io import read_solver, write_solver
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets").mkdir()
    shutil.copy(ROOT / "nets" / "demo_digits.prototxt", tmp_path / "nets")
    for stage in ("sparse", "finetune"):
        s = read_solver(ROOT / "solvers" / f"demo_digits_{stage}.prototxt")
        s.max_iter, s.test_interval, s.display = 12, 6, 6
        del s.stepvalue[:]
        s.stepvalue.extend([6, 9])
        write_solver(s, tmp_path / f"{stage}.prototxt")
    assert main(["pipeline", "--solver", "sparse.prototxt", "--finetune-solver", "finetune.prototxt",
                 "--percent", "0.3", "--passes", "2", "--max-prune-per-layer", "0.5", "--out", "out"]) == 0
    report = json.loads((tmp_path / "out" / "pipeline_report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == [1, 2]
    first, second = report["passes"]
    assert second["params"] < first["params"] < report["baseline"]["params"]
    assert "accuracy" in first["finetune_test"][0]
    assert Path(second["files"]["prototxt"]).exists() and Path(second["files"]["finetune"]).exists()
    # One logging path: Caffe's glog lines (parse_log reads them), and each test once (no second test at the end).
    out = capsys.readouterr().out
    testing = [line for line in out.splitlines() if "Testing net" in line]
    assert testing and all(re.match(r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] Iteration", l) for l in testing)
    # Per pass: sparse training tests at 6 and 12 (not at 0: test_initialization false), fine-tuning at 0, 6, 12.
    assert len(testing) == 2 * (2 + 3)


def test_pipeline_reads_a_caffe_forks_files_with_allow_unknown_fields(tmp_path, monkeypatch, capsys, _logging):
    # The parse error advises --allow-unknown-fields; slim pipeline takes it, and the net it writes as read (fork
    # fields dropped) runs again strictly.
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from solver_helpers import tiny_net

    from slim.io import read_net

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(tiny_net().replace('name: "ip"', 'name: "ip" fork_only_param { x: 1 }'))
    common = ('net: "net.prototxt"\ntest_iter: 1\ntest_interval: 3\nmax_iter: 3\nlr_policy: "fixed"\n'
              'momentum: 0.9\nrandom_seed: 1\ntest_initialization: false\nfork_solver_field: 2\n')
    (tmp_path / "sparse.prototxt").write_text(common + "base_lr: 0.1\nsparsity { penalty: 0.01 }\n")
    (tmp_path / "finetune.prototxt").write_text(common + "base_lr: 0.01\n")
    argv = ["pipeline", "--solver", "sparse.prototxt", "--finetune-solver", "finetune.prototxt", "--percent", "0.3",
            "--out", "out"]
    assert main(argv) == 2
    assert "--allow-unknown-fields" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(argv + ["--allow-unknown-fields"]) == 0
    report = json.loads((tmp_path / "out" / "pipeline_report.json").read_text())
    assert report["passes"][0]["params"] < report["baseline"]["params"]
    for path in (tmp_path / "out" / "input_net.prototxt", report["passes"][0]["files"]["prototxt"]):
        assert "fork_only_param" not in Path(path).read_text() and read_net(path).layer


def test_pipeline_with_source_flags(tmp_path, monkeypatch, capsys, _logging):
    # The net names LMDBs that are not here; --source points the pipeline at local ones, and every file it writes
    # (the input net, the pruned nets, the solvers) then runs again without the flags.
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from solver_helpers import lmdb_tiny_net

    from slim.io import read_net, read_solver
    from slim.solver.nets import solver_nets

    monkeypatch.chdir(tmp_path)
    text, train_db, test_db = lmdb_tiny_net(tmp_path)
    (tmp_path / "net.prototxt").write_text(text)
    common = ('net: "net.prototxt"\ntest_iter: 1\ntest_interval: 3\nmax_iter: 3\nlr_policy: "fixed"\n'
              'momentum: 0.9\nrandom_seed: 1\ntest_initialization: false\n')
    (tmp_path / "sparse.prototxt").write_text(common + "base_lr: 0.1\nsparsity { penalty: 0.01 }\n")
    (tmp_path / "finetune.prototxt").write_text(common + "base_lr: 0.01\n")
    argv = ["pipeline", "--solver", "sparse.prototxt", "--finetune-solver", "finetune.prototxt", "--percent", "0.3",
            "--out", "out", "--source", f"data@TRAIN={train_db}"]
    assert main(argv + ["--source", f"data@TSET={test_db}"]) == 2
    assert "is not LAYER=PATH or LAYER@PHASE=PATH" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(argv + ["--source", f"data@TEST={test_db}"]) == 0
    report = json.loads((tmp_path / "out" / "pipeline_report.json").read_text())
    assert report["sources"] == [f"data@TRAIN={train_db}", f"data@TEST={test_db}"]
    assert report["baseline"]["net"] == "net.prototxt" and report["passes"][0]["params"] < report["baseline"]["params"]
    written = [read_net(tmp_path / "out" / "input_net.prototxt"), read_net(report["passes"][0]["files"]["prototxt"])]
    finetune = read_solver(tmp_path / "out" / "pass1_finetune_solver.prototxt")
    written.append(solver_nets(finetune, str(tmp_path / "out" / "pass1_finetune_solver.prototxt")).train.net)
    for net in written:
        assert [lp.data_param.source for lp in net.layer if lp.type == "Data"] == [train_db, test_db]


def _fake_result():
    from types import SimpleNamespace
    layers = [SimpleNamespace(name="conv1", before=8, after=3), SimpleNamespace(name="conv2", before=16, after=6)]
    return SimpleNamespace(report=SimpleNamespace(layers=layers, cut={"threshold": 0.05}))


CURVES = {"baseline": [{"kind": "train", "iter": 20, "loss": 2.0}, {"kind": "train", "iter": 40, "loss": 1.0},
                       {"kind": "test", "iter": 40, "outputs": {"accuracy": 0.8, "loss": 0.9}}],
          "sparse": [{"kind": "train", "iter": 20, "loss": 2.5}, {"kind": "test", "iter": 40,
                                                                   "outputs": {"accuracy": 0.7}}]}


def test_demo_plots_label_every_axis_and_mark_the_threshold(tmp_path):
    # The first hour of a real user: the PNG had no axis labels, no threshold and no accuracy panel.
    import numpy as np
    plt = pytest.importorskip("matplotlib.pyplot")
    from slim.demo import _figure
    before, after = np.random.default_rng(0).uniform(0, 1, 24), np.r_[np.zeros(14), np.ones(10)]
    fig = _figure(plt, before, after, _fake_result(), CURVES)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["channel scaling factors", "channels per layer", "training loss", "test accuracy"]
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
        marker = [line for line in fig.axes[0].get_lines() if "threshold" in str(line.get_label())]
        assert len(marker) == 1 and marker[0].get_xdata()[0] == 0.05
        accuracy = {line.get_label(): list(line.get_ydata()) for line in fig.axes[3].get_lines()}
        assert accuracy == {"baseline": [0.8], "sparse": [0.7]}
    finally:
        plt.close(fig)


def test_demo_text_plots_say_the_threshold_and_the_accuracy(tmp_path, monkeypatch):
    import builtins

    import numpy as np
    from slim.demo import _plots
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = _plots(tmp_path, np.ones(4), np.zeros(4), _fake_result(), CURVES)
    text = Path(path).read_text()
    assert path.endswith(".txt") and "prune threshold: |gamma| <= 0.05 removed" in text
    assert "test accuracy, baseline:" in text and "accuracy 0.8000" in text
