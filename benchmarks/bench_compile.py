"""Benchmark: a training step of slim's ``Solver(compile=True)`` against the same hand-written model under
``torch.compile``, on the CPU (bench_train_step's nets, batch, recipe and reference step).

  slim       bench_train_step.slim_solver(..., compile=True): the train net's forward through torch.compile (static
             shapes), backward, Caffe's update.
  reference  bench_train_step's hand-written model passed through torch.compile(dynamic=False), then the reference
             step (cross-entropy, backward, the network-slimming penalty, torch.optim.SGD).

Both compile on their first step (timed apart and reported); the graphs dynamo captured for the net's forward are
counted with torch._dynamo.explain. Then ``--reps`` steps each, alternated (slim first in even rounds, the reference
first in odd ones), medians.

Usage:
    python benchmarks/bench_compile.py [--nets resnet56 vgg19] [--reps 7] [--threads 1]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import BATCH, NETS, reference_step, slim_solver  # noqa: E402  (beside this script)


def graphs_of(fn, *args) -> int:
    """The number of graphs dynamo captures for ``fn(*args)``."""
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_count


def bench(name, reps):
    torch.manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.randint(0, 10, (BATCH,))
    path, cls = NETS[name]
    solver = slim_solver(path, images, labels.float(), torch.device("cpu"), compile=True)
    model = cls()
    compiled = torch.compile(model, dynamic=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    steps = {"slim": lambda: solver.step(1),
             "reference": lambda: reference_step(compiled, optimizer, bns, images, labels)}
    first = {}
    for side in ("slim", "reference"):
        t = time.perf_counter()
        steps[side]()
        first[side] = time.perf_counter() - t
    gave_up = solver._forward.gave_up
    times = {"slim": [], "reference": []}
    cpu = {"slim": [], "reference": []}
    for rep in range(reps):
        for side in (("slim", "reference") if rep % 2 == 0 else ("reference", "slim")):
            t, c = time.perf_counter(), time.process_time()
            steps[side]()
            times[side].append(time.perf_counter() - t)
            cpu[side].append(time.process_time() - c)
    net_graphs = graphs_of(lambda batch: solver.net(**batch), solver.net.next_batch())   # what the Solver compiles
    hand_graphs = graphs_of(model, images)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: batch {BATCH}, {reps} steps each after the compiling one, CPU")
    print(f"  first step (compiles): slim {first['slim']:.1f} s, reference {first['reference']:.1f} s"
          f"{'  (slim gave up compiling: eager)' if gave_up else ''}")
    print(f"  graphs captured by dynamo for the forward: slim {net_graphs}, reference {hand_graphs}")
    for k, v in times.items():
        print(f"  {k:<10} median {med[k] * 1000:8.1f} ms  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
    ratios = [a / b for a, b in zip(times["slim"], times["reference"])]
    print(f"  ratio slim / reference: medians {med['slim'] / med['reference']:.3f}, median pair ratio "
          f"{statistics.median(ratios):.3f}")
    cpu_ratios = [a / b for a, b in zip(cpu["slim"], cpu["reference"])]
    print(f"  CPU time (this process): slim {statistics.median(cpu['slim']) * 1000:.1f} ms, reference "
          f"{statistics.median(cpu['reference']) * 1000:.1f} ms; ratio of medians "
          f"{statistics.median(cpu['slim']) / statistics.median(cpu['reference']):.3f}, median pair ratio "
          f"{statistics.median(cpu_ratios):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["resnet56", "vgg19"], choices=list(NETS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.node()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d %H:%M')}")
    for name in args.nets:
        bench(name, args.reps)


if __name__ == "__main__":
    main()
