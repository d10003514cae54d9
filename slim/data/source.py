"""BatchSource: one data layer's stream of batches, its sample order, sharding and exact resumption.

Order. Each epoch is a permutation of the dataset drawn from (seed, epoch), the same on every process, or the file
order when shuffling is off (Caffe's Data layer reads its database sequentially; ImageData reshuffles its list
every epoch when ``shuffle`` is set). The order is padded to a multiple of world_size by repeating its first
entries (as torch's DistributedSampler does), then process ``rank`` takes ``order[rank::world_size]``: shards are
disjoint apart from those at most world_size - 1 repeated samples, they cover the dataset, and all have the same
length, so every process wraps to the next epoch at the same iteration and one (epoch, position) pair describes
all of them. Batches wrap around epochs as in Caffe: a batch may end one epoch and start the next.

Randomness. The transform's draws (crop offsets, mirror flags) come from a CPU ``torch.Generator`` seeded per
batch by hashing (seed, rank, epoch, position): a run restored with `BatchSource.load_state` at a position
produces the same batches as the uninterrupted run, on any device, with no generator state to save.

Only numpy is needed to open a source and read its shapes; torch is imported when batches are made.
"""

import hashlib
import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from slim.data.transform import TransformSpec
from slim.errors import DataError

__all__ = ["BatchSource", "MemoryDataSource", "Samples", "ArraySamples", "derive_seed", "shard_order", "DEFAULT_SEED",
           "optional_module"]


def optional_module(name: str, *, where: str, needed_for: str, what: str, extra: str, pip_name: str):
    """Import an optional dependency, or raise a DataError naming the layer and the install command.

    Args:
        name: the module to import.
        where: names the layer, e.g. 'Layer "data" (Data)'.
        needed_for: what needs it, e.g. "reading an LMDB database".
        what: how to call the dependency in the message, e.g. "the lmdb package".
        extra: slim's extra that installs it (``pip install slim[extra]``).
        pip_name: its own package name on PyPI.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise DataError(f"{where}: {needed_for} needs {what}, which is not installed. Run `pip install slim[{extra}]` "
                        f"(or `pip install {pip_name}`).") from e

# The seed used when the caller gives none (Caffe's random_seed: -1). It must be the same on every process, or the
# shards of a shuffled dataset would overlap; a fixed value also makes runs reproducible by default.
DEFAULT_SEED = 0


class Samples(Protocol):
    """What a dataset provides to a BatchSource.

    Attributes:
        shape: raw image shape (C, H, W), the same for every sample.
        num_samples: number of samples in the whole dataset (all shards).
    """

    shape: tuple[int, int, int]
    num_samples: int

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns images (k, C, H, W) (uint8 or float32) and labels (k,) of the samples at ``indices``."""
        ...


