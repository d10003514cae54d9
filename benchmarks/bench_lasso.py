"""Benchmark: the cost of `slim prune --criterion lasso` against the forward passes it cannot avoid, and its memory
as the calibration set grows.

cost mode (default): a zoo net at ImageNet shapes with random weights (msra fillers, BatchNorm statistics made
non-trivial), calibrated on a small synthetic set (a DummyData --calib-net of gaussian images, batch 10), pruned
--percent 0.5 by lasso. Then, on the same nets and images, only the forward prefixes each pass ran (the frozen
original and the current net, up to the pass's last layer, over every calibration batch) are timed inside every
pass, batch by batch, apart from the sampling, gathering and accumulation: the floor of any method that takes Y
from the original net and X from the pruned one. Reported: total, statistics, solves, the prefix forwards, and the
ratio total / prefix forwards (the issue's target: <= 1.5); ``--rerun`` also times the forwards again alone.
``--latency N`` then times the unpruned and the pruned net's whole forward (batch 1 and ``--latency-batch``, N runs
each, alternated, medians), the measured speed-up beside the MAC ratio: slim keeps residual-tied channels whole
(no runtime channel-selection layer, which made the authors' pruned ResNet-50 slower than the unpruned one).

memory mode (--memory N1 N2 ...): each calibration size in its own process on nets/vgg7_fashion.prototxt with its
own TRAIN data layer (Fashion-MNIST from Debian's dataset-fashion-mnist), peak RSS and wall time per size: the
statistics are fixed-size sums, so memory must stay flat while time grows with the images.

Usage:
    python benchmarks/bench_lasso.py --net vgg16 --images 40 [--size 224]
    python benchmarks/bench_lasso.py --net resnet50 --images 40 --latency 7
    python benchmarks/bench_lasso.py --memory 1000 2000 5000
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim.graph import build_graph  # noqa: E402
from slim.io import parse_net, read_net  # noqa: E402
from slim.net import Net  # noqa: E402
from slim.prune import Calibration, PrunePolicy, prune_net  # noqa: E402
from slim.prune.calibrate import CalibrationSource  # noqa: E402
from slim.prune.reconstruct import _nets  # noqa: E402

NETS = {"vgg16": "nets/vgg16_imagenet_deploy.prototxt", "resnet50": "nets/resnet50_imagenet_deploy.prototxt",
        "vgg7_fashion": "nets/vgg7_fashion.prototxt"}


def random_blobs(net_param, seed=0):
    net = Net(net_param, seed=seed)
    rng = np.random.default_rng(seed)
    out = {}
    for name, tensors in net.params.items():
        arrays = [t.detach().numpy().copy() for t in tensors]
        if net.graph.layer(name).type == "BatchNorm":
            arrays[0] = rng.normal(0, 0.1, arrays[0].shape).astype(np.float32)
            arrays[1] = rng.uniform(0.5, 1.5, arrays[1].shape).astype(np.float32)
            arrays[2] = np.ones(arrays[2].shape, np.float32)
        out[name] = arrays
    return out


def with_size(net_param, size):
    """The deploy net with its Input at size x size (the zoo files are 224)."""
    for layer in net_param.layer:
        if layer.type == "Input":
            dims = layer.input_param.shape[0].dim
            dims[2], dims[3] = size, size
    return net_param


def cost(args) -> dict:
    net = with_size(read_net(ROOT / NETS[args.net]), args.size)
    calib = parse_net(f'layer {{ name: "data" type: "DummyData" top: "data" dummy_data_param {{ shape {{ dim: 10 '
                      f'dim: 3 dim: {args.size} dim: {args.size} }} data_filler {{ type: "gaussian" std: 1 }} }} }}\n')
    blobs = random_blobs(net)
    cal = Calibration(images=args.images, samples_per_image=args.samples_per_image, net=calib, progress=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        result = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="lasso"), calibration=cal,
                           source=NETS[args.net])
        total = time.perf_counter() - t0
    rec = result.report.reconstruction
    forwards = None
    if args.rerun:
        # The floor measured again: the same forward prefixes, alone, on the same images (after the run, so exposed
        # to any change in the machine's load; the in-pass split below is interleaved batch by batch).
        graph = build_graph(net, "TEST", source=NETS[args.net])
        original, current = _nets(graph, blobs, "cpu")
        source = CalibrationSource.open(net, NETS[args.net], cal)
        t0 = time.perf_counter()
        with torch.no_grad():
            for end in rec["passes"]:
                for _, _, images in source.batches("cpu"):
                    original.run_layers({"data": images}, end)
                    current.run_layers({"data": images}, end)
        forwards = time.perf_counter() - t0
    return {"net": args.net, "size": args.size, "images": args.images, "samples_per_image": args.samples_per_image,
            "passes": len(rec["passes"]), "total_s": round(total, 2), "statistics_s": rec["seconds"]["statistics"],
            "solve_s": rec["seconds"]["solve"], "prefix_forwards_s": forwards and round(forwards, 2),
            "ratio_total_to_forwards": forwards and round(total / forwards, 3),
            "in_pass": {k: rec["seconds"][k] for k in ("forward", "gather", "accumulate")},
            "ratio_total_to_in_pass_forwards": round(rec["seconds"]["total"] / rec["seconds"]["forward"], 3),
            "macs": [result.report.macs_before, result.report.macs_after],
            "refitted": sum(1 for r in rec["layers"] if r["refitted"]), "sliced": sum(1 for r in rec["layers"]
                                                                                       if not r["refitted"]),
            "kept_whole": sorted(rec["pinned"]), "warnings": len(caught),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "mac_ratio": round(result.report.macs_before / result.report.macs_after, 3),
            "latency": latency(net, blobs, result, args.size, (1, args.latency_batch), args.latency)
            if args.latency else None, "threads": torch.get_num_threads(),
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def _load(net_param, blobs):
    """A slim Net of ``net_param`` holding ``blobs`` (name -> arrays), in eval mode."""
    net = Net(net_param, seed=0)
    with torch.no_grad():
        for name, tensors in net.params.items():
            for t, a in zip(tensors, blobs[name]):
                t.copy_(torch.from_numpy(np.asarray(a, np.float32)).reshape(t.shape))
    return net.eval()


def latency(net_param, blobs, result, size: int, batches, repeats: int) -> dict:
    """Median forward ms of the unpruned and the pruned net per batch size, runs alternated; outputs checked finite."""
    original, pruned = _load(net_param, blobs), _load(result.net, result.blobs)
    out = {}
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            assert all(torch.isfinite(t).all() for t in pruned(x).values())
            original(x)
            a, b = [], []
            for _ in range(repeats):
                for net, times in ((original, a), (pruned, b)) if len(a) % 2 == 0 else ((pruned, b), (original, a)):
                    t0 = time.perf_counter()
                    net(x)
                    times.append(time.perf_counter() - t0)
            ms_a, ms_b = float(np.median(a)) * 1e3, float(np.median(b)) * 1e3
            out[str(batch)] = {"unpruned_ms": round(ms_a, 1), "pruned_ms": round(ms_b, 1),
                               "speedup": round(ms_a / ms_b, 3)}
    return out


def memory_one(images: int) -> dict:
    net_path = ROOT / NETS["vgg7_fashion"]
    net = read_net(net_path)
    blobs = random_blobs(net)
    cal = Calibration(images=images, progress=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_net(net, blobs, PrunePolicy(percent=0.5, criterion="lasso"), calibration=cal,
                           source=str(net_path))
    sec = result.report.reconstruction["seconds"]
    return {"images": images, "seconds": round(time.perf_counter() - t0, 2), "statistics_s": sec["statistics"],
            "forward_s": sec["forward"], "gather_s": sec["gather"], "accumulate_s": sec["accumulate"],
            "solve_s": sec["solve"], "ratio_total_to_forwards": round(sec["total"] / sec["forward"], 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="vgg16", choices=["vgg16", "resnet50"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--samples-per-image", type=int, default=10)
    p.add_argument("--memory", type=int, nargs="+", metavar="N", help="memory mode: these calibration sizes")
    p.add_argument("--rerun", action="store_true", help="also time the prefix forwards alone after the run")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="also time the unpruned and the pruned net's forward, N alternated runs per batch size")
    p.add_argument("--latency-batch", type=int, default=8, help="the second batch size timed (default 8)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", help="append the results as JSON lines to this file")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("SLIM_THREADS", os.cpu_count() or 1)))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.one is not None:
        print(json.dumps(memory_one(args.one)))
        return 0
    rows = []
    if args.memory:
        for n in args.memory:
            out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(rows[-1], flush=True)
    else:
        rows.append(cost(args))
        print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
