"""Benchmark: measured against theoretical (MAC) speed-up of pruned zoo nets on the CPU, slim and plain torch.

Nets (deploy prototxt of the zoo) and what is pruned:

  vgg19        nets/vgg19_cifar10_deploy.prototxt, 3x32x32, --percent 0.7 (network slimming's VGG-19 figure)
  resnet164    nets/resnet164_cifar10_deploy.prototxt, 3x32x32, --percent 0.6 (--min-channels 2: the global cut
               would leave a bottleneck with one channel, which slim prune refuses unless a limit is given)
  mobilenetv2  nets/mobilenet_v2_imagenet_deploy.prototxt, 3x224x224, --percent 0.5

Pruning: slim.prune.prune_net with the slimming criterion on **random, not sparse** weights: every Scale factor
(gamma) drawn i.i.d. uniform(0, 1) (seed 0), so the global cut removes about the same fraction of every layer's free
channels; a residual channel, ranked by the strongest of its branches (--tie-rule union), almost always stays. For
each net three plans: --round-to 1 (none), 8 and 16. The timed nets get slim's fillers (msra) and BatchNorm
statistics mean 0, variance 1 (Caffe's fillers leave them zero), so no value overflows or goes denormal.

Timed, CPU forwards under torch.no_grad, eval mode, ``--threads`` intra-op threads (default 1):

  slim  slim.Net of the pruned (or unpruned) deploy prototxt
  hand  the same architecture written by hand in PyTorch at the same widths (benchmarks/_hand_models.hand_model),
        given the slim net's blobs: its output is checked equal to slim's before anything is timed
  each in torch's default (contiguous) memory format and in channels_last (model and input converted).

All variants of one net run side by side in one process: each repetition runs every variant once, the order
reversed on every other repetition; medians. speed-up = the median of the unpruned net (same implementation, same
memory format) / the median of the pruned one; efficiency = speed-up / MAC ratio (conv+FC MACs, calflop). Then
forwards of the unpruned and of the pruned net (slim, each memory format, the largest batch) are profiled by op type
(torch.profiler self CPU time, medians of 3 forwards; the convolutions inclusive, against their MACs), which shows
where the time goes when the efficiency is under 1.

Usage:
    python benchmarks/bench_speedup.py [--nets vgg19 resnet164 mobilenetv2] [--batches 64 1] [--reps 7]
                                       [--reps-small 21] [--threads 1] [--formats contiguous channels_last]
                                       [--no-hand] [--json results.json]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slim import proto as pb  # noqa: E402
from slim.flops import calflop, compare  # noqa: E402
from slim.graph import build_graph  # noqa: E402
from slim.io import read_net  # noqa: E402
from slim.net import Net  # noqa: E402
from slim.prune import PrunePolicy, prune_net  # noqa: E402
from _hand_models import hand_model, load_from_net, neutral_batchnorm  # noqa: E402

#: key -> (deploy prototxt, --percent, extra PrunePolicy fields, image size)
NETS = {
    "vgg19": ("nets/vgg19_cifar10_deploy.prototxt", 0.7, {}, 32),
    "resnet164": ("nets/resnet164_cifar10_deploy.prototxt", 0.6, {"min_channels": 2}, 32),
    "mobilenetv2": ("nets/mobilenet_v2_imagenet_deploy.prototxt", 0.5, {}, 224),
}
ROUNDS = (1, 8, 16)


def random_gammas(graph, seed: int = 0):
    """Blobs for pruning: every Scale factor i.i.d. uniform(0, 1), every other blob ones (not read by slimming)."""
    rng = np.random.default_rng(seed)
    blobs = {}
    for node in graph.layers:
        if node.blob_shapes:
            blobs[node.name] = [(rng.uniform(0, 1, s) if node.type == "Scale" and i == 0 else np.ones(s))
                                .astype(np.float32) for i, s in enumerate(node.blob_shapes)]
    return blobs


def with_batch(net: "pb.NetParameter", batch: int) -> "pb.NetParameter":
    """A copy of a deploy net whose Input layer has ``batch`` as its first axis."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type == "Input":
            layer.input_param.shape[0].dim[0] = batch
    return out


def slim_net(net: "pb.NetParameter") -> Net:
    return neutral_batchnorm(Net(net, seed=0).eval())


def _forward(model, x):
    with torch.no_grad():
        out = model(x)
    return out[model.outputs[0]] if isinstance(model, Net) else out


