"""Benchmark: one training step of a prototxt-built net under slim's Solver against hand-written PyTorch.

Both sides train the same architecture on the same batch (64 random 3x32x32 images, random labels), on the same
device, in one process, repetitions interleaved (slim, reference, slim, ...), and the medians are compared.

  slim       nets/<net>.prototxt with its TRAIN data layer replaced by a MemoryData layer holding the batch, driven
             by slim.solver.Solver.step(1): zero gradients, forward (BatchNorm+Scale fused by Net), backward, the
             Caffe update (SGD momentum 0.9, weight decay 1e-4, the network-slimming penalty 1e-4 on every
             BatchNorm's scale factor), smoothed loss bookkeeping.
  reference  an nn.Module written by hand (Conv2d, BatchNorm2d, ReLU, pooling, Linear; for ResNet the same
             option-A shortcut: subsample and zero channels), torch.optim.SGD(momentum 0.9, weight_decay 1e-4),
             the penalty as the network-slimming code adds it (bn.weight.grad.add_(s * sign(bn.weight)) after
             backward), then optimizer.step(): zero_grad, forward, cross-entropy, backward, penalty, step.

Usage:
    python benchmarks/bench_train_step.py [--nets vgg19 resnet56] [--reps 9] [--warmup 2] [--device cpu]
                                          [--threads N]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slim import proto as pb  # noqa: E402
from slim.io import parse_solver, read_net  # noqa: E402
from slim.solver import Solver  # noqa: E402
from _zoo_data import replace_train_data  # noqa: E402  (beside this script)

BATCH = 64
PENALTY = 1e-4
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class VGG(nn.Module):
    """Network slimming's VGG-19 for CIFAR: conv3x3-BN-ReLU stages, 2x2 average pooling, one Linear."""

    def __init__(self, cfg=VGG19, classes=10):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.avg_pool2d(self.features(x), 2).flatten(1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if stride != 1 else 0

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.pad:  # option A: keep every second pixel, append zero channels
            s = x[:, :, ::2, ::2]
            x = torch.cat([s, torch.zeros_like(s)], 1)
        return F.relu(y + x)


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2) with option-A shortcuts."""

    def __init__(self, depth=56, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, c = [], 16
        for width in (16, 32, 64):
            for i in range(n):
                blocks.append(Block(c, width, 2 if i == 0 and width != 16 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


NETS = {"vgg19": ("nets/vgg19_cifar10.prototxt", VGG), "resnet56": ("nets/resnet56_cifar10.prototxt", ResNet)}


def recipe_solver(net: "pb.NetParameter", name: str, device, **options) -> Solver:
    """A Solver on ``net`` with the recipe above (SGD momentum 0.9, weight decay 1e-4, penalty 1e-4, lr 0.1, seed 1);
    ``options`` go to Solver (amp, channels_last, compile)."""
    solver = parse_solver(f'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 weight_decay: 1e-4 max_iter: 1000000 '
                          f'display: 0 snapshot_after_train: false random_seed: 1 sparsity {{ penalty: {PENALTY} }}')
    solver.net_param.CopyFrom(net)
    return Solver(solver, solver_path=f"<{name}>", device=device, metrics=False, **options)


def slim_solver(path, images, labels, device, batch=BATCH, **options):
    """A Solver on the zoo net whose TRAIN data layer is a MemoryData layer of ``batch`` images holding ``images``
    (N x C x H x W, N a multiple of ``batch``); ``options`` go to Solver."""
    net = read_net(ROOT / path)

    def memory_data(layer):
        memory = pb.LayerParameter(name=layer.name, type="MemoryData", top=list(layer.top))
        p = memory.memory_data_param
        p.batch_size = batch
        p.channels, p.height, p.width = images.shape[1:]
        return memory

    replace_train_data(net, memory_data)
    s = recipe_solver(net, path, device, **options)
    s.net.set_input_arrays(images.cpu(), labels.cpu())
    return s


def reference_step(model, optimizer, bns, images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    for bn in bns:
        bn.weight.grad.add_(torch.sign(bn.weight.data), alpha=PENALTY)
    optimizer.step()
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, reps, warmup, device):
    torch.manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.randint(0, 10, (BATCH,))
    path, cls = NETS[name]
    solver = slim_solver(path, images, labels.float(), device)
    model = cls().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x, y = images.to(device), labels.to(device)
    slim_params = sum(p.tensor.numel() for p in solver.net.learnable_params if p.tensor.requires_grad)
    ref_params = sum(p.numel() for p in model.parameters())
    assert slim_params == ref_params, (slim_params, ref_params)
    times = {"slim": [], "reference": []}
    for i in range(warmup + reps):
        for side in ("slim", "reference"):
            sync(device)
            t = time.perf_counter()
            if side == "slim":
                solver.step(1)
            else:
                reference_step(model, optimizer, bns, x, y)
            sync(device)
            if i >= warmup:
                times[side].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    print(f"{name}: {ref_params:,} learnable params, batch {BATCH}, {reps} reps after {warmup} warm-up, {device}")
    for k in times:
        lo, hi = spread[k]
        print(f"  {k:<10} median {med[k] * 1000:8.1f} ms  (min {lo * 1000:.1f}, max {hi * 1000:.1f})")
    print(f"  ratio slim / reference: {med['slim'] / med['reference']:.3f}")
    return med["slim"] / med["reference"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in args.nets:
        bench(name, args.reps, args.warmup, torch.device(args.device))


if __name__ == "__main__":
    main()
