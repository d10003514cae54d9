"""Benchmark: the time of one training iteration with 2 gloo CPU processes against 1 process.

Each process trains nets/<net>.prototxt with its data layers replaced by constant DummyData (batch 64, 3x32x32,
so no data reading is timed) under slim's Solver, started the way ``slim train --procs N`` starts them, with the
same number of threads per process (default 1). Every process computes the prototxt's batch, so with 2 processes
an iteration covers twice the images: ratio = (2-process iteration time) / (1-process iteration time); 1.0 would be
perfect scaling; the excess is the gradient all-reduce (coalesced into ~25 MB buckets) and contention for the
machine's cores, memory bandwidth and caches.

Usage:
    python benchmarks/bench_ddp.py [--nets resnet56 vgg19] [--iters 12] [--warmup 2] [--threads 1]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim import proto as pb  # noqa: E402
from slim.io import read_net, solver_to_text, write_net  # noqa: E402
from slim.solver import Hook, TrainConfig, train  # noqa: E402
from _zoo_data import replace_train_data  # noqa: E402  (beside this script)

NETS = {"resnet56": "nets/resnet56_cifar10.prototxt", "vgg19": "nets/vgg19_cifar10.prototxt"}


class IterationTimes(Hook):
    """Records when each iteration ends on rank 0 and writes the times to a JSON file at the end."""

    def __init__(self, out: str, last: int):
        self.out, self.last, self.times = out, last, []

    def after_step(self, solver):
        if solver.dist.rank == 0:
            self.times.append(time.perf_counter())
            if solver.iter == self.last:
                Path(self.out).write_text(json.dumps(self.times))


def _constant_data(layer: pb.LayerParameter) -> pb.LayerParameter:
    dummy = pb.LayerParameter(name=layer.name, type="DummyData", top=list(layer.top))
    dp = dummy.dummy_data_param
    dp.shape.add().dim.extend([64, 3, 32, 32])
    dp.shape.add().dim.extend([64])
    dp.data_filler.add(type="constant", value=0.5)
    dp.data_filler.add(type="constant", value=1)
    return dummy


def constant_data_net(path: str, folder: Path) -> Path:
    net = read_net(ROOT / path)
    replace_train_data(net, _constant_data)
    out = folder / "net.prototxt"
    write_net(net, out)
    return out


def run(net_path: Path, folder: Path, procs: int, iters: int, warmup: int, threads: int) -> float:
    solver = pb.SolverParameter(net=str(net_path), base_lr=0.01, lr_policy="fixed", momentum=0.9, weight_decay=1e-4,
                                max_iter=iters, display=0, snapshot_after_train=False, random_seed=1,
                                snapshot_prefix=str(folder / "run"))
    solver.sparsity.penalty = 1e-4
    path = folder / f"solver{procs}.prototxt"
    path.write_text(solver_to_text(solver))
    out = folder / f"times{procs}.json"
    os.environ["OMP_NUM_THREADS"] = str(threads)  # each spawned process uses this many threads
    torch.set_num_threads(threads)
    train(TrainConfig(str(path), procs=procs, hooks=[IterationTimes(str(out), iters)], progress=False,
                      log_level=30))
    times = json.loads(out.read_text())
    steps = [b - a for a, b in zip(times, times[1:])][warmup:]
    return statistics.median(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args()
    print(f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {args.threads} thread(s) per process")
    for name in args.nets:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            net = constant_data_net(NETS[name], folder)
            one = run(net, folder, 1, args.iters, args.warmup, args.threads)
            two = run(net, folder, 2, args.iters, args.warmup, args.threads)
        print(f"{name}: 1 process {one * 1000:.1f} ms/iteration (64 images), 2 processes {two * 1000:.1f} "
              f"ms/iteration (128 images); ratio {two / one:.3f}, throughput x{2 * one / two:.2f}")


if __name__ == "__main__":
    main()
