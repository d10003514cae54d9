"""Benchmark: `slim prune` (analysis, scores, plan, rewrite, transplant, write) against reading plus writing the same
.caffemodel, for a VGG-16-size and a ResNet-50-size net.

For each net (nets/vgg16_imagenet_deploy.prototxt, 138M values, 553 MB; nets/resnet50_imagenet_deploy.prototxt,
25.6M values + BatchNorm statistics, 103 MB) random blobs are written once as a .caffemodel in a temporary folder.
Then, alternately, several repetitions of:

  baseline  read_caffemodel (views into an mmap) + write_caffemodel of every blob (so every value is read and
            written once): the floor for any tool that rewrites the weights.
  prune     prune_net(percent 0.5; l1 for VGG-16, which has no BatchNorm; slimming for ResNet-50) + write_pruned
            (prototxt, caffemodel, JSON report, all-or-nothing): everything `slim prune` does after parsing
            arguments, including reading the weights and scoring every filter. The pruned blobs are cut block by
            block into a reused buffer as the caffemodel is written (slim.prune.PrunedBlobs).

With ``--process`` the two are whole processes instead, started alternately: ``python -m slim prune`` (the command a
user runs: interpreter start, imports, everything above; it never imports torch) against a ``python -c`` process that
imports slim.io (numpy + protobuf) and does the baseline's read + write.

Medians and best runs are reported (the machine may be shared: the best run is the least disturbed), with the
ratio prune / baseline (target <= 2) and a breakdown of one prune run.

Usage:
    python benchmarks/bench_prune.py [--reps 3] [--dir /tmp] [--nets vgg16 resnet50] [--process]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim.graph import build_graph  # noqa: E402
from slim.io import read_caffemodel, read_net, write_caffemodel  # noqa: E402
from slim.prune import (PrunePolicy, analyze, channel_scores, load_blobs, make_plan, prune_net,  # noqa: E402
                        write_pruned)

NETS = {"vgg16": ("vgg16_imagenet_deploy.prototxt", "l1"), "resnet50": ("resnet50_imagenet_deploy.prototxt",
                                                                         "slimming")}


def random_weights(net, path):
    """Random blobs of the net's shapes (BatchNorm statistics sane, Scale gammas in (0, 1)) as a .caffemodel."""
    graph = build_graph(net)
    rng = np.random.default_rng(0)
    blobs = {}
    for node in graph.layers:
        if not node.blob_shapes:
            continue
        arrays = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in node.blob_shapes]
        if node.type == "BatchNorm":
            arrays[1] = np.abs(arrays[1]) + 1
            arrays[2] = np.ones(node.blob_shapes[2], np.float32)
        elif node.type == "Scale":
            arrays[0] = rng.uniform(0, 1, node.blob_shapes[0]).astype(np.float32)
        blobs[node.name] = arrays
    write_caffemodel(path, net, blobs)
    return sum(a.size for arrays in blobs.values() for a in arrays)


def baseline(weights, out):
    model = read_caffemodel(weights)
    write_caffemodel(out, model.net, {layer.name: layer.blobs for layer in model.layers if layer.blobs})


def prune(model, weights, out, criterion):
    result = prune_net(model, weights, PrunePolicy(percent=0.5, criterion=criterion))
    write_pruned(result, out)
    return result


_BASELINE_PROCESS = ("import sys; from slim.io import read_caffemodel, write_caffemodel; "
                     "m = read_caffemodel(sys.argv[1]); "
                     "write_caffemodel(sys.argv[2], m.net, {l.name: l.blobs for l in m.layers if l.blobs}); "
                     "assert 'torch' not in sys.modules")


def process_commands(model, weights, tmp, criterion):
    """The two whole commands of ``--process``: (slim prune, numpy-only read + write)."""
    prune_cmd = [sys.executable, "-m", "slim", "prune", "--model", str(model), "--weights", str(weights),
                 "--percent", "0.5", "--criterion", criterion, "--output", str(tmp / "pruned")]
    base_cmd = [sys.executable, "-c", _BASELINE_PROCESS, str(weights), str(tmp / "copy.caffemodel")]
    return prune_cmd, base_cmd


