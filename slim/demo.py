"""``slim demo``: network slimming end to end on the built-in digits, on the CPU, in a few minutes.

Stages, as in Liu et al. (ICCV 2017), on the zoo's small VGG-style net with BatchNorm (nets/demo_digits.prototxt) and
the solvers in solvers/demo_digits_*.prototxt:

1. baseline: train from scratch without the penalty;
2. sparse: train from scratch with the L1 penalty on the channel scaling factors (Scale gammas);
3. pruned: prune ``percent`` of the channels globally by |gamma| (``slim prune``), no retraining;
4. pruned + absorb-bias: the same with the removed channels' constant contribution folded into the next biases;
5. fine-tuned: train the pruned net from its transplanted weights.

For each stage it reports test accuracy (all 360 test digits), learnable parameters, conv+FC MACs per image and the
measured CPU forward latency (median of interleaved runs) with the speed-up against the baseline. It writes every
prototxt, caffemodel, the prune report, ``demo_report.json`` and the plots (PNG with matplotlib, otherwise text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from slim import proto as pb
from slim.io.atomic import atomic_write

__all__ = ["DemoStage", "DemoResult", "run_demo", "demo_solver", "DEMO_STAGES"]

DEMO_STAGES = ("baseline", "sparse", "finetune")
_NET_FILE = "demo_digits.prototxt"


def demo_solver(stage: str, net_path: str = "nets/demo_digits.prototxt", prefix: Optional[str] = None,
                max_iter: int = 800) -> "pb.SolverParameter":
    """The demo's solver for ``stage`` (baseline, sparse or finetune); solvers/demo_digits_*.prototxt are these.

    SGD with momentum 0.9, batch 64, base_lr 0.1 (0.01 for fine-tuning) divided by 10 at 50% and 75% of training,
    weight decay 1e-4 (the paper's recipe, shortened to 800 iterations of batch 64, about 36 epochs of the 1,437
    training digits); sparse training adds the penalty 4e-2, far larger than the paper's 1e-4 because these runs
    are so short: measured on the demo, 1e-2 left the gammas too dense to prune 60% without retraining.
    """
    if stage not in DEMO_STAGES:
        raise ValueError(f"stage must be one of {DEMO_STAGES}, not {stage!r}")
    s = pb.SolverParameter()
    s.net = net_path
    s.test_iter.append(3)  # 3 x 120 = the 360 test digits
    s.test_interval = max(1, max_iter // 4)
    if stage != "finetune":
        s.test_initialization = False  # an untrained net's BatchNorm has no statistics yet: its test is noise
    s.base_lr = 0.01 if stage == "finetune" else 0.1
    s.lr_policy = "multistep"
    s.gamma = 0.1
    s.stepvalue.extend([max_iter // 2, max_iter * 3 // 4])
    s.max_iter = max_iter
    s.type = "SGD"
    s.momentum = 0.9
    s.weight_decay = 1e-4
    s.display = max(1, max_iter // 40)  # 40 points on the loss curves
    s.average_loss = 10
    s.snapshot = 0
    s.snapshot_prefix = prefix or f"demo_digits_{stage}"
    s.random_seed = 1
    if stage == "sparse":
        s.sparsity.penalty = 4e-2
    return s


@dataclasses.dataclass
class DemoStage:
    """One row of the demo's table."""

    name: str
    accuracy: float
    params: int
    macs: int
    latency_ms: Optional[float] = None
    speedup: Optional[float] = None
    seconds: float = 0.0


@dataclasses.dataclass
class DemoResult:
    """The demo's table, with the measured and theoretical speed-ups and where the files are."""

    stages: List[DemoStage]
    percent: float
    pruned_fraction: float
    theoretical_speedup: float
    out_dir: str
    files: Dict[str, str]

    def table(self) -> str:
        """The paper-style table as text."""
        lines = [f"{'stage':<24} {'test acc':>9} {'params':>10} {'MACs/img':>12} {'CPU ms':>9} {'speed-up':>9}",
                 "-" * 78]
        for s in self.stages:
            ms = f"{s.latency_ms:.3f}" if s.latency_ms is not None else "-"
            sp = f"{s.speedup:.2f}x" if s.speedup is not None else "-"
            lines.append(f"{s.name:<24} {s.accuracy * 100:>8.2f}% {s.params:>10,} {s.macs:>12,} {ms:>9} {sp:>9}")
        base, last = self.stages[0], self.stages[-1]
        lines.append("-" * 78)
        lines.append(f"channels pruned: {self.pruned_fraction * 100:.1f}% (asked {self.percent * 100:.0f}%); params "
                     f"-{(1 - last.params / base.params) * 100:.1f}%; MACs -{(1 - last.macs / base.macs) * 100:.1f}% "
                     f"(theoretical speed-up {self.theoretical_speedup:.2f}x)")
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet(verbose: bool):
    logger = logging.getLogger("slim")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _accuracy(solver) -> float:
    (evaluation,) = solver.test_all()
    return float(evaluation.as_dict()["accuracy"])