@dataclass
class ArraySamples:
    """A dataset held in memory: images (N, C, H, W) uint8 or float32 and labels (N,).

    A BatchSource copies these images to the training device once and gathers batches there.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        assert self.images.ndim == 4 and len(self.images) == len(self.labels), (self.images.shape, self.labels.shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across platforms and library versions (BLAKE2b of their decimal text)."""
    digest = hashlib.blake2b(",".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_order(num_samples: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int) -> np.ndarray:
    """The sample indices process ``rank`` reads in ``epoch``, in reading order.

    Args:
        num_samples: size of the whole dataset.
        epoch: epoch number (the permutation changes with it when shuffling).
        seed: shared by all processes.
        shuffle: permute each epoch; otherwise keep the dataset's order.
        rank: this process, 0 <= rank < world_size.
        world_size: number of processes.

    Returns:
        int64 indices, ceil(num_samples / world_size) of them.
    """
    if shuffle:
        import torch

        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
        order = torch.randperm(num_samples, generator=generator).numpy()
    else:
        order = np.arange(num_samples, dtype=np.int64)
    per_shard = -(-num_samples // world_size)
    order = np.resize(order, per_shard * world_size)  # repeats the first entries to fill the last round
    return order[rank::world_size].astype(np.int64)


class BatchSource:
    """The batches of one data layer: ``next_batch`` returns [data (N, C, H, W) float32, label (N,) float32].

    Attributes:
        name: the layer's name, for messages.
        top_shapes: [(N, C, H, W), (N,)] after the transform; known without torch and without reading the data.
        num_samples: samples in this process's shard of one epoch.
        batch_size: N.
        transform: the TransformSpec applied to every batch.
    """

    def __init__(self, name: str, samples: Samples, transform: TransformSpec, batch_size: int, *,
                 shuffle: bool, seed: int | None = None, rank: int = 0, world_size: int = 1, skip: int = 0):
        """Creates a source positioned at epoch 0.

        Args:
            name: the layer's name.
            samples: the dataset.
            transform: checked against ``samples.shape``.
            batch_size: images per batch and process.
            shuffle: reshuffle each epoch.
            seed: shared by all processes; None uses DEFAULT_SEED.
            rank: this process.
            world_size: number of processes.
            skip: samples of the shard to skip at the start (Caffe's rand_skip draw).
        """
        if batch_size <= 0:
            raise DataError(f'Layer "{name}": batch_size is {batch_size}; set a positive batch_size in the layer\'s '
                            "data parameter.")
        if not 0 <= rank < world_size:
            raise DataError(f'Layer "{name}": rank {rank} is not in [0, world_size={world_size}).')
        assert transform.in_shape == tuple(samples.shape), (transform.in_shape, samples.shape)
        self.name = name
        self.samples = samples
        self.transform = transform
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = DEFAULT_SEED if seed is None else int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._epoch = 0
        self._position = int(skip) % self.num_samples if self.num_samples else 0
        self._order_epoch = None
        self._order = None
        self._device_images = {}  # device -> the in-memory images, copied there once

    @property
    def num_samples(self) -> int:
        """Samples in this process's shard of one epoch: ceil(dataset size / world_size)."""
        return -(-self.samples.num_samples // self.world_size)

    @property
    def top_shapes(self) -> list[tuple[int, ...]]:
        """[(N, C, H, W), (N,)]: the data and label shapes."""
        return [(self.batch_size,) + self.transform.out_shape, (self.batch_size,)]

    def state(self) -> tuple[int, int]:
        """(epoch, position): the epoch being read and how many samples of this shard were drawn from it."""
        return self._epoch, self._position

    def load_state(self, epoch: int, position: int) -> None:
        """Restores a `state`; the following batches equal those the saved run would have produced.

        Raises:
            DataError: the position does not fit this shard (the dataset or world size changed).
        """
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise DataError(f'Layer "{self.name}": cannot resume the data at epoch {epoch}, position {position}: '
                            f"this process's shard has {self.num_samples} samples per epoch "
                            f"({self.samples.num_samples} samples over {self.world_size} processes). Resume with the "
                            "dataset and number of processes the snapshot was trained with.")
        self._epoch, self._position = int(epoch), int(position)

    def _shard(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = shard_order(self.samples.num_samples, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                      rank=self.rank, world_size=self.world_size)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """Advances by one batch and returns its sample indices (into the whole dataset)."""
        taken = []
        need = self.batch_size
        while need:
            order = self._shard(self._epoch)
            chunk = order[self._position:self._position + need]
            taken.append(chunk)
            need -= len(chunk)
            self._position += len(chunk)
            if self._position == len(order):  # Caffe wraps around: the batch continues in the next epoch
                self._epoch, self._position = self._epoch + 1, 0
        return np.concatenate(taken)

    def next_batch(self, device="cpu") -> list:
        """Reads, transforms and returns the next batch on ``device``.

        Returns:
            [data float32 (N, C, H, W), label float32 (N,)], both on ``device``.
        """
        import torch

        device = torch.device(device)
        epoch, position = self._epoch, self._position
        indices = self.next_indices()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, epoch, position))
        aug = self.transform.draw(len(indices), generator)
        images, labels = self._gather(indices, device)
        data = self.transform.apply(images, aug)
        return [data, torch.as_tensor(np.asarray(labels, dtype=np.float32)).to(device)]

    def _gather(self, indices: np.ndarray, device):
        import torch

        if isinstance(self.samples, ArraySamples):
            # Kept on the device: the dataset is copied once and each batch is gathered there.
            key = str(device)
            if key not in self._device_images:
                self._device_images[key] = torch.from_numpy(np.ascontiguousarray(self.samples.images)).to(device)
            images = self._device_images[key].index_select(0, torch.from_numpy(indices).to(device))
            return images, self.samples.labels[indices]
        images, labels = self.samples.read(indices)
        return torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True), labels

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.top_shapes)
        return (f"BatchSource({self.name!r}: {shapes}; {self.samples.num_samples} samples, shard {self.rank}/"
                f"{self.world_size} of {self.num_samples}, shuffle={self.shuffle}, seed={self.seed}, "
                f"state={self.state()})")