def prepare(key: str, batch: int, hand: bool, formats):
    """The variants of one net at one batch size: name -> (model, input), and per widths the calflop figures."""
    path, percent, extra, size = NETS[key]
    net = read_net(ROOT / path)
    graph = build_graph(net)
    blobs = random_gammas(graph)
    widths = {"unpruned": net}
    pruned_info = {}
    for rt in ROUNDS:
        result = prune_net(net, blobs, PrunePolicy(percent=percent, round_to=rt, **extra), source=path)
        name = "pruned" if rt == 1 else f"pruned r{rt}"
        widths[name] = result.net
        pruned_info[name] = {"removed": result.report.removed, "prunable": result.report.prunable}
    base_report = calflop(net)
    figures = {}
    variants = {}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for wname, wnet in widths.items():
        report = calflop(wnet)
        c = compare(report, base_report)
        figures[wname] = {"macs": report.macs("conv+fc"), "conv_macs": report.macs("conv"),
                          "mac_ratio": c.speedup("conv+fc"),
                          "all_ops_ratio": c.speedup("all"), "activation_ratio": c.change("activation_bytes").ratio,
                          "tied_touching_share": report.ties.share("touching"), "tied_channels": report.ties.channels,
                          "tied_channels_unpruned": base_report.ties.channels,
                          **pruned_info.get(wname, {})}
        model = slim_net(with_batch(wnet, batch))
        impls = {"slim": model}
        if hand:
            h = load_from_net(hand_model(key, model.graph), model).eval()
            small = x[:2]
            a, b = _forward(model, small), _forward(h, small)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
            impls["hand"] = h
        for impl, m in impls.items():
            for fmt in formats:
                if fmt == "channels_last":
                    m_cl = _channels_last_copy(m)
                    variants[(impl, wname, fmt)] = (m_cl, x.contiguous(memory_format=torch.channels_last))
                else:
                    variants[(impl, wname, fmt)] = (m, x)
    return variants, figures


def _channels_last_copy(model):
    """``model`` converted to channels_last (a separate copy, so the contiguous variant is left as it was)."""
    import copy
    clone = copy.deepcopy(model)
    return clone.to(memory_format=torch.channels_last)


def time_variants(variants, reps: int, warmup: int = 1):
    """Medians of ``reps`` forwards of every variant, one of each per repetition, the order reversed every other."""
    order = list(variants)
    for key in order:
        for _ in range(warmup):
            _forward(*variants[key])
    times = {key: [] for key in order}
    for rep in range(reps):
        for key in (order if rep % 2 == 0 else order[::-1]):
            model, x = variants[key]
            t = time.perf_counter()
            _forward(model, x)
            times[key].append(time.perf_counter() - t)
    return times


