"""bench_fashion's outputs: the Table 1 layout of the network-slimming paper, CSV, JSON, the accuracy-vs-MACs plot,
and the issue's goals checked against the measured figures.

Rows of several seeds are summarised as mean and sample standard deviation; params and MACs are means over seeds
(a percent policy may keep a slightly different net per seed). Latencies are medians of interleaved runs of seed 0's
nets; "speed-up" is baseline latency / row latency, and its ratio to the MAC ratio (baseline MACs / row MACs) says
how much of the theoretical speed-up the CPU delivers.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Dict, List

from slim.io.atomic import atomic_write

__all__ = ["summarise", "table", "goals", "write_all", "read_table"]

TABLE, CSV, JSON, PNG = "table.md", "results.csv", "results.json", "accuracy_vs_macs.png"


def _stats(values: List[float]) -> tuple:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarise(results: dict) -> List[dict]:
    """One entry per (method, level) over seeds, plus the baseline and sparse entries first."""
    base = results["baseline"]
    lat = results["latency"]
    entries = []
    for name, models in (("baseline", base["seeds"]), ("sparse", base["sparse"])):
        entries.append({"method": name, "level": 0.0, "params": base["params"], "macs": base["macs"],
                        "fraction": 0.0, "test": _stats([m["test"] for m in models]),
                        "val": _stats([m["val"] for m in models]), "test_before_ft": None,
                        "seeds": [m["test"] for m in models], "latency_1": lat["1"]["baseline"],
                        "latency_64": lat["64"]["baseline"]})
    timed = [tuple(key) for key in lat["keys"]]
    groups: Dict[tuple, List[dict]] = {}
    for row in results["rows"]:
        groups.setdefault((row["method"], row["level"]), []).append(row)
    for (method, level), rows in groups.items():
        k = timed.index((method, level))
        entries.append({"method": method, "level": level,
                        "params": statistics.fmean(r["params"] for r in rows),
                        "macs": statistics.fmean(r["macs"] for r in rows),
                        "fraction": statistics.fmean(r["fraction"] for r in rows),
                        "test": _stats([r["test"] for r in rows]), "val": _stats([r["val"] for r in rows]),
                        "test_before_ft": _stats([r["test_before_ft"] for r in rows]),
                        "seeds": [r["test"] for r in rows], "latency_1": lat["1"]["rows"][k],
                        "latency_64": lat["64"]["rows"][k]})
    for e in entries:
        e["mac_ratio"] = base["macs"] / e["macs"]
        for b in ("1", "64"):
            e[f"speedup_{b}"] = lat[b]["baseline"] / e[f"latency_{b}"]
            e[f"speedup_per_mac_ratio_{b}"] = e[f"speedup_{b}"] / e["mac_ratio"]
    return entries


def _pm(stat, scale=100.0, error=True) -> str:
    if stat is None:
        return "-"
    mean, sd = stat
    value = (1 - mean) * scale if error else mean * scale
    return f"{value:.2f}" + (f" ± {sd * scale:.2f}" if sd is not None else "")


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _label(e: dict, lam: float) -> str:
    if e["method"] == "baseline":
        return "Baseline"
    if e["method"] == "sparse":
        return f"Sparse (λ={lam:g}), not pruned"
    if e["method"] == "slimming":
        return f"{e['level']:.0%} channels pruned, slimming"
    return f"{e['method']}, same MACs as {e['level']:.0%} slimming"


def table(results: dict) -> str:
    """The paper's Table 1 (test error, parameters and pruned share, FLOPs and pruned share) with slim's MACs,
    the test error before fine-tuning, and measured CPU latency."""
    entries = summarise(results)
    s = results["settings"]
    seeds = len(results["baseline"]["seeds"])
    partial = f" (partial: {seeds} of {s['seeds']} seeds done)" if seeds < s["seeds"] else ""
    head = ("| Model | Test error (%) | Parameters | Pruned | MACs (conv+FC) | Pruned | Test error before FT (%) "
            "| CPU ms, batch 1 | CPU ms, batch 64 | Speed-up b1 / b64 | Speed-up ÷ MAC ratio b1 / b64 |")
    lines = [f"{s['net']} on Fashion-MNIST: test error mean ± sd over {seeds} seed{'s' if seeds > 1 else ''}{partial} "
             f"(training {results['splits']['train']['count']:,} images, validation "
             f"{results['splits']['val']['count']:,}, test {results['splits']['test']['count']:,}); "
             f"{s['epochs']:g} epochs of training, {s['finetune_epochs']:g} of fine-tuning; latency: medians of "
             f"{results['latency']['1'].get('repeats', s['latency_repeats'])} (batch 1) and "
             f"{results['latency']['64'].get('repeats', s['latency_repeats'])} (batch 64) interleaved runs of seed 0's "
             f"nets, {results['latency']['1']['threads']} thread(s)"
             + (f", load average {results['latency']['load_average']:.1f} on {results['machine']['cores']} cores "
                "while timing" if "load_average" in results["latency"] else "") + ".",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    base = entries[0]
    for e in entries:
        pruned_p = "-" if e["method"] in ("baseline", "sparse") else f"{1 - e['params'] / base['params']:.1%}"
        pruned_m = "-" if e["method"] in ("baseline", "sparse") else f"{1 - e['macs'] / base['macs']:.1%}"
        lines.append(f"| {_label(e, results['lambda'])} | {_pm(e['test'])} | {_count(e['params'])} | {pruned_p} | "
                     f"{_count(e['macs'])} | {pruned_m} | {_pm(e['test_before_ft'])} | {e['latency_1']:.3f} | "
                     f"{e['latency_64']:.2f} | {e['speedup_1']:.2f} / {e['speedup_64']:.2f} | "
                     f"{e['speedup_per_mac_ratio_1']:.2f} / {e['speedup_per_mac_ratio_64']:.2f} |")
    if results.get("selection"):
        sel = results["selection"]
        lines += ["", f"λ chosen on the validation split (slimming at {sel['level']:.0%}, after fine-tuning, "
                      "seed 0): " + ", ".join(f"λ={t['lambda']:g}: {t['pruned_val'] * 100:.2f}% "
                                              f"(before FT {t['pruned_val_before_ft'] * 100:.2f}%)"
                                              for t in sel["trials"]) + f" -> λ={sel['chosen']:g}."]
    for method, error in results.get("failed", {}).items():
        lines += ["", f"**{method} failed and is left out of the table**: {error}"]
    lines += ["", "Goals:"] + [f"- {g['goal']}: {g['verdict']}" for g in goals(results, entries)]
    return "\n".join(lines) + "\n"


def goals(results: dict, entries: List[dict]) -> List[dict]:
    """The issue's goals, each with the measured figure and met / missed by how much."""
    base = entries[0]
    acc = base["test"][0] * 100
    out = []
    if 93 <= acc <= 94:
        verdict = f"met ({acc:.2f}%)"
    else:
        verdict = f"missed: {acc:.2f}%, {93 - acc:.2f} points below 93%" if acc < 93 else f"above: {acc:.2f}%"
    out.append({"goal": "baseline in the published 93-94% range", "verdict": verdict})
    top = [e for e in entries if e["method"] == "slimming" and abs(e["level"] - 0.7) < 1e-9]
    if top:
        drop = acc - top[0]["test"][0] * 100
        out.append({"goal": "70% of channels pruned (slimming) losing at most 0.5 points after fine-tuning",
                    "verdict": (f"met ({drop:+.2f} points lost)" if drop <= 0.5 else
                                f"missed: {drop:.2f} points lost, {drop - 0.5:.2f} over")})
    fewer = [e for e in entries[2:] if e["mac_ratio"] >= 2]
    best = max(fewer, key=lambda e: e["test"][0], default=None)
    if best is None:
        out.append({"goal": ">= 2x fewer MACs at no accuracy loss", "verdict": "no row reaches 2x fewer MACs"})
    else:
        loss = acc - best["test"][0] * 100
        out.append({"goal": ">= 2x fewer MACs at no accuracy loss",
                    "verdict": (f"{'met' if loss <= 0 else 'missed'}: best row with >= 2x fewer MACs "
                                f"({_label(best, results['lambda'])}, {best['mac_ratio']:.2f}x) "
                                f"{'gains' if loss <= 0 else 'loses'} {abs(loss):.2f} points")})
    return out