def _train(stage: str, out: Path, net_path: Path, weights: Optional[str], max_iter: int, verbose: bool):
    from slim.solver.solver import Solver
    param = demo_solver(stage, str(net_path), str(out / f"demo_digits_{stage}"), max_iter)
    from slim.io import write_solver
    write_solver(param, out / f"demo_digits_{stage}_solver.prototxt")
    with _quiet(verbose):
        solver = Solver(param, solver_path=str(out / f"demo_digits_{stage}_solver.prototxt"),
                        weights=[weights] if weights else None)
        solver.solve()
        accuracy = _accuracy(solver)
    model = out / f"demo_digits_{stage}.caffemodel"
    solver.net.save(model)
    return solver, accuracy, str(model)


def run_demo(out_dir="slim_demo", *, percent: float = 0.6, max_iter: int = 800, measure_repeats: int = 30,
             verbose: bool = False, echo=print) -> DemoResult:
    """Run the whole loop and write its files into ``out_dir``; ``echo`` receives progress lines."""
    import torch

    from slim.deploy import make_deploy
    from slim.flops import calflop, measure_latencies
    from slim.io import write_net
    from slim.net import Net
    from slim.prune import PrunePolicy, prune_net, write_pruned
    from slim.zoo import demo_digits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net_path = out / _NET_FILE
    write_net(demo_digits(), net_path)
    files = {"net": str(net_path)}
    stages: List[DemoStage] = []
    curves: Dict[str, list] = {}

    def cost(net_param):
        report = calflop(make_deploy(net_param))
        return report.params, report.macs("conv+fc")

    base_params, base_macs = cost(demo_digits())
    t0 = time.perf_counter()
    echo(f"[1/4] baseline training ({max_iter} iterations)...")
    base, acc, files["baseline"] = _train("baseline", out, net_path, None, max_iter, verbose)
    stages.append(DemoStage("baseline", acc, base_params, base_macs, seconds=time.perf_counter() - t0))
    gammas_before = torch.cat([g.detach().abs().flatten() for g in base.net.scaling_factors().values()])
    curves["baseline"] = _curve(out / "demo_digits_baseline.metrics.jsonl")

    t0 = time.perf_counter()
    echo(f"[2/4] sparse training with the L1 penalty on the channel scaling factors...")
    sparse, acc, files["sparse"] = _train("sparse", out, net_path, None, max_iter, verbose)
    stages.append(DemoStage("sparse", acc, base_params, base_macs, seconds=time.perf_counter() - t0))
    gammas_after = torch.cat([g.detach().abs().flatten() for g in sparse.net.scaling_factors().values()])
    curves["sparse"] = _curve(out / "demo_digits_sparse.metrics.jsonl")

    echo(f"[3/4] pruning {percent * 100:.0f}% of the channels by |gamma|...")
    rows = {}
    for absorb in (False, True):
        t0 = time.perf_counter()
        result = prune_net(net_path, files["sparse"], PrunePolicy(percent=percent), absorb_bias=absorb)
        name = "pruned_absorb" if absorb else "pruned"
        paths = write_pruned(result, out / f"demo_digits_{name}")
        files[name] = str(paths["prototxt"])
        files[f"{name}_caffemodel"] = str(paths["caffemodel"])
        files[f"{name}_report"] = str(paths["report"])
        pruned = Net(result.net, weights=str(paths["caffemodel"]), phase="TEST")
        acc = _evaluate(pruned)
        params, macs = cost(result.net)
        label = "pruned + absorb-bias" if absorb else "pruned (no fine-tune)"
        rows[name] = (result, DemoStage(label, acc, params, macs, seconds=time.perf_counter() - t0))
    result = rows["pruned"][0]
    stages.extend(row for _, row in rows.values())

    t0 = time.perf_counter()
    echo("[4/4] fine-tuning the pruned net...")
    fine, acc, files["finetune"] = _train("finetune", out, Path(files["pruned"]), files["pruned_caffemodel"],
                                          max_iter, verbose)
    params, macs = cost(result.net)
    stages.append(DemoStage("fine-tuned", acc, params, macs, seconds=time.perf_counter() - t0))
    curves["finetune"] = _curve(out / "demo_digits_finetune.metrics.jsonl")

    echo("measuring CPU latency (baseline vs pruned, interleaved)...")
    deploy_base, deploy_pruned = out / "demo_digits_deploy.prototxt", out / "demo_digits_pruned_deploy.prototxt"
    write_net(make_deploy(demo_digits(), batch=64), deploy_base)
    write_net(make_deploy(result.net, batch=64), deploy_pruned)
    lat_base, lat_pruned = measure_latencies([deploy_base, deploy_pruned], weights=[files["baseline"],
                                             files["finetune"]], repeats=measure_repeats, device="cpu")
    for s in stages:
        pruned_stage = s.name not in ("baseline", "sparse")
        lat = lat_pruned if pruned_stage else lat_base
        s.latency_ms = lat.median * 1e3
        s.speedup = lat_base.median / lat.median

    demo = DemoResult(stages, percent, result.report.fraction, base_macs / stages[-1].macs, str(out), files)
    files["plots"] = _plots(out, gammas_before.numpy(), gammas_after.numpy(), result, curves)
    report = {"percent": percent, "pruned_fraction": demo.pruned_fraction,
              "theoretical_speedup": demo.theoretical_speedup,
              "stages": [dataclasses.asdict(s) for s in stages], "files": files,
              "latency": {"baseline_ms": lat_base.median * 1e3, "pruned_ms": lat_pruned.median * 1e3,
                          "threads": lat_base.threads, "batch": lat_base.batch, "repeats": measure_repeats}}
    with atomic_write(out / "demo_report.json", "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    files["report"] = str(out / "demo_report.json")
    return demo


def _evaluate(net) -> float:
    """Accuracy of a TEST-phase net over the 360 test digits (its data layer reads them)."""
    import torch
    total, n = 0.0, 3
    with torch.no_grad():
        for _ in range(n):
            total += float(net()["accuracy"])
    return total / n


def _curve(path: Path) -> list:
    """(iteration, loss) and (iteration, accuracy) points from a metrics file."""
    points = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            points.append(rec)
    return points


def _series(points: list, kind: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of a metrics file's training losses (``kind`` "loss") or test accuracies ("accuracy")."""
    xs, ys = [], []
    for p in points:
        if kind == "loss" and p.get("kind") == "train" and "loss" in p:
            xs.append(p["iter"])
            ys.append(p["loss"])
        elif kind == "accuracy" and p.get("kind") == "test":
            acc = next((v for k, v in p.get("outputs", {}).items() if "acc" in k and not isinstance(v, list)), None)
            if acc is not None:
                xs.append(p["iter"])
                ys.append(acc)
    return xs, ys


def _plots(out: Path, before, after, result, curves) -> str:
    """Write the gamma histograms with the prune threshold, channels kept per layer, training loss and test accuracy
    curves (PNG, or text without matplotlib); return the path written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _text_plots(out, before, after, result, curves)
    fig = _figure(plt, before, after, result, curves)
    path = out / "demo_plots.png"
    with atomic_write(path, "wb") as f:        # never through a link planted at the name, never half-written
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return str(path)


def _figure(plt, before, after, result, curves):
    """The demo's four panels, every axis labelled."""
    kept = [(c.name, c.before, c.after) for c in result.report.layers]
    threshold = result.report.cut.get("threshold")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    top = max(float(before.max()), float(after.max()), 1e-6)
    axes[0].hist(before, bins=40, range=(0, top), alpha=0.6, label="baseline")
    axes[0].hist(after, bins=40, range=(0, top), alpha=0.6, label="sparse training")
    if threshold is not None:
        axes[0].axvline(threshold, color="red", linestyle="--", label=f"prune threshold {threshold:.3g}")
    axes[0].set(title="channel scaling factors", xlabel="|gamma|", ylabel="channels")
    axes[0].legend()
    axes[1].bar(range(len(kept)), [k[1] for k in kept], label="before", color="lightgray")
    axes[1].bar(range(len(kept)), [k[2] for k in kept], label="kept")
    axes[1].set_xticks(range(len(kept)), [k[0] for k in kept], rotation=45, ha="right", fontsize=7)
    axes[1].set(title="channels per layer", xlabel="layer", ylabel="output channels")
    axes[1].legend()
    for panel, kind, title, ylabel in ((2, "loss", "training loss", "loss (smoothed)"),
                                       (3, "accuracy", "test accuracy", "accuracy")):
        for stage, points in curves.items():
            xs, ys = _series(points, kind)
            if xs:
                axes[panel].plot(xs, ys, marker="." if kind == "accuracy" else None, label=stage)
        axes[panel].set(title=title, xlabel="iteration (of each stage)", ylabel=ylabel)
        axes[panel].legend()
    fig.tight_layout()
    return fig


def _histogram(values, bins=20, width=50):
    import numpy as np
    counts, edges = np.histogram(values, bins=bins, range=(0, max(float(values.max()), 1e-6)))
    peak = max(int(counts.max()), 1)
    return [f"{edges[i]:8.4f} | {'#' * int(round(c * width / peak))} {c}" for i, c in enumerate(counts)]


def _text_plots(out: Path, before, after, result, curves) -> str:
    threshold = result.report.cut.get("threshold")
    lines = ["|gamma| before sparse training (baseline):", *_histogram(before), "",
             "|gamma| after sparse training:", *_histogram(after),
             f"prune threshold: |gamma| <= {threshold:.4g} removed" if threshold is not None else "", "",
             "channels kept per layer:"]
    for name, b, a in [(c.name, c.before, c.after) for c in result.report.layers]:
        lines.append(f"{name:<16} {a:>4}/{b:<4} {'#' * a}{'.' * (b - a)}")
    for kind, label in (("loss", "training loss"), ("accuracy", "test accuracy")):
        for stage, points in curves.items():
            lines.append("")
            lines.append(f"{label}, {stage}:")
            lines.extend(f"  iter {x:>5}  {kind} {y:.4f}" for x, y in zip(*_series(points, kind)))
    path = out / "demo_plots.txt"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)