def op_profile(model, x, runs: int = 3):
    """Forwards under torch.profiler, each profiled on its own: (self CPU ms by op type, the median over ``runs``
    forwards, largest first; the median inclusive ms of aten::conv2d: the convolutions with their layout reorders
    and allocations)."""
    _forward(model, x)
    per_op, counts, conv = {}, {}, []
    for _ in range(runs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _forward(model, x)
        events = prof.key_averages()
        for e in events:
            per_op.setdefault(e.key, []).append(e.self_cpu_time_total / 1e3)
            counts[e.key] = e.count
        conv.append(sum(e.cpu_time_total for e in events if e.key == "aten::conv2d") / 1e3)
    rows = [(k, statistics.median(v + [0.0] * (runs - len(v))), counts[k]) for k, v in per_op.items()]
    rows.sort(key=lambda r: -r[1])
    return rows, statistics.median(conv)


def report_net(key, batch, variants, figures, times, formats, hand):
    """Print the table of one net at one batch; return its rows for the JSON file."""
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    runs = len(next(iter(times.values())))
    print(f"\n{key}, batch {batch} ({NETS[key][0]}, --percent {NETS[key][1]}), medians of {runs} runs:")
    print(f"  {'variant':<34} {'MAC ratio':>9} {'ms':>10} {'speed-up':>8} {'/ MACs':>7} {'vs contiguous':>13}"
          f" {'vs unpruned contiguous':>22}")
    for (impl, wname, fmt), m in med.items():
        f = figures[wname]
        base = med[(impl, "unpruned", fmt)]
        base_contig = med.get((impl, "unpruned", "contiguous"), base)
        contig = med.get((impl, wname, "contiguous"), m)
        speedup = base / m
        row = {"impl": impl, "widths": wname, "format": fmt, "batch": batch, "median_s": m,
               "times_s": times[(impl, wname, fmt)], "mac_ratio": f["mac_ratio"], "speedup": speedup,
               "efficiency": speedup / f["mac_ratio"], "format_gain": contig / m,
               "speedup_vs_unpruned_contiguous": base_contig / m}
        rows.append(row)
        print(f"  {impl + ' ' + wname + ' ' + fmt:<34} {f['mac_ratio']:>8.2f}x {m * 1e3:>10.2f} {speedup:>7.2f}x"
              f" {row['efficiency']:>7.2f} {row['format_gain']:>12.2f}x"
              f" {row['speedup_vs_unpruned_contiguous']:>21.2f}x")
    if hand:
        for wname in figures:
            for fmt in formats:
                print(f"  slim / hand, {wname}, {fmt}: {med[('slim', wname, fmt)] / med[('hand', wname, fmt)]:.3f}")
    return rows


def _print_profile(profiles, fmt, figures, batch):
    """Where the pruned forward's time goes against the unpruned one's: convolutions (inclusive, with their reorders)
    against their MACs, everything else, and the largest ops by self time."""
    b, p = profiles[f"unpruned {fmt}"], profiles[f"pruned {fmt}"]
    base = {k: v for k, v, _ in b["ops"]}
    pruned = {k: v for k, v, _ in p["ops"]}
    total_b, total_p = sum(base.values()), sum(pruned.values())
    macs_b, macs_p = figures["unpruned"]["conv_macs"] * batch, figures["pruned"]["conv_macs"] * batch
    other_b, other_p = total_b - b["conv2d_ms"], total_p - p["conv2d_ms"]
    print(f"  profile of one forward, slim, {fmt}, batch {batch}: total {total_b:.1f} -> {total_p:.1f} ms "
          f"({total_b / total_p:.2f}x; MAC ratio {figures['pruned']['mac_ratio']:.2f}x)")
    print(f"    aten::conv2d (inclusive) {b['conv2d_ms']:.1f} -> {p['conv2d_ms']:.1f} ms "
          f"({b['conv2d_ms'] / p['conv2d_ms']:.2f}x for {macs_b / macs_p:.2f}x fewer conv MACs; "
          f"{macs_b / b['conv2d_ms'] / 1e6:.1f} -> {macs_p / p['conv2d_ms'] / 1e6:.1f} GMAC/s); everything else "
          f"{other_b:.1f} -> {other_p:.1f} ms ({other_b / other_p:.2f}x), {100 * other_p / total_p:.1f}% of the pruned "
          f"forward")
    for name, ms, count in p["ops"][:8]:
        before = base.get(name, 0.0)
        print(f"    {name:<36} {before:>9.1f} -> {ms:>8.1f} ms self ({100 * ms / total_p:>5.1f}% of pruned, "
              f"{(before / ms if ms else float('nan')):>5.2f}x, {count} calls)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 1])
    parser.add_argument("--reps", type=int, default=7, help="timed forwards per variant at batch > 1")
    parser.add_argument("--reps-small", type=int, default=21, help="timed forwards per variant at batch 1")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--formats", nargs="+", default=["contiguous", "channels_last"],
                        choices=["contiguous", "channels_last"])
    parser.add_argument("--no-hand", action="store_true", help="time slim's nets only")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", help="write every figure and time to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hand = not args.no_hand
    print(f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d %H:%M %Z')}, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out = {"machine": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nets": {}}
    for key in args.nets:
        entry = out["nets"].setdefault(key, {"runs": [], "load": []})
        for batch in args.batches:
            variants, figures = prepare(key, batch, hand, args.formats)
            entry["figures"] = figures
            if batch == args.batches[0]:
                print(f"\n{key}: widths and MACs (conv+FC per image; random uniform gammas, seed 0)")
                for wname, f in figures.items():
                    extra = (f", removed {f['removed']} of {f['prunable']} channels, tied kept {f['tied_channels']} "
                             f"of {f['tied_channels_unpruned']}" if "removed" in f else "")
                    print(f"  {wname:<12} {f['macs']:>14,.0f} MACs, MAC ratio {f['mac_ratio']:.2f}x, all-ops "
                          f"{f['all_ops_ratio']:.2f}x, activations {f['activation_ratio']:.2f}x, "
                          f"{100 * f['tied_touching_share']:.1f}% of MACs touch tied channels{extra}")
            load_before = os.getloadavg()
            times = time_variants(variants, args.reps if batch > 1 else args.reps_small)
            load_after = os.getloadavg()
            entry["load"].append({"batch": batch, "before": load_before, "after": load_after})
            entry["runs"] += report_net(key, batch, variants, figures, times, args.formats, hand)
            print(f"  load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min), "
                  f"{load_after[1]:.2f} (5 min)")
            if not args.no_profile and batch == max(args.batches):
                entry["profile"] = {}
                for impl, wname, fmt in [("slim", w, f) for f in args.formats for w in ("unpruned", "pruned")]:
                    rows, conv = op_profile(*variants[(impl, wname, fmt)])
                    entry["profile"][f"{wname} {fmt}"] = {"ops": rows, "conv2d_ms": conv}
                for fmt in args.formats:
                    _print_profile(entry["profile"], fmt, figures, batch)
            del variants
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
