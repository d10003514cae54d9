"""Benchmark: LASSO channel pruning against l1 filter norms and network slimming's |gamma| on the same normally
trained (not sparse) weights, at 2x and 4x fewer conv+FC MACs, on Fashion-MNIST: test accuracy before and after the
same fine-tune, with lasso's per-layer reconstruction errors.

It reuses bench_fashion's data split (5,000 training images held out for validation, the test set only reported),
its solver recipe and its model cache: with the same ``--out`` and mode, the baseline bench_fashion trained is reused,
not retrained. Every method prunes that baseline with ``--speedup S`` (within 1%); lasso calibrates on 5,000
training images of the net's own data layer (the paper's setting). All pruned nets are fine-tuned with one schedule.

Usage:
    python benchmarks/bench_lasso_quality.py --quick --out /work/fashion_quick
    python benchmarks/bench_lasso_quality.py --out /work/fashion_full          # bench_fashion's full settings
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fashion as bf  # noqa: E402

METHODS = ("slimming", "l1", "lasso")


def run(settings: "bf.Settings", data: str, out: Path, speedups, seed: int = 0) -> dict:
    from slim.prune import PrunePolicy

    splits = bf.prepare_data(data, out, settings)
    runner = bf.Runner(out, settings, splits)
    baseline = runner.train("baseline", runner.net, seed, epochs=settings.epochs, lr=settings.base_lr)
    rows = []
    for s in speedups:
        for method in METHODS:
            tag = f"q_{method}_{s:g}x_s{seed}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = runner.prune(method, baseline, PrunePolicy(criterion=method, speedup=s), tag)
            report = json.loads(Path(pruned["prototxt"]).with_suffix(".json").read_text())
            fine = runner.train(f"finetune_q_{method}_{s:g}x", pruned.pop("net_param"), seed,
                                epochs=settings.finetune_epochs, lr=settings.finetune_lr, weights=pruned["caffemodel"],
                                parent={"source": baseline["key"], "method": method, "speedup": s})
            row = {"speedup": s, "method": method, "macs": pruned["macs"], "params": pruned["params"],
                   "test_before_ft": pruned["test_before_ft"], "val_before_ft": pruned["val_before_ft"],
                   "test_after_ft": fine["test"], "val_after_ft": fine["val"],
                   "prune_seconds": round(pruned["prune_seconds"], 1)}
            if method == "lasso":
                row["reconstruction"] = [{k: r[k] for k in ("layer", "inputs_before", "inputs_after",
                                                           "error_unpruned", "error_pruned", "error_reconstructed")}
                                         for r in report["reconstruction"]["layers"]]
                row["lasso_seconds"] = report["reconstruction"]["seconds"]
            rows.append(row)
            bf._log(f"{method} {s:g}x: MACs {row['macs']:,.0f}, test {row['test_before_ft'] * 100:.2f}% before, "
                    f"{row['test_after_ft'] * 100:.2f}% after fine-tuning")
    return {"machine": f"{platform.node()} {platform.machine()}", "date": time.strftime("%Y-%m-%d %H:%M"),
            "net": settings.net, "baseline": {"test": baseline["test"], "val": baseline["val"]},
            "settings": settings.key(), "rows": rows}


def table(result: dict) -> str:
    b = result["baseline"]
    lines = [f"baseline {result['net']}: test {b['test'] * 100:.2f}%",
             "| speed-up | method | conv+FC MACs | params | test acc. before fine-tune | after fine-tune |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['speedup']:g}x | {r['method']} | {r['macs']:,.0f} | {r['params']:,} | "
                     f"{r['test_before_ft'] * 100:.2f}% | {r['test_after_ft'] * 100:.2f}% |")
    for r in result["rows"]:
        if r["method"] == "lasso":
            lines.append(f"\nlasso at {r['speedup']:g}x, relative error on held-out calibration images "
                         f"(original weights on all inputs / on the kept inputs / refitted):")
            for x in r["reconstruction"]:
                lines.append(f"  {x['layer']:<10} {x['inputs_before']:>4} -> {x['inputs_after']:<4} "
                             f"{x['error_unpruned']:.4f} / {x['error_pruned']:.4f} / {x['error_reconstructed']:.4f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bench_fashion's quick settings")
    p.add_argument("--out", type=Path, required=True, help="bench_fashion's output folder (its model cache)")
    p.add_argument("--data", default=bf.FASHION_MNIST_SOURCE)
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0])
    args = p.parse_args()
    settings = bf.QUICK if args.quick else bf.FULL
    result = run(settings, args.data, args.out, args.speedups)
    (args.out / "lasso_quality.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (args.out / "lasso_quality.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