def _csv(results: dict) -> str:
    buf = io.StringIO()
    fields = ["method", "level", "seed", "source", "fraction", "params", "macs", "test", "val", "test_before_ft",
              "val_before_ft", "prune_seconds", "finetune_seconds", "prototxt"]
    writer = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    base = results["baseline"]
    for kind in ("seeds", "sparse"):
        for m in base[kind]:
            writer.writerow({"method": "baseline" if kind == "seeds" else "sparse", "level": 0, "seed": m["seed"],
                             "params": base["params"], "macs": base["macs"], "test": m["test"], "val": m["val"],
                             "fraction": 0})
    for row in results["rows"]:
        writer.writerow(row)
    return buf.getvalue()


def _plot(results: dict, entries: List[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    base = entries[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = [m for m in dict.fromkeys(e["method"] for e in entries[2:])]
    for method in methods:
        points = sorted([base] + [e for e in entries if e["method"] == method], key=lambda e: e["macs"])
        ax.errorbar([e["macs"] / 1e6 for e in points], [e["test"][0] * 100 for e in points],
                    yerr=[(e["test"][1] or 0) * 100 for e in points], marker="o", capsize=3, label=method)
        for e in points:
            if e is not base:
                ax.annotate(f"{e['level']:.0%}", (e["macs"] / 1e6, e["test"][0] * 100), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
    ax.axhline(base["test"][0] * 100, color="gray", linestyle="--", linewidth=0.8, label="baseline")
    ax.set_xlabel("conv+FC MACs per image (millions)")
    ax.set_ylabel("test accuracy (%), after fine-tuning")
    s = results["settings"]
    seeds = len(results["baseline"]["seeds"])
    ax.set_title(f"{s['net']} on Fashion-MNIST ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return True


def write_all(results: dict, out: Path) -> Dict[str, str]:
    """Writes table.md, results.csv, results.json and the PNG (with matplotlib) into ``out``; returns their paths."""
    entries = summarise(results)
    results["summary"] = entries
    results["goals"] = goals(results, entries)
    files = {"table": out / TABLE, "csv": out / CSV, "json": out / JSON}
    with atomic_write(files["table"], "w") as f:
        f.write(table(results))
    with atomic_write(files["csv"], "w") as f:
        f.write(_csv(results))
    with atomic_write(files["json"], "w") as f:
        f.write(json.dumps(results, indent=1, default=str) + "\n")
    if _plot(results, entries, out / PNG):
        files["png"] = out / PNG
    return {k: str(v) for k, v in files.items()}


def read_table(out: Path) -> str:
    """The table written by `write_all`."""
    return (Path(out) / TABLE).read_text(encoding="utf-8")
