"""benchmarks/bench_fashion.py's quick path on a tiny MNIST-format dataset written here: the split, the rows at
matched MACs, the outputs, the cache, and the lambda chosen on the validation split."""

import csv
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_fashion  # noqa: E402


def idx_bytes(array):
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def tiny_fashion(folder: Path, n_train=260, n_test=100, size=12, seed=0):
    """Noisy images whose class is a bright 3x3 block at a class-dependent place: learnable in a few iterations.
    12x12 rather than 28x28 keeps the test fast; the benchmark's nets follow the files' image size."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        for i, k in enumerate(labels):
            row, col = 3 * (k // 4), 3 * (k % 4)
            images[i, row:row + 3, col:col + 3] = 250
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
        out[prefix] = images, labels
    return out


ARGS = ["--quick", "--epochs", "1", "--finetune-epochs", "1", "--val", "60", "--train-limit", "0",
        "--methods", "slimming", "l1", "--repeats", "2", "--threads", "1"]  # 1 thread: robust on a busy machine


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    source = tiny_fashion(root / "data")
    out = root / "out"
    assert bench_fashion.main(ARGS + ["--data", str(root / "data"), "--out", str(out), "--lambdas", "1e-3",
                                      "1e-2"]) == 0
    return root, source, out, json.loads((out / "results.json").read_text())


def test_split_holds_out_validation(bench_run):
    from slim.data.idx import read_idx

    _, source, out, results = bench_run
    train, val = (read_idx(out / "data" / f"{k}-images-idx3-ubyte") for k in ("train", "val"))
    assert (len(train), len(val)) == (200, 60)
    # Train and validation partition the source's training set (as multisets of images), and never touch t10k.
    rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert rows(np.concatenate([train, val])) == rows(source["train"][0])
    assert results["splits"]["test"]["count"] == 100 and results["splits"]["test"]["images"].endswith(
        "t10k-images-idx3-ubyte.gz")


def test_rows_match_macs_and_levels(bench_run):
    from slim.deploy import make_deploy
    from slim.flops import calflop
    from slim.io import read_net

    _, _, _, results = bench_run
    rows = {(r["method"], r["level"]): r for r in results["rows"]}
    assert set(rows) == {(m, p) for m in ("slimming", "l1") for p in (0.5, 0.7)}
    base_macs = results["baseline"]["macs"]
    assert base_macs < 7.34e6 / 4  # the 12x12 images' net, not the zoo's 28x28 one
    for level in (0.5, 0.7):
        ref, l1 = rows["slimming", level], rows["l1", level]
        assert abs(ref["fraction"] - level) < 0.02  # a global percent over the prunable channels
        assert abs(l1["macs"] - ref["macs"]) <= 0.01 * ref["macs"]  # the target-MACs policy, within 1%
        assert ref["source"] == "sparse" and l1["source"] == "baseline"
        for row in (ref, l1):
            assert row["macs"] < base_macs and row["params"] < results["baseline"]["params"]
            # The reported figures are those of the pruned prototxt written to disk.
            cost = calflop(make_deploy(read_net(row["prototxt"])))
            assert (cost.params, cost.macs("conv+fc")) == (row["params"], row["macs"])
            assert 0 <= row["test"] <= 1 and 0 <= row["val"] <= 1
    assert rows["slimming", 0.7]["macs"] < rows["slimming", 0.5]["macs"]


def test_lambda_is_chosen_on_validation(bench_run):
    _, _, _, results = bench_run
    sel = results["selection"]
    assert [t["lambda"] for t in sel["trials"]] == [1e-3, 1e-2] and sel["level"] == 0.7
    best = max(sel["trials"], key=lambda t: (t["pruned_val"], -t["lambda"]))
    assert results["lambda"] == sel["chosen"] == best["lambda"]
    assert all("test" not in key for t in sel["trials"] for key in t)  # no test figure enters the choice


def test_outputs(bench_run):
    _, _, out, results = bench_run
    table = (out / "table.md").read_text()
    assert "| Model | Test error (%) | Parameters | Pruned | MACs (conv+FC) | Pruned |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert sum("channels pruned, slimming" in line for line in lines) == 2
    assert sum("l1, same MACs as" in line for line in lines) == 2
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 2 + 4  # baseline, sparse, 2 methods x 2 levels (one seed)
    lat = results["latency"]
    assert len(lat["1"]["rows"]) == len(lat["64"]["rows"]) == 4 and min(lat["1"]["rows"]) > 0
    assert [g["goal"] for g in results["goals"]][0].startswith("baseline")
    assert results["seeds_done"] == 1 and "partial" not in table
    import _fashion_report
    cut_short = dict(results, settings=dict(results["settings"], seeds=2))  # as written after seed 0 of 2
    assert "(partial: 1 of 2 seeds done)" in _fashion_report.table(cut_short)
    pytest.importorskip("matplotlib")
    assert (out / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_the_trained_models(bench_run, capsys):
    root, _, out, results = bench_run
    # One seed: the baseline, a sparse model per lambda, the selection's fine-tunes of slimming at 70% per lambda,
    # then the other three rows (slimming at 70% with the chosen lambda is the selection's, reused).
    assert results["trained_now"] == 1 + 2 + 2 + 3
    assert bench_fashion.main(ARGS + ["--data", str(root / "data"), "--out", str(out), "--lambdas", "1e-3",
                                      "1e-2"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["trained_now"] == 0
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in results["rows"]]
    log = capsys.readouterr().out
    assert "): training" not in log
    assert log.count("cached prune") == 2 + 4  # nor pruned again: the selection's two and the four rows


def test_bad_data_folder(tmp_path, capsys):
    assert bench_fashion.main(ARGS + ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_solver_files_are_the_benchmarks_settings():
    """solvers/*_fashion_*.prototxt are the full mode's schedule on all 60,000 training images, so what a user runs
    by hand is what the benchmark measured."""
    import math

    from slim.io import read_solver

    full = bench_fashion.FULL
    root = BENCH.parent
    for net in ("vgg7_fashion", "resnet20_fashion"):
        paper = 1e-4 if net.startswith("vgg") else 1e-5
        stages = {"baseline": (full.epochs, full.base_lr, 0.0), "sparse": (full.epochs, full.base_lr, paper),
                  "finetune": (full.finetune_epochs, full.finetune_lr, 0.0)}
        if net == "vgg7_fashion":
            stages["sparse_tuned"] = (full.epochs, full.base_lr, bench_fashion.QUICK.lambdas[0])
            assert bench_fashion.QUICK.lambdas[0] in full.lambdas and paper in full.lambdas
        for stage, (epochs, lr, penalty) in stages.items():
            path = root / "solvers" / f"{net}_{stage}.prototxt"
            got = read_solver(path)
            want = bench_fashion.make_solver("x", math.ceil(epochs * 60000 / full.batch), lr, full.weight_decay,
                                             penalty, 1, "x")
            for field in ("base_lr", "lr_policy", "gamma", "stepvalue", "max_iter", "momentum", "weight_decay",
                          "type", "sparsity"):
                assert getattr(got, field) == getattr(want, field), (path.name, field)
            assert list(got.test_iter) == [100] and got.test_interval == 938, path.name
            assert got.net == ("pruned.prototxt" if stage == "finetune" else f"nets/{net}.prototxt")


def test_a_failing_method_is_reported_and_left_out(tmp_path, monkeypatch):
    """A method that fails (the lasso being built, say) costs its rows, not the run; the table says so."""
    from slim.errors import PruneError
    from slim.prune import importance

    def boom(group, blobs):
        raise PruneError("boom: not built yet")

    monkeypatch.setitem(importance._CRITERIA, "boom", boom)
    tiny_fashion(tmp_path / "data")
    args = ARGS[:ARGS.index("--methods")] + ["--methods", "slimming", "boom", "--repeats", "1", "--threads", "1"]
    assert bench_fashion.main(args + ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                                      "--levels", "0.5", "--lambdas", "1e-3"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["slimming"]
    assert "boom: not built yet" in results["failed"]["boom"]
    assert "**boom failed and is left out of the table**" in (tmp_path / "out" / "table.md").read_text()
