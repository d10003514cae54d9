"""Training images/s of VGG-19 on CIFAR shapes, three ways side by side (used by benchmarks/gpu_check.py).

  slim              slim's Solver on nets/vgg19_cifar10.prototxt, its SlimData layer reading a CIFAR-10 folder
                    (python format) written from the in-memory images: the dataset is copied to the device once and
                    the prototxt's transform (pad 4, random crop 32, mirror, mean, scale) runs there on each batch.
  slim_memorydata   the same Solver with a MemoryData layer holding the images instead (no transform).
  hand_loop         bench_train_step's hand-written VGG and step (SGD momentum 0.9, weight decay 1e-4, the penalty
                    added to the BatchNorm weights' gradients); the images normalised once and kept on the device.
  paper_pipeline    the network-slimming reference code's pipeline style: a DataLoader (1 worker, pinned memory on
                    CUDA, shuffled) over per-sample CPU transforms (pad 4, random crop 32, random flip, to float,
                    normalise), each batch copied to the device, then the same model and step as hand_loop. Its
                    transforms work on uint8 arrays with torch ops, not PIL images, so it is if anything faster than
                    the original.

Every pipeline trains the same architecture on the same images with random labels, batch ``batch``, in one process.
Rounds alternate the order of the pipelines; the images/s of each round is ``steps * batch / seconds``.
"""

import itertools
import pickle
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from torch.nn import functional as F

from slim.io import read_net
from bench_train_step import ROOT, VGG, recipe_solver, reference_step, slim_solver  # beside this script
from _zoo_data import replace_train_data

NET = "nets/vgg19_cifar10.prototxt"
# The prototxt's transform: (x - mean_value) * scale.
SLIM_MEAN, SLIM_SCALE = (125.0, 123.0, 114.0), 0.015625
# The reference code's Normalize (on x / 255).
PAPER_MEAN, PAPER_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def synthetic_cifar(n: int, seed: int = 0):
    """``n`` random uint8 images (N, 3, 32, 32) and labels in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


def write_cifar_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The training split in CIFAR-10's python format (data_batch_1..5), as slim's SlimData layer reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (x, y) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)), 1):
        batch = {"data": x.reshape(len(x), -1), "labels": y.tolist()}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slim_cifar_solver(folder: Path, batch: int, device: torch.device, **options):
    """The Solver of the ``slim`` row: the zoo net, its TRAIN SlimData layer pointed at ``folder``."""
    net = read_net(ROOT / NET)

    def cifar_folder(layer):
        layer.slim_data_param.source = str(folder)
        layer.slim_data_param.batch_size = batch
        return layer

    replace_train_data(net, cifar_folder)
    return recipe_solver(net, NET, device, **options)


class _HandModel:
    """The hand-written model and step; subclasses say where batches come from."""

    def __init__(self, device: torch.device):
        torch.manual_seed(1)
        self.model = VGG().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.bns = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def next_batch(self):
        raise NotImplementedError

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x, y = self.next_batch()
            reference_step(self.model, self.optimizer, self.bns, x, y)


class _HandLoop(_HandModel):
    """Batches sliced in order (wrapping) from images already normalised and on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device):
        super().__init__(device)
        self.images, self.labels, self.batch = images, labels, batch
        self.position = 0

    def next_batch(self):
        i = self.position
        self.position = (i + self.batch) % len(self.images)
        return self.images[i:i + self.batch], self.labels[i:i + self.batch]


