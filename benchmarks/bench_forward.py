"""Benchmark: slim.Net's inference forward and construction against the same models written by hand in PyTorch.

Nets: nets/resnet164_cifar10_deploy.prototxt, nets/densenet40_cifar10_deploy.prototxt, nets/vgg19_cifar10_deploy
.prototxt against benchmarks/_hand_models.py (the hand model gets the net's blobs and must give the same output
before anything is timed). Inference: eval mode, torch.no_grad, a batch of ``--batch`` random 3x32x32 images, CPU.

  time     both models in one process, forwards alternated (slim, hand, hand, slim, ...), ``--reps`` each; medians,
           the ratio of the medians and the median of the per-pair ratios.
  memory   peak resident memory of one forward above the memory before it, each model in a fresh process (runs
           alternated), the peak reset through /proc/self/clear_refs after a small warm-up forward; and, allocator
           aside, the peak bytes of live tensors the forward created (a TorchDispatchMode that follows storages).
  build    ``slim.Net(prototxt path)`` (parse, graph, fillers) against the hand model's constructor (its own
           initialisation), alternated in one process, ``--build-reps`` each.

Usage:
    python benchmarks/bench_forward.py [--nets resnet164 densenet40 vgg19] [--batch 64] [--reps 9] [--threads 1]
                                       [--memory-reps 3] [--build-reps 9] [--skip time memory build]
"""

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slim.net import Net  # noqa: E402
from _hand_models import HAND_MODELS, load_from_net, neutral_batchnorm  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created by ops while the mode is on and still referenced (a view counts once)."""

    def __init__(self):
        super().__init__()
        self.refs, self.live, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.refs:
                storage = t.untyped_storage()
                self.refs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.refs = {k: (r, n) for k, (r, n) in self.refs.items() if not r.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def build(key, which):
    """The slim Net or the hand model of ``key``, in eval mode; the Net's BatchNorm statistics mean 0, variance 1
    (Caffe's fillers leave them all zero, which divides by sqrt(eps) in every layer)."""
    path, cls = HAND_MODELS[key]
    if which == "hand":
        return cls().eval()
    return neutral_batchnorm(Net(ROOT / path, seed=0).eval())


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(key, which, batch):
    """In a fresh process: bytes of peak RSS above the RSS before one forward of ``batch`` images."""
    model = build(key, which)
    run(model, torch.randn(2, 3, 32, 32))      # kernels chosen, lazy state made
    x = torch.randn(batch, 3, 32, 32)
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")    # reset VmHWM to the current RSS (Linux 4.0+)
    run(model, x)
    return _status("VmHWM") - before


def memory(key, batch, reps, fixed_threshold):
    """Median peak-RSS deltas (slim, hand) over ``reps`` fresh processes each, alternated.

    glibc's malloc raises its mmap threshold as large blocks are freed, after which freed blocks may stay in the
    heap; which ones depends on the order of allocations, so peaks vary from run to run by 2x or more for the same
    model. ``fixed_threshold`` pins the threshold (MALLOC_MMAP_THRESHOLD_=128 KiB), so every large tensor is its own
    mapping, returned when freed, and the peak follows the tensors.
    """
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if fixed_threshold else {}))
    out = {"slim": [], "hand": []}
    for rep in range(reps):
        for which in (("slim", "hand") if rep % 2 == 0 else ("hand", "slim")):
            done = subprocess.run([sys.executable, __file__, "--child-memory", key, which, str(batch)],
                                  capture_output=True, text=True, check=True, env=env)
            out[which].append(int(done.stdout.split()[-1]))
    return {k: statistics.median(v) for k, v in out.items()}, out


def live_bytes(model, x):
    with LiveBytes() as live:
        run(model, x)
    return live.peak


def paired(key, batch, reps):
    """Forward times (slim, hand) alternated in one process; the models compute the same function (checked)."""
    net = build(key, "slim")
    hand = load_from_net(HAND_MODELS[key][1](), net).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = run(net, x)[net.outputs[0]], run(hand, x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    fns = {"slim": lambda: run(net, x), "hand": lambda: run(hand, x)}
    for f in fns.values():
        f()
    times = {"slim": [], "hand": []}
    for rep in range(reps):
        for which in (("slim", "hand") if rep % 2 == 0 else ("hand", "slim")):
            t = time.perf_counter()
            fns[which]()
            times[which].append(time.perf_counter() - t)
    live = {"slim": live_bytes(net, x), "hand": live_bytes(hand, x)}
    return times, live


def build_times(key, reps):
    """Construction times (slim, hand), alternated: wall seconds and this process's CPU seconds (which a shared
    machine's other jobs do not inflate; construction runs on one thread)."""
    path, cls = HAND_MODELS[key]
    wall, cpu = {"slim": [], "hand": []}, {"slim": [], "hand": []}
    Net(ROOT / path), cls()  # imports and first-use caches out of the way
    for rep in range(reps):
        for which in (("slim", "hand") if rep % 2 == 0 else ("hand", "slim")):
            t, c = time.perf_counter(), time.process_time()
            Net(ROOT / path, seed=0) if which == "slim" else cls()
            wall[which].append(time.perf_counter() - t)
            cpu[which].append(time.process_time() - c)
    return wall, cpu


def _summary(times, unit=1e3, fmt="{:.1f}"):
    s, h = times["slim"], times["hand"]
    ratios = [a / b for a, b in zip(s, h)]
    ms, mh = statistics.median(s), statistics.median(h)
    return (f"slim {fmt.format(ms * unit)} ({fmt.format(min(s) * unit)}-{fmt.format(max(s) * unit)}), hand "
            f"{fmt.format(mh * unit)} ({fmt.format(min(h) * unit)}-{fmt.format(max(h) * unit)}); ratio of medians "
            f"{ms / mh:.3f}, median pair ratio {statistics.median(ratios):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(HAND_MODELS), choices=list(HAND_MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--build-reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["time", "memory", "build"])
    parser.add_argument("--child-memory", nargs=3, metavar=("NET", "WHICH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        key, which, batch = args.child_memory
        print(child_memory(key, which, int(batch)))
        return
    print(f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), batch {args.batch}, {time.strftime('%Y-%m-%d %H:%M')}")
    for key in args.nets:
        print(f"\n{key} ({HAND_MODELS[key][0]})")
        if "time" not in args.skip:
            times, live = paired(key, args.batch, args.reps)
            print(f"  forward ms: {_summary(times)}")
            print(f"  live tensor peak MB: slim {live['slim'] / 1e6:.1f}, hand {live['hand'] / 1e6:.1f}, ratio "
                  f"{live['slim'] / live['hand']:.3f}")
        if "memory" not in args.skip:
            for fixed in (True, False):
                med, runs = memory(key, args.batch, args.memory_reps, fixed)
                print(f"  peak RSS above the pre-forward RSS, MB, {'fixed' if fixed else 'default'} mmap threshold "
                      f"(medians of fresh processes): slim {med['slim'] / 1e6:.1f}, hand {med['hand'] / 1e6:.1f}, "
                      f"ratio {med['slim'] / med['hand']:.3f}  (runs slim {[round(v / 1e6) for v in runs['slim']]}, "
                      f"hand {[round(v / 1e6) for v in runs['hand']]})")
        if "build" not in args.skip:
            wall, cpu = build_times(key, args.build_reps)
            print(f"  construction ms, wall: {_summary(wall)}")
            print(f"  construction ms, CPU:  {_summary(cpu)}")


if __name__ == "__main__":
    main()