class MemoryDataSource(BatchSource):
    """Caffe's MemoryData layer: arrays handed over from Python with `set_data` (pycaffe's set_input_arrays).

    As in Caffe, the arrays are read in order, wrapping around, and are not transformed (Caffe's MemoryData refuses
    a transform_param for arrays given to Reset()). They are not sharded either: each process reads the arrays it
    was given.
    """

    def __init__(self, name: str, shape: tuple[int, int, int], batch_size: int, *, phase: int):
        """Creates an empty source for (C, H, W) = ``shape``; `set_data` must be called before `next_batch`."""
        empty = ArraySamples(np.zeros((0,) + tuple(shape), np.float32), np.zeros(0, np.float32))
        super().__init__(name, empty, TransformSpec(phase=phase, in_shape=tuple(shape)), batch_size, shuffle=False)

    def set_data(self, data, labels) -> None:
        """Replaces the arrays and restarts at the first sample.

        Args:
            data: array or tensor (N, C, H, W) with (C, H, W) the layer's memory_data_param shape; N must be a
                multiple of batch_size (Caffe's rule).
            labels: N labels.

        Raises:
            DataError: a shape or count does not fit the layer.
        """
        data = np.asarray(data.detach().cpu() if hasattr(data, "detach") else data, dtype=np.float32)
        labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels, dtype=np.float32)
        c, h, w = self.transform.in_shape
        if data.ndim != 4 or tuple(data.shape[1:]) != (c, h, w):
            raise DataError(f'MemoryData layer "{self.name}": set_data got data of shape {tuple(data.shape)} but the '
                            f"layer declares channels {c}, height {h}, width {w}; pass an array of shape "
                            f"(N, {c}, {h}, {w}) or change memory_data_param.")
        labels = labels.reshape(-1)
        if len(labels) != len(data):
            raise DataError(f'MemoryData layer "{self.name}": set_data got {len(data)} images but {len(labels)} '
                            "labels; pass one label per image.")
        if len(data) == 0 or len(data) % self.batch_size:
            raise DataError(f'MemoryData layer "{self.name}": set_data got {len(data)} images, which is not a '
                            f"positive multiple of batch_size {self.batch_size} (Caffe requires it). Pad or trim the "
                            "arrays, or change batch_size.")
        self.samples = ArraySamples(np.ascontiguousarray(data), labels)
        self._device_images = {}
        self._order_epoch = self._order = None
        self._epoch, self._position = 0, 0

    def next_batch(self, device="cpu") -> list:
        """Returns the next [data, label] batch; see `BatchSource.next_batch`."""
        if self.samples.num_samples == 0:
            raise DataError(f'MemoryData layer "{self.name}": no data yet; call set_data(data, labels) on its '
                            "source before running the net.")
        return super().next_batch(device)
