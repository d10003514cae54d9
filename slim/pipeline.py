"""``slim pipeline``: sparse training, pruning and fine-tuning chained, repeated for multi-pass slimming.

Pass k (k = 1..passes):
  1. sparse training with the sparse solver (pass 1 on its own net and weights; later passes on the previous pass's
     pruned net, starting from its fine-tuned weights, as the paper's multi-pass scheme);
  2. ``slim prune`` with the given policy (each pass prunes ``percent`` of the channels left);
  3. fine-tuning with the fine-tune solver on the pruned net, from the transplanted weights.
Everything lands in ``out_dir`` (``passK_sparse.caffemodel``, ``passK_pruned.prototxt/.caffemodel/.json``,
``passK_finetune*``) with one ``pipeline_report.json``. With ``sources`` (``--source LAYER=PATH``, slim.sources) the
net is first written to ``input_net.prototxt`` with its data layers reading those sources, and every pass starts
from it, so the solvers and pruned nets written there run again without the flags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from slim import proto as pb
from slim.errors import SolverError
from slim.io.atomic import atomic_write

__all__ = ["run_pipeline", "retarget_solver"]


def retarget_solver(solver: "pb.SolverParameter", net_path: str, prefix: str, source: str) -> "pb.SolverParameter":
    """A copy of ``solver`` that trains ``net_path`` and snapshots to ``prefix``.

    The solver must name its net by path (``net``, or ``train_net`` with ``test_net`` entries, which are all
    replaced) or inline (``net_param``/``train_net_param``, replaced by the net read from ``net_path``).
    """
    from slim.io import read_net
    out = pb.SolverParameter()
    out.CopyFrom(solver)
    out.snapshot_prefix = prefix
    out.metrics_file = prefix + ".metrics.jsonl"
    del out.weights[:]
    if out.HasField("net"):
        out.net = net_path
    elif out.HasField("net_param"):
        out.net_param.CopyFrom(read_net(net_path))
    elif out.HasField("train_net") or out.HasField("train_net_param"):
        if out.test_net_param:
            raise SolverError(f"{source}: a pipeline solver cannot use inline test_net_param; name the net with "
                              f"net: \"...\" so the pruned net can replace it.")
        out.ClearField("train_net_param")
        out.train_net = net_path
        for i in range(len(out.test_net)):
            out.test_net[i] = net_path
    else:
        raise SolverError(f"{source}: the solver names no net (net, net_param, train_net or train_net_param).")
    return out


def _net_path(solver: "pb.SolverParameter", source: str) -> str:
    if solver.HasField("net"):
        return solver.net
    if solver.HasField("train_net"):
        return solver.train_net
    raise SolverError(f"{source}: the pipeline needs the sparse solver to name its net by path (net: \"...\").")


def _write_input_net(net: "pb.NetParameter", net_path: str, sources: Sequence[str], allow_unknown_fields: bool,
                     out: Path, echo) -> str:
    """Writes the net as read (data sources ``--source`` overrode, fields ``--allow-unknown-fields`` skipped) as
    ``out/input_net.prototxt``; returns that path."""
    from slim.io import write_net
    from slim.io.text import spells_ceil_mode

    path = out / "input_net.prototxt"
    write_net(net, path, opencv=spells_ceil_mode(net_path))
    flags = [f"--source {s}" for s in sources] + (["--allow-unknown-fields"] if allow_unknown_fields else [])
    echo(f"[pipeline] {net_path} with {', '.join(flags)} -> {path}")
    return str(path)


def _train(param, solver_path: str, weights: Optional[str], device, echo):
    from slim.solver.solver import Solver
    solver = Solver(param, solver_path=solver_path, weights=[weights] if weights else None, device=device)
    solver.solve()
    # The solve's own final test (Caffe's, when max_iter is a multiple of test_interval) is reused, not repeated.
    evaluations = solver.last_tests if solver.tested_at == solver.iter else solver.test_all()
    return solver, [e.as_dict() if e is not None else {} for e in evaluations]


def run_pipeline(sparse_solver: str, finetune_solver: str, percent: float, *, passes: int = 1,
                 out_dir: str = "pipeline", weights: Optional[str] = None, policy_kwargs: Optional[dict] = None,
                 absorb_bias: bool = False, device=None, sources: Sequence[str] = (), allow_unknown_fields: bool = False,
                 echo=print) -> dict:
    """Run the pipeline; return the report (also written to ``out_dir/pipeline_report.json``).

    With ``sources`` (``--source``) or ``allow_unknown_fields``, the net as read (sources set, unknown fields
    dropped) is written to ``out_dir/input_net.prototxt`` and trained from there, so every file the pipeline writes
    runs again as it is.
    """
    from slim.flops import calflop
    from slim.deploy import make_deploy
    from slim.io import read_net, read_solver, write_solver
    from slim.prune import PrunePolicy, prune_net, write_pruned
    from slim.sources import override_sources

    if passes < 1:
        raise SolverError(f"--passes must be at least 1, found {passes}.")
    policy = PrunePolicy(percent=percent, **(policy_kwargs or {}))
    policy.check()
    sparse_param = read_solver(sparse_solver, allow_unknown_fields=allow_unknown_fields)
    finetune_param = read_solver(finetune_solver, allow_unknown_fields=allow_unknown_fields)
    if not sparse_param.sparsity.penalty:
        echo(f"note: {sparse_solver} sets no sparsity penalty; sparse training is then plain training.")
    net_path = given = _net_path(sparse_param, sparse_solver)
    start = read_net(net_path, allow_unknown_fields=allow_unknown_fields)
    if sources:
        start = override_sources(start, sources, where=net_path)  # checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sources or allow_unknown_fields:
        net_path = _write_input_net(start, given, sources, allow_unknown_fields, out, echo)
    base = calflop(make_deploy(start))
    report = {"sparse_solver": sparse_solver, "finetune_solver": finetune_solver, "percent": percent,
              "passes": [], "baseline": {"net": given, "params": base.params, "macs": base.macs("conv+fc")}}
    if sources:
        report["sources"] = list(sources)
    current_weights = weights
    for k in range(1, passes + 1):
        t0 = time.perf_counter()
        tag = f"pass{k}"
        echo(f"[{tag}] sparse training of {net_path}")
        sp = retarget_solver(sparse_param, net_path, str(out / f"{tag}_sparse"), sparse_solver)
        write_solver(sp, out / f"{tag}_sparse_solver.prototxt")
        solver, sparse_tests = _train(sp, str(out / f"{tag}_sparse_solver.prototxt"), current_weights, device, echo)
        sparse_weights = out / f"{tag}_sparse.caffemodel"
        solver.net.save(sparse_weights)
        echo(f"[{tag}] pruning {percent:.0%} of the channels")
        result = prune_net(net_path, str(sparse_weights), policy, absorb_bias=absorb_bias)
        paths = write_pruned(result, out / f"{tag}_pruned")
        echo(f"[{tag}] fine-tuning {paths['prototxt']}")
        ft = retarget_solver(finetune_param, str(paths["prototxt"]), str(out / f"{tag}_finetune"), finetune_solver)
        write_solver(ft, out / f"{tag}_finetune_solver.prototxt")
        solver, finetune_tests = _train(ft, str(out / f"{tag}_finetune_solver.prototxt"), str(paths["caffemodel"]),
                                        device, echo)
        finetuned = out / f"{tag}_finetune.caffemodel"
        solver.net.save(finetuned)
        cost = calflop(make_deploy(result.net))
        report["passes"].append({
            "pass": k, "sparse_test": sparse_tests, "finetune_test": finetune_tests,
            "pruned_fraction": result.report.fraction, "params": cost.params, "macs": cost.macs("conv+fc"),
            "params_reduction": 1 - cost.params / base.params,
            "macs_reduction": 1 - cost.macs("conv+fc") / base.macs("conv+fc"),
            "files": {"sparse": str(sparse_weights), **{key: str(v) for key, v in paths.items()},
                      "finetune": str(finetuned)},
            "seconds": round(time.perf_counter() - t0, 1)})
        net_path, current_weights = str(paths["prototxt"]), str(finetuned)
    with atomic_write(out / "pipeline_report.json", "w") as f:  # replaces, never follows, a link at the name
        f.write(json.dumps(report, indent=2) + "\n")
    return report