class PerSampleCifar(torch.utils.data.Dataset):
    """CIFAR images (uint8, N x 3 x 32 x 32) with the reference code's per-sample training transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(PAPER_MEAN).view(3, 1, 1)
        self.std = torch.tensor(PAPER_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = F.pad(torch.from_numpy(self.images[i]), (4, 4, 4, 4))  # Pad(4)
        top, left = torch.randint(0, 9, (2,)).tolist()  # RandomCrop(32)
        x = x[:, top:top + 32, left:left + 32]
        if torch.rand(1).item() < 0.5:  # RandomHorizontalFlip
            x = x.flip(2)
        x = x.float().div_(255)  # ToTensor
        return (x - self.mean) / self.std, int(self.labels[i])  # Normalize


class _PaperPipeline(_HandModel):
    """Batches from a DataLoader over per-sample CPU transforms, copied to the device. Its worker prefetches two
    batches while other rows run, which favours this row by at most two batches per round."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch: int, device: torch.device):
        super().__init__(device)
        loader = torch.utils.data.DataLoader(PerSampleCifar(images, labels), batch_size=batch, shuffle=True,
                                             num_workers=1, pin_memory=device.type == "cuda",
                                             persistent_workers=True, drop_last=True)
        self.batches = itertools.chain.from_iterable(itertools.repeat(loader))
        self.device = device

    def next_batch(self):
        x, y = next(self.batches)
        return x.to(self.device), y.to(self.device)


def build_pipelines(images: np.ndarray, labels: np.ndarray, batch: int, device: torch.device, folder: Path,
                    fast_row: bool) -> Dict[str, Callable[[int], None]]:
    """The pipelines by row name, each a callable running ``steps`` training iterations.

    Args:
        images, labels: the training set (uint8 N x 3 x 32 x 32, int64).
        batch: images per iteration.
        device: where every pipeline trains.
        folder: where the CIFAR-format copy of the images is written for slim's SlimData layer.
        fast_row: add ``slim_bf16_channels_last`` (slim's SlimData row with ``amp="bf16", channels_last=True``).
    """
    write_cifar_folder(folder, images, labels)
    n = len(images) // batch * batch
    floats = torch.from_numpy(images[:n]).float()
    mean = torch.tensor(SLIM_MEAN).view(1, 3, 1, 1)
    memory = slim_solver(NET, (floats - mean) * SLIM_SCALE, torch.from_numpy(labels[:n]).float(), device,
                         batch=batch)
    slim = slim_cifar_solver(folder, batch, device)
    hand_x = ((floats - mean) * SLIM_SCALE).to(device)
    hand = _HandLoop(hand_x, torch.from_numpy(labels[:n]).to(device), batch, device)
    paper = _PaperPipeline(images, labels, batch, device)
    rows = {"slim": slim.step, "slim_memorydata": memory.step, "hand_loop": hand.run, "paper_pipeline": paper.run}
    if fast_row:
        rows["slim_bf16_channels_last"] = slim_cifar_solver(folder, batch, device, amp="bf16",
                                                            channels_last=True).step
    return rows


def time_pipelines(rows: Dict[str, Callable[[int], None]], *, batch: int, rounds: int, steps: int, warmup: int,
                   device: torch.device) -> Dict[str, List[float]]:
    """Images/s of each row, one figure per round; each round runs every row once, the order rotated by round."""
    names = list(rows)
    for name in names:
        rows[name](warmup)
    _sync(device)
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            rows[name](steps)
            _sync(device)
            rates[name].append(steps * batch / (time.perf_counter() - start))
    return rates


def summarise(rates: Dict[str, List[float]]) -> dict:
    """Median, min and max images/s per row, and the ratios of like to like."""
    med = {name: statistics.median(v) for name, v in rates.items()}
    out = {"rows": {name: {"images_per_s_median": med[name], "min": min(v), "max": max(v), "rounds": v}
                    for name, v in rates.items()}}
    pairs = {"slim / paper_pipeline": ("slim", "paper_pipeline"),
             "slim / hand_loop": ("slim", "hand_loop"),
             "slim_memorydata / hand_loop": ("slim_memorydata", "hand_loop"),
             "slim_bf16_channels_last / slim": ("slim_bf16_channels_last", "slim")}
    out["ratios"] = {k: med[a] / med[b] for k, (a, b) in pairs.items() if a in med and b in med}
    return out
