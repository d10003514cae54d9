"""GPU check: every CUDA path slim has, compared with the CPU or with float32 eager training, and training images/s.

One command, one JSON file, exit status 1 when a check fails (0 otherwise, 2 for bad flags):

    python benchmarks/gpu_check.py --out out/gpu_check/gpu_check.json     # on a GPU machine; a few minutes
    python benchmarks/gpu_check.py --device cpu --tiny                    # CPU smoke run (tests/test_gpu_check.py)

Checks, each recorded with its status (pass, fail, skipped and why), the measured difference and the tolerance:

  zoo/<net>/forward, /backward   every deploy net of nets/ on CUDA against the same weights on the CPU (TEST phase,
                                 random BatchNorm statistics): the output, then the gradients of the input and of every
                                 blob for a random linear function of the output.
  ddp/...                        ``slim train --gpus`` (slim.solver.train, NCCL, one process per GPU) for a few
                                 iterations against one process on the prototxt's batch x processes: the weights'
                                 updates. On one GPU, --gpus runs one process without a process group, as Caffe does;
                                 the check then compares that path with a Solver on the same GPU and nccl/allreduce
                                 runs slim's GradientReducer in a one-process NCCL group. On the CPU: two gloo
                                 processes stand in (ddp/gloo_2procs) and the NCCL checks are skipped.
  train/<net>/<option>           Solver(amp="bf16" | "fp16", channels_last=True, compile=True) against a float32 eager
                                 Solver on the same device, same weights and batches: the weights' updates after 1
                                 step (amp) or 3 steps (channels_last, compile: a recompilation shows at step 2).
                                 fp16: an iteration whose scaled gradients overflow is skipped (torch's GradScaler);
                                 the check then restarts at the lowered scale, and records it.

Difference. a = the path under check, b = its reference. ``max_abs`` = max |a - b| over all compared values;
``rel`` = ||a - b||_2 / ||b||_2 over all of them together, the check's measure (``worst`` names the tensor with the
largest ||a - b|| / ||b||, for diagnosis). A NaN or infinity fails.

TF32. torch computes float32 convolutions on CUDA in TF32 (10-bit mantissa) by default. The equivalence checks turn
TF32 off (their processes included), since they compare float32 arithmetic; the throughput rows keep torch's default,
the same for every row, and record it. cudnn.benchmark is on for the throughput rows, as ``slim train`` sets it.

Throughput: images/s of VGG-19 on CIFAR shapes under slim against a hand-written PyTorch loop and against the papers'
pipeline style (see benchmarks/_throughput.py); rounds interleaved with the order rotated, medians and ratios.
``--fashion`` also runs benchmarks/bench_fashion.py in full mode, when it exists, with --out beside the JSON.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim import proto as pb  # noqa: E402
from slim.io import read_caffemodel, solver_to_text  # noqa: E402
from slim.net import Net  # noqa: E402
from slim.solver import Hook, Solver, TrainConfig, train  # noqa: E402
from slim.solver.distributed import GradientReducer, free_port, init_process_group  # noqa: E402
import _throughput  # noqa: E402  (beside this script)
from bench_train_step import slim_solver  # noqa: E402

NO_CUDA = "skipped: no CUDA"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A bound on ``rel`` and the reason for its size."""

    rel: float
    why: str