def timed_process(cmd):
    """Wall seconds of one run of ``cmd`` (which must succeed)."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t


def breakdown(model, weights, out, criterion):
    """One prune run, timed step by step (the transplant is computed while the caffemodel is written)."""
    marks = [("start", time.perf_counter())]
    net = read_net(model)
    graph = build_graph(net)
    marks.append(("parse + graph", time.perf_counter()))
    analysis = analyze(graph)
    marks.append(("channel groups", time.perf_counter()))
    blobs = load_blobs(graph, read_caffemodel(weights))
    marks.append(("read weights (mmap)", time.perf_counter()))
    policy = PrunePolicy(percent=0.5, criterion=criterion)
    scores = channel_scores(analysis, blobs, criterion, policy.tie_rule, policy.normalizer)
    marks.append((f"scores ({criterion})", time.perf_counter()))
    make_plan(analysis, scores, policy)
    marks.append(("plan", time.perf_counter()))
    result = prune_net(net, weights, PrunePolicy(percent=0.5, criterion=criterion))
    t = time.perf_counter()
    write_pruned(result, out)
    marks.append(("transplant + write (3 files, streamed, all or nothing)", time.perf_counter() - t + marks[-1][1]))
    return [(name, b - a) for (_, a), (name, b) in zip(marks, marks[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder for the temporary files (default: the system's)")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--process", action="store_true",
                        help="time whole processes: `python -m slim prune` against a numpy-only read + write")
    args = parser.parse_args()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numpy {np.__version__}, {time.strftime('%Y-%m-%d')}")
    for key in args.nets:
        file, criterion = NETS[key]
        model = ROOT / "nets" / file
        net = read_net(model)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            tmp = Path(tmp)
            weights = tmp / "w.caffemodel"
            values = random_weights(net, weights)
            size = weights.stat().st_size
            base, pruned = [], []
            prune_cmd, base_cmd = process_commands(model, weights, tmp, criterion)
            for rep in range(args.reps):
                for which in ((0, 1) if rep % 2 == 0 else (1, 0)):    # alternate the order: first runs pay more
                    t = time.perf_counter()
                    if which == 0 and args.process:
                        timed_process(base_cmd)
                    elif which == 0:
                        baseline(weights, tmp / "copy.caffemodel")
                    elif args.process:
                        timed_process(prune_cmd)
                    else:
                        prune(model, weights, tmp / "pruned", criterion)
                    (base if which == 0 else pruned).append(time.perf_counter() - t)
            result = prune(model, weights, tmp / "pruned", criterion)
            b, p = statistics.median(base), statistics.median(pruned)
            out_size = (tmp / "pruned.caffemodel").stat().st_size
            print(f"\n{key}: {values:,} values, {size / 1e6:.0f} MB -> pruned {out_size / 1e6:.0f} MB "
                  f"({result.report.removed} of {result.report.prunable} channels, criterion {criterion})")
            if args.process:
                print("  whole processes: `python -m slim prune` against `python -c` numpy-only read + write")
            print(f"  read + write  median {b:.3f} s, best {min(base):.3f} s  "
                  f"(runs: {', '.join(f'{x:.3f}' for x in base)})")
            print(f"  slim prune    median {p:.3f} s, best {min(pruned):.3f} s  "
                  f"(runs: {', '.join(f'{x:.3f}' for x in pruned)})")
            print(f"  ratio prune / (read + write): medians {p / b:.2f}, best runs {min(pruned) / min(base):.2f}")
            steps = breakdown(model, weights, tmp / "again", criterion)
            print("  one prune run, step by step: " + "; ".join(f"{name} {dt:.3f} s" for name, dt in steps))


if __name__ == "__main__":
    main()
