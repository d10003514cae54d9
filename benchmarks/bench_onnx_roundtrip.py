"""Benchmark: the PyTorch user's path (torch model -> ONNX -> slim import -> slim prune -> slim export --onnx) and
what pruning buys in ONNX Runtime on this CPU: file size, conv+FC MACs (calflop) and measured latency.

For each hand-built torch model (tests/torch_models.py at full width: VGG-16 and ResNet-18 layouts at CIFAR size,
MobileNet-v2's stages at 64x64; BatchNorm statistics random), the model is exported by torch.onnx.export (legacy
exporter, BatchNorm kept), imported, pruned with ``--percent P --criterion l1`` and both the imported and the pruned
net are exported by ``slim export`` (same exporter, so the two files differ only by the pruning). Each file is then
timed in ONNX Runtime (CPUExecutionProvider, ``--threads`` intra-op threads, batch ``--batch``): the two sessions
alternate, ``--reps`` rounds of ``--iters`` runs each after a warm-up; the median and the best round are reported.

Usage:
    python benchmarks/bench_onnx_roundtrip.py [--percent 0.5] [--batch 8] [--threads 1] [--reps 7] [--iters 5]
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from slim.flops import calflop  # noqa: E402
from slim.interop import export_onnx, import_onnx, write_imported  # noqa: E402
from slim.interop.onnx_import import check_imported  # noqa: E402
from slim.prune import PrunePolicy, prune_net, write_pruned  # noqa: E402
from torch_models import MobileNetLike, ResNetLike, VGGLike, randomize_batchnorm  # noqa: E402

MODELS = {
    "vgg16": (lambda: VGGLike((64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)),
              32),
    "resnet18": (lambda: ResNetLike((64, 128, 256, 512)), 32),
    "mobilenet_v2": (lambda: MobileNetLike(setting=MobileNetLike.V2_SETTING, stem=32, last=1280), 64),
}


def timed(session, feed, iters):
    start = time.perf_counter()
    for _ in range(iters):
        session.run(None, feed)
    return (time.perf_counter() - start) / iters


def bench(name, args, folder):
    import onnxruntime as ort

    make, size = MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(make())
    if name == "vgg16":  # VGGLike's classifier expects 4x4 features; the 16-layer stack leaves 2x2 at 32x32
        model.classifier[0] = torch.nn.Linear(512 * 2 * 2, 24)
    x = torch.randn(2, 3, size, size)
    src = folder / f"{name}.onnx"
    torch.onnx.export(model.eval(), (x,), str(src), dynamo=False, do_constant_folding=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    imported = import_onnx(str(src))
    check = check_imported(imported, str(src))
    proto, weights = write_imported(imported, folder / name)
    result = prune_net(proto, weights, PrunePolicy(percent=args.percent, criterion="l1"))
    paths = write_pruned(result, folder / f"{name}_pruned")
    full = export_onnx(proto, folder / f"{name}_full.onnx", weights=weights, exporter="legacy")
    small = export_onnx(paths["prototxt"], folder / f"{name}_small.onnx", weights=paths["caffemodel"],
                        exporter="legacy")

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"])
                for k, p in (("full", full.path), ("pruned", small.path))}
    feed = {"image": np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)}
    for s in sessions.values():
        timed(s, feed, 2)
    times = {"full": [], "pruned": []}
    for _ in range(args.reps):
        for k in ("full", "pruned"):
            times[k].append(timed(sessions[k], feed, args.iters))
    macs = calflop(proto).macs(), calflop(paths["prototxt"]).macs()
    sizes = os.path.getsize(full.path), os.path.getsize(small.path)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return dict(name=name, size=size, import_rel=check.max_rel, full_check=full.check.max_rel,
                pruned_check=small.check.max_rel, removed=result.report.removed, prunable=result.report.prunable,
                macs=macs, bytes=sizes, med=med, best=best)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percent", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"batch {args.batch}, {args.threads} thread(s), {args.reps} rounds x {args.iters} runs, "
          f"--percent {args.percent} --criterion l1")
    print("| model | input | channels removed | file MB full / pruned | conv+FC MMACs full / pruned (ratio) | "
          "ORT ms/batch full / pruned, median (best) | measured speed-up median (best) | max rel. diff import / "
          "export full / pruned |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = bench(name, args, Path(tmp))
            mac_ratio = r["macs"][0] / r["macs"][1]
            print(f"| {name} | {r['size']}x{r['size']} | {r['removed']} of {r['prunable']} | "
                  f"{r['bytes'][0] / 2**20:.1f} / {r['bytes'][1] / 2**20:.1f} | "
                  f"{r['macs'][0] / 1e6:.1f} / {r['macs'][1] / 1e6:.1f} ({mac_ratio:.2f}x) | "
                  f"{r['med']['full'] * 1e3:.1f} / {r['med']['pruned'] * 1e3:.1f} "
                  f"({r['best']['full'] * 1e3:.1f} / {r['best']['pruned'] * 1e3:.1f}) | "
                  f"{r['med']['full'] / r['med']['pruned']:.2f}x ({r['best']['full'] / r['best']['pruned']:.2f}x) | "
                  f"{r['import_rel']:.1e} / {r['full_check']:.1e} / {r['pruned_check']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