TOLERANCES = {
    "forward": Tolerance(1e-4, "float32 both sides (unit round-off 6e-8); cuDNN and the CPU's kernels sum in "
                               "different orders and with different algorithms (implicit GEMM, Winograd, FFT), and "
                               "the error grows with depth (up to 164 layers here): typically 1e-6..1e-5"),
    "backward": Tolerance(1e-3, "as forward, through the backward pass too (twice the depth; weight gradients sum over "
                                "batch and pixels)"),
    "ddp": Tolerance(1e-4, "float32; the all-reduce and the batch split change only the order of the sums"),
    "channels_last": Tolerance(1e-4, "float32, other kernels for the same convolutions; 3 steps"),
    "compile": Tolerance(1e-3, "float32, inductor fuses and reorders BatchNorm's reductions; 3 steps"),
    "bf16": Tolerance(1e-1, "bfloat16 keeps 8 mantissa bits (round-off 3.9e-3) in every forward and backward op; "
                            "a wrong path (no update, gradients left scaled, weights cast) gives rel >= 1"),
    "fp16": Tolerance(2e-2, "float16 keeps 11 mantissa bits (round-off 4.9e-4), gradients scaled then unscaled; "
                            "a wrong path gives rel >= 1"),
}

# Below this, an --amp run differs too little from float32 for autocast to have run (its rounding alone exceeds it).
AMP_FLOOR = {"bf16": 1e-6, "fp16": 1e-6}
# The training nets of the train/ checks: prototxt, batch, image shape (their data layers become MemoryData).
# ResNet-20 rather than a deeper ResNet: the same blocks and shortcuts, and torch.compile's time grows with depth.
TRAIN_NETS = {"vgg19_cifar10": ("nets/vgg19_cifar10.prototxt", 64, (3, 32, 32)),
              "resnet20_cifar10": ("nets/resnet20_cifar10.prototxt", 64, (3, 32, 32))}
TINY_TRAIN_NETS = {"demo_digits": ("nets/demo_digits.prototxt", 16, (1, 8, 8))}
TINY_ZOO = ("demo_digits_deploy", "resnet20_cifar10_deploy", "vgg19_cifar10_deploy")
OPTIONS = {"bf16": (dict(amp="bf16"), 1), "fp16": (dict(amp="fp16"), 1),
           "channels_last": (dict(channels_last=True), 3), "compile": (dict(compile=True), 3)}
DDP_ITERS = 4
DDP_NET = """name: "ddp_check"
layer { name: "data" type: "SlimData" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.0625 }
  slim_data_param { dataset: DIGITS batch_size: %d train: true shuffle: false } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


# ----- measuring and recording ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Diff:
    """How far tensors under check are from their references (see the module docstring)."""

    max_abs: float
    rel: float
    worst: str


def diff(pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Diff:
    """The difference of ``a`` from ``b`` over every named pair ``(a, b)`` (compared in float64 on the CPU)."""
    num = den = max_abs = 0.0
    worst, worst_rel = "", -1.0
    for name, (a, b) in pairs.items():
        a = torch.as_tensor(a).detach().to("cpu", torch.float64)
        b = torch.as_tensor(b).detach().to("cpu", torch.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} under check, {tuple(b.shape)} in the reference")
        d = a - b
        d2, b2 = float(d.pow(2).sum()), float(b.pow(2).sum())
        num, den = num + d2, den + b2
        if d.numel():
            m = float(d.abs().max())
            max_abs = m if not math.isfinite(m) or m > max_abs else max_abs
        r = math.sqrt(d2 / b2) if b2 else (0.0 if d2 == 0 else math.inf)
        if not r <= worst_rel:  # NaN counts as the worst
            worst, worst_rel = name, r
    rel = math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf)
    return Diff(max_abs, rel, worst)


def _num(x):
    """A JSON-safe number: NaN and infinities as strings."""
    return x if x is None or math.isfinite(x) else str(x)


@dataclasses.dataclass
class Check:
    """One check's outcome. ``status``: "pass", "fail" or "skipped"; ``note`` says why when it is not a pass."""

    name: str
    status: str
    device: str = ""
    tol: Optional[float] = None
    max_abs: Optional[float] = None
    rel: Optional[float] = None
    worst: Optional[str] = None
    note: str = ""
    seconds: Optional[float] = None
    details: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def measured(cls, name: str, d: Diff, tol: float, device: torch.device, **details) -> "Check":
        """Pass when ``d.rel <= tol`` (a NaN fails)."""
        return cls(name, "pass" if d.rel <= tol else "fail", str(device), tol, d.max_abs, d.rel, d.worst,
                   "" if d.rel <= tol else f"rel {d.rel:.3g} > tolerance {tol:g}", details=details)

    @classmethod
    def skipped(cls, name: str, why: str) -> "Check":
        return cls(name, "skipped", note=why)

    @classmethod
    def failed(cls, name: str, why: str, device: torch.device) -> "Check":
        return cls(name, "fail", str(device), note=why)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(max_abs=_num(self.max_abs), rel=_num(self.rel))
        return out

    def line(self) -> str:
        if self.rel is None:
            return f"{self.status.upper():7} {self.name}  {self.note}"
        return (f"{self.status.upper():7} {self.name}  rel {self.rel:.3g} (tol {self.tol:g}), max abs "
                f"{self.max_abs:.3g}, worst {self.worst}" + (f"  [{self.note}]" if self.note else ""))


def guarded(names: Sequence[str], device: torch.device, fn: Callable[[], List[Check]]) -> List[Check]:
    """``fn()``, timed and printed; an exception fails every check in ``names`` with its message."""
    start = time.perf_counter()
    try:
        checks = fn()
    except Exception as e:  # noqa: BLE001 - a crash is a finding, recorded as a failure
        message = f"{type(e).__name__}: {e}".strip()
        checks = [Check.failed(n, "error: " + message[-2000:], device) for n in names]
    for c in checks:
        c.seconds = round(time.perf_counter() - start, 3)
        print(c.line(), flush=True)
    return checks


@contextlib.contextmanager
def fp32_only():
    """TF32 off in cuBLAS and cuDNN for the duration (and cudnn.benchmark restored afterwards)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class Fp32Only(Hook):
    """Turns TF32 off in each training process (spawned processes do not inherit the parent's torch flags)."""

    def before_step(self, solver):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def weights(net) -> Dict[str, torch.Tensor]:
    """Every blob of ``net``, copied to the CPU, by ``layer[i]``."""
    return {f"{name}[{i}]": t.detach().to("cpu", copy=True) for name, blobs in net.params.items()
            for i, t in enumerate(blobs)}


# ----- zoo: forward and backward on CUDA against the CPU -------------------------------------------------------------
def _same_bn_statistics(nets: Sequence[Net]) -> None:
    """Random running means and variances (scale factor 1), the same in every net: fresh ones are all zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for node in nets[0].graph.layers:
            if node.type == "BatchNorm":
                c = nets[0].params[node.name][0].numel()
                mean, var = 0.1 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)
                for net in nets:
                    for blob, value in zip(net.params[node.name], (mean, var, torch.ones(1))):
                        blob.copy_(value.view(blob.shape))


def _forward_backward(net: Net, x: torch.Tensor, device: torch.device):
    """The output for ``x`` and the gradients of a fixed random linear function of it."""
    x = x.to(device).requires_grad_()
    (out,) = net(x).values()
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (out * r).sum().backward()
    grads = {"input": x.grad}
    grads.update({f"{name}[{i}]": t.grad for name, blobs in net.params.items() for i, t in enumerate(blobs)
                  if t.grad is not None})
    return out.detach(), grads


def zoo_net(path: Path, device: torch.device) -> List[Check]:
    """One deploy net: forward and backward on ``device`` against the CPU."""
    nets = [Net(path, phase="TEST", seed=0) for _ in range(2)]
    _same_bn_statistics(nets)
    a, b = weights(nets[0]), weights(nets[1])
    if any(not torch.equal(a[k], b[k]) for k in a):
        raise AssertionError("two nets built with seed 0 have different weights, so there is nothing to compare")
    source = next(n for n in nets[0].graph.layers if n.type == "Input")
    batch = 2 if "imagenet" in path.name else 8
    x = torch.randn((batch,) + tuple(source.top_shapes[0][1:]), generator=torch.Generator().manual_seed(0))
    with fp32_only():
        cpu_out, cpu_grads = _forward_backward(nets[0], x, torch.device("cpu"))
        gpu_out, gpu_grads = _forward_backward(nets[1].to(device), x, device)
    if cpu_grads.keys() != gpu_grads.keys():
        raise AssertionError(f"gradients of {sorted(cpu_grads.keys() ^ gpu_grads.keys())} exist on one side only")
    stem = path.name[:-len(".prototxt")]
    return [Check.measured(f"zoo/{stem}/forward", diff({"output": (gpu_out, cpu_out)}), TOLERANCES["forward"].rel,
                           device, batch=batch),
            Check.measured(f"zoo/{stem}/backward", diff({k: (gpu_grads[k], cpu_grads[k]) for k in cpu_grads}),
                           TOLERANCES["backward"].rel, device, batch=batch, tensors=len(cpu_grads))]


def zoo_checks(device: torch.device, tiny: bool) -> List[Check]:
    paths = sorted((ROOT / "nets").glob("*_deploy.prototxt"))
    if tiny:
        paths = [p for p in paths if p.name[:-len(".prototxt")] in TINY_ZOO]
    checks = []
    for p in paths:
        names = [f"zoo/{p.name[:-len('.prototxt')]}/{part}" for part in ("forward", "backward")]
        if device.type != "cuda":
            checks += [Check.skipped(n, NO_CUDA) for n in names]
        else:
            checks += guarded(names, device, lambda: zoo_net(p, device))
    return checks


# ----- ddp: several processes against one ----------------------------------------------------------------------------
def _ddp_solver(folder: Path, name: str, batch: int) -> Path:
    """A solver of DDP_NET (no BatchNorm, whose per-process statistics would differ; no shuffling)."""
    net = folder / f"{name}_net.prototxt"
    net.write_text(DDP_NET % batch)
    solver = pb.SolverParameter(net=str(net), base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=1e-4,
                                max_iter=DDP_ITERS, display=0, snapshot_after_train=True, random_seed=1,
                                snapshot_prefix=str(folder / name))
    path = folder / f"{name}.prototxt"
    path.write_text(solver_to_text(solver))
    return path


def ddp_run(folder: Path, procs: int, launch: dict, device: torch.device, name: str) -> Check:
    """Train DDP_NET with ``launch`` (TrainConfig's gpus or procs) on batch 16 per process, and one Solver on
    ``device`` with batch 16 x procs; compare the weights' updates."""
    per_process = _ddp_solver(folder, "ddp", 16)
    single = _ddp_solver(folder, "single", 16 * procs)
    with fp32_only():
        reference = Solver(str(single), device=device, metrics=False)
        w0 = weights(reference.net)
        train(TrainConfig(str(per_process), hooks=[Fp32Only()], progress=False, log_level=logging.WARNING, **launch))
        reference.solve()
    w = weights(reference.net)
    model = read_caffemodel(folder / f"ddp_iter_{DDP_ITERS}.caffemodel")
    ddp = {f"{layer.name}[{i}]": torch.from_numpy(np.array(b)) for layer in model.layers for i, b in
           enumerate(layer.blobs)}
    if ddp.keys() != w.keys():
        raise AssertionError(f"the DDP snapshot holds {sorted(ddp)}, the single process {sorted(w)}")
    pairs = {k: (ddp[k].view(w[k].shape) - w0[k], w[k] - w0[k]) for k in w}
    return Check.measured(name, diff(pairs), TOLERANCES["ddp"].rel, device, processes=procs, iterations=DDP_ITERS,
                          launch=launch)


def nccl_allreduce(device: torch.device) -> Check:
    """slim's GradientReducer (several buckets, the flags) in a one-process NCCL group: gradients unchanged."""
    dist = init_process_group(0, 1, device, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        g = torch.Generator().manual_seed(0)
        tensors = [torch.zeros(s, device=device, requires_grad=True) for s in ((64, 3, 3, 3), (64,), (10, 4096))]
        reducer = GradientReducer(tensors, dist, bucket_bytes=8192)
        grads = [torch.randn(t.shape, generator=g) for t in tensors]
        for t, v in zip(tensors, grads):
            t.grad.copy_(v.to(device))
        sent = [1.0, 0.0, 0.0, 1.0]
        flags = reducer.all_reduce(sent)
        pairs = {f"grad{i}": (t.grad, v) for i, (t, v) in enumerate(zip(tensors, grads))}
        pairs["flags"] = (torch.tensor(flags), torch.tensor(sent))
        return Check.measured("nccl/allreduce", diff(pairs), 0.0, device, buckets=reducer.num_buckets)
    finally:
        torch.distributed.destroy_process_group()


def ddp_checks(device: torch.device, folder: Path) -> List[Check]:
    if device.type != "cuda":
        checks = [Check.skipped("ddp/nccl", NO_CUDA), Check.skipped("nccl/allreduce", NO_CUDA)]
        return checks + guarded(["ddp/gloo_2procs"], device,
                                lambda: [ddp_run(folder, 2, dict(procs=2), device, "ddp/gloo_2procs")])
    n = torch.cuda.device_count()
    name = f"ddp/nccl_{n}gpus" if n > 1 else "ddp/one_gpu"
    checks = guarded([name], device, lambda: [ddp_run(folder, n, dict(gpus=list(range(n))), device, name)])
    if n == 1:
        checks[0].details["note"] = ("one GPU: --gpus runs one process without a process group (Caffe's semantics), "
                                     "compared with a Solver on the same GPU; nccl/allreduce checks NCCL itself")
    return checks + guarded(["nccl/allreduce"], device, lambda: [nccl_allreduce(device)])


# ----- train: slim's fast paths against float32 eager ----------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What a few training iterations did: the blobs' updates, the initial blobs, losses, seconds per step, and the
    fp16 loss scale before and after (None without fp16), and evidence that the option took effect."""

    updates: Dict[str, torch.Tensor]
    initial: Dict[str, torch.Tensor]
    losses: List[float]
    seconds: List[float]
    scales: Tuple[Optional[float], Optional[float]]
    evidence: dict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(spec: tuple, device: torch.device, steps: int, scale: Optional[float] = None, **options) -> _Run:
    """``steps`` iterations of bench_train_step's recipe on the net of ``spec`` with fixed random batches."""
    path, batch, shape = spec
    g = torch.Generator().manual_seed(0)
    images = torch.randn((4 * batch,) + shape, generator=g)
    labels = torch.randint(0, 10, (4 * batch,), generator=g).float()
    if options.get("compile"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    solver = slim_solver(path, images, labels, device, batch=batch, **options)
    if scale is not None:
        solver.precision.load_scaler_state(scale, 0)
    before = solver.precision.scaler_state()
    w0 = weights(solver.net)
    losses, seconds = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        solver.step(1)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(solver.loss)
    w = weights(solver.net)
    after = solver.precision.scaler_state()
    four_d = [t for t in solver.net.parameters() if t.dim() == 4]
    evidence = {"blobs_4d": len(four_d),
                "channels_last_blobs": sum(t.is_contiguous(memory_format=torch.channels_last) for t in four_d)}
    if options.get("compile"):
        counters = torch._dynamo.utils.counters
        evidence.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    return _Run({k: w[k] - w0[k] for k in w}, w0, losses, seconds, (before and before[0], after and after[0]),
                evidence)


def _option_run(spec: tuple, option: str, device: torch.device) -> Tuple[_Run, dict]:
    """The run under ``option``; for fp16, restarted at the lowered scale while an iteration overflowed."""
    options, steps = OPTIONS[option]
    run = _train(spec, device, steps, **options)
    details = {}
    if option == "fp16":
        retries = 0
        while run.scales[1] < run.scales[0] and retries < 16:
            retries += 1
            run = _train(spec, device, steps, scale=run.scales[1], **options)
        details.update(loss_scale=run.scales[0], overflow_restarts=retries)
    return run, details


def _ineffective(option: str, run: _Run, rel: float, caught: Sequence[warnings.WarningMessage]) -> str:
    """Why ``option`` cannot have taken effect in ``run``, or "". A path that silently did nothing would compare
    float32 eager with itself and pass."""
    evidence = run.evidence
    if option == "compile":
        fallback = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        if fallback:
            return "fell back to eager: " + fallback[0][:1000]
        if not evidence.get("graphs"):
            return "dynamo compiled no graph"
    if option == "channels_last" and evidence["channels_last_blobs"] < evidence["blobs_4d"]:
        return f"only {evidence['channels_last_blobs']} of {evidence['blobs_4d']} 4-D blobs are channels-last"
    if option in AMP_FLOOR and rel < AMP_FLOOR[option]:
        return f"rel {rel:.3g} < {AMP_FLOOR[option]:g}: nothing was rounded to {option}"
    if option == "fp16" and run.scales[1] < run.scales[0]:
        return f"every restart overflowed, down to loss scale {run.scales[1]:g}"
    return ""


def option_check(net: str, spec: tuple, option: str, device: torch.device, references: Dict[int, _Run]) -> Check:
    """One fast path on one net against the float32 eager reference of the same number of steps."""
    name = f"train/{net}/{option}"
    steps = OPTIONS[option][1]
    if steps not in references:
        references[steps] = _train(spec, device, steps)
    ref = references[steps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, details = _option_run(spec, option, device)
    if any(not torch.equal(run.initial[k], ref.initial[k]) for k in ref.initial):
        return Check.failed(name, "the solvers started from different weights, so the comparison means nothing",
                            device)
    check = Check.measured(name, diff({k: (run.updates[k], ref.updates[k]) for k in ref.updates}),
                           TOLERANCES[option].rel, device, steps=steps, batch=spec[1], losses=run.losses,
                           reference_losses=ref.losses, step_seconds=run.seconds, reference_step_seconds=ref.seconds,
                           **details)
    check.details.update(run.evidence)
    problem = _ineffective(option, run, check.rel, caught)
    if problem:
        check.status, check.note = "fail", problem
    return check


def train_checks(device: torch.device, tiny: bool) -> List[Check]:
    checks = []
    for net, spec in (TINY_TRAIN_NETS if tiny else TRAIN_NETS).items():
        references: Dict[int, _Run] = {}
        for option in OPTIONS:
            name = f"train/{net}/{option}"
            if option == "compile" and tiny and device.type == "cpu":
                checks.append(Check.skipped(name, "skipped: --tiny on the CPU (inductor's first compilation took "
                                                  "20-80 s on 2 shared cores); run without --tiny"))
                continue
            if option == "compile":
                torch._logging.set_logs(all=logging.ERROR)  # a compiler failure is recorded below, not logged
            with fp32_only():
                checks += guarded([name], device, lambda: [option_check(net, spec, option, device, references)])
        references.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return checks


# ----- throughput and the Fashion-MNIST benchmark --------------------------------------------------------------------
def throughput(device: torch.device, tiny: bool, folder: Path) -> dict:
    """Images/s of the pipelines of benchmarks/_throughput.py, with the settings they ran under."""
    n, batch, rounds, steps, warmup = (20, 4, 2, 1, 1) if tiny else (10000, 64, 7, 20, 5)
    images, labels = _throughput.synthetic_cifar(n)
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        rows = _throughput.build_pipelines(images, labels, batch, device, folder / "cifar-10-batches-py",
                                           fast_row=device.type == "cuda")
        rates = _throughput.time_pipelines(rows, batch=batch, rounds=rounds, steps=steps, warmup=warmup,
                                           device=device)
    finally:
        torch.backends.cudnn.benchmark = saved
    out = {"net": _throughput.NET, "device": str(device), "batch": batch, "images": n, "rounds": rounds,
           "steps_per_round": steps, "warmup_steps": warmup, "cudnn_benchmark": device.type == "cuda",
           "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
           "dataloader_workers": 1, "labels": "random", **_throughput.summarise(rates)}
    for name, row in out["rows"].items():
        print(f"  {name:<24} {row['images_per_s_median']:10.1f} images/s (min {row['min']:.1f}, max {row['max']:.1f})")
    for name, ratio in out["ratios"].items():
        print(f"  {name:<32} {ratio:.3f}")
    return out


def fashion(out_dir: Path, timeout: float) -> Tuple[dict, Check]:
    """benchmarks/bench_fashion.py in full mode, its output in ``out_dir/fashion``."""
    script = ROOT / "benchmarks" / "bench_fashion.py"
    if not script.exists():
        return {"ran": False}, Check.skipped("fashion/full", "skipped: benchmarks/bench_fashion.py does not exist")
    command = [sys.executable, str(script), "--out", str(out_dir / "fashion")]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = None, f"timed out after {timeout:g} s; " + str(e.output or "")[-3000:]
    seconds = time.perf_counter() - start
    result = {"ran": True, "command": command, "returncode": rc, "seconds": round(seconds, 1), "output_tail": tail}
    check = Check("fashion/full", "pass" if rc == 0 else "fail", note="" if rc == 0 else f"exit status {rc}",
                  seconds=round(seconds, 1))
    return result, check


# ----- the command ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    """Where the figures come from."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = models[0] if models else None
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_check/gpu_check.json", help="the JSON file to write")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="small sizes: a smoke run (under a minute on a CPU)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["zoo", "ddp", "train", "throughput"],
                        help="parts not to run")
    parser.add_argument("--fashion", action="store_true", help="also run benchmarks/bench_fashion.py in full mode")
    parser.add_argument("--fashion-timeout", type=float, default=4 * 3600, help="seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use --device "
                     f"cpu, which records the CUDA checks as skipped.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run, often on a shared machine, where more threads mostly wait
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"script": "benchmarks/gpu_check.py", "command": [Path(sys.argv[0]).name, *(argv or sys.argv[1:])],
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(device),
              "tiny": args.tiny, "machine": machine(),
              "difference": "rel = ||a - b||_2 / ||b||_2 over all compared values, a = path under check, b = "
                            "reference; max_abs = max |a - b|; worst = the tensor with the largest relative error",
              "tolerances": {k: dataclasses.asdict(v) for k, v in TOLERANCES.items()}}
    print(f"gpu_check on {device} ({'tiny' if args.tiny else 'full'} sizes), torch {torch.__version__}", flush=True)
    checks: List[Check] = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        folder = Path(tmp)
        if "zoo" not in args.skip:
            checks += zoo_checks(device, args.tiny)
        if "ddp" not in args.skip:
            checks += ddp_checks(device, folder)
        if "train" not in args.skip:
            checks += train_checks(device, args.tiny)
        if "throughput" not in args.skip:
            print("throughput (images/s, median over rounds):", flush=True)

            def measure() -> List[Check]:
                report["throughput"] = throughput(device, args.tiny, folder)
                return []

            checks += guarded(["throughput"], device, measure)
    if args.fashion:
        report["fashion"], check = fashion(out.parent, args.fashion_timeout)
        checks.append(check)
        print(check.line(), flush=True)
    else:
        checks.append(Check.skipped("fashion/full", "skipped: not requested (--fashion runs it)"))
    report["checks"] = [c.as_dict() for c in checks]
    report["summary"] = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skipped")}
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    s = report["summary"]
    print(f"{s['pass']} passed, {s['fail']} failed, {s['skipped']} skipped in {report['seconds']} s; wrote {out}")
    return 1 if s["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
