"""BatchSource: the built-in digits, sample order, sharding, wrap-around, exact resume, MemoryData, open_source."""

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.data import DEFAULT_SEED, infer_top_shapes, open_source
from slim.data.digits import DIGITS_PATH, load_digits
from slim.data.source import ArraySamples, BatchSource, shard_order
from slim.data.transform import TransformSpec
from slim.errors import DataError


def digits_layer(batch=50, train=True, shuffle=True, **transform):
    layer = pb.LayerParameter(name="data", type="SlimData")
    layer.top.extend(["data", "label"])
    layer.slim_data_param.batch_size = batch
    layer.slim_data_param.train = train
    layer.slim_data_param.shuffle = shuffle
    for k, v in transform.items():
        setattr(layer.transform_param, k, v)
    return layer


def array_source(n=23, batch=5, shuffle=True, seed=7, rank=0, world_size=1, **spec):
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 4, 4), np.float32)
    samples = ArraySamples(images, np.arange(n))
    transform = TransformSpec(phase=pb.TRAIN, in_shape=(1, 4, 4), **spec)
    return BatchSource("data", samples, transform, batch, shuffle=shuffle, seed=seed, rank=rank,
                       world_size=world_size)


# ---- the built-in digits ------------------------------------------------------------------------------------------

def test_digits_split_is_fixed_stratified_and_complete():
    train, test = load_digits(True), load_digits(False)
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == np.uint8 and train.images.max() == 16 and train.images.min() == 0
    counts = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # UCI/scikit-learn
    # Stratified: each class's test share is within one image of 360/1797.
    test_counts = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(test_counts - counts * 360 / 1797) < 1)
    with np.load(DIGITS_PATH, allow_pickle=False) as f:  # the file holds plain arrays only
        index = np.concatenate([f["train_index"], f["test_index"]])
        assert all(f[k].dtype != object for k in f.files)
    np.testing.assert_array_equal(np.sort(index), np.arange(1797))  # a partition of scikit-learn's 1,797 samples
    assert zipfile.is_zipfile(DIGITS_PATH)


def test_digits_layer_batches_and_shapes():
    layer = digits_layer(batch=64, scale=0.0625)
    assert infer_top_shapes(layer) == [(64, 1, 8, 8), (64,)]
    source = open_source(layer, phase=pb.TRAIN, seed=3)
    assert source.top_shapes == [(64, 1, 8, 8), (64,)] and source.num_samples == 1437
    data, label = source.next_batch("cpu")
    assert data.dtype == torch.float32 and label.dtype == torch.float32 and data.shape == (64, 1, 8, 8)
    assert 0 <= data.min() and data.max() <= 1.0
    idx = shard_order(1437, epoch=0, seed=3, shuffle=True, rank=0, world_size=1)[:64]
    train = load_digits(True)
    np.testing.assert_allclose(data.numpy(), train.images[idx] / 16.0)
    np.testing.assert_array_equal(label.numpy(), train.labels[idx])


# ---- order and sharding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world_size", [(24, 4), (23, 4), (10, 3), (5, 1)])
def test_shards_are_disjoint_equal_and_cover_each_epoch(n, world_size):
    for epoch in range(3):
        shards = [shard_order(n, epoch=epoch, seed=11, shuffle=True, rank=r, world_size=world_size)
                  for r in range(world_size)]
        per = -(-n // world_size)
        assert all(len(s) == per for s in shards)
        joined = np.concatenate(shards)
        assert set(joined.tolist()) == set(range(n))  # coverage
        assert len(joined) - len(set(joined.tolist())) == per * world_size - n  # only the padding repeats
        if n % world_size == 0:
            assert len(set(joined.tolist())) == len(joined)


def test_reshuffles_each_epoch_and_keeps_file_order_without_shuffle():
    e0 = shard_order(100, epoch=0, seed=1, shuffle=True, rank=0, world_size=1)
    e1 = shard_order(100, epoch=1, seed=1, shuffle=True, rank=0, world_size=1)
    assert sorted(e0) == sorted(e1) == list(range(100)) and not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, shard_order(100, epoch=0, seed=1, shuffle=True, rank=0, world_size=1))
    assert not np.array_equal(e0, shard_order(100, epoch=0, seed=2, shuffle=True, rank=0, world_size=1))
    np.testing.assert_array_equal(shard_order(10, epoch=3, seed=1, shuffle=False, rank=1, world_size=3), [1, 4, 7, 0])


def test_batches_wrap_around_epochs_like_caffe():
    source = array_source(n=23, batch=5, shuffle=False)
    seen = [source.next_batch()[1].numpy().astype(int).tolist() for _ in range(5)]
    assert seen[4] == [20, 21, 22, 0, 1]  # the 5th batch ends epoch 0 and starts epoch 1
    assert source.state() == (1, 2)
    data, label = source.next_batch()
    np.testing.assert_array_equal(data[:, 0, 0, 0].numpy(), label.numpy())  # images travel with their labels


def test_ranks_read_disjoint_data_with_different_augmentation():
    sources = [array_source(n=40, batch=4, rank=r, world_size=2, crop_size=2, mirror=True) for r in range(2)]
    labels = [set(), set()]
    for _ in range(5):
        for r, s in enumerate(sources):
            labels[r] |= set(s.next_batch()[1].numpy().astype(int).tolist())
    assert not labels[0] & labels[1] and len(labels[0] | labels[1]) == 40
    assert sources[0].state() == sources[1].state() == (1, 0)  # 5 x 4 = the 20-sample shard
    # Identical images on both ranks: at the same (epoch, position) the crops and mirrors still differ (seed + rank).
    pattern = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4).repeat(40, axis=0)
    spec = TransformSpec(phase=pb.TRAIN, in_shape=(1, 4, 4), crop_size=2, mirror=True)
    a, b = (BatchSource("d", ArraySamples(pattern, np.zeros(40)), spec, 20, shuffle=True, seed=1, rank=r,
                        world_size=2) for r in range(2))
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])


@pytest.mark.parametrize("world_size", [1, 3])
def test_exact_resume_reproduces_the_uninterrupted_run(world_size):
    def make(rank):
        return array_source(n=31, batch=7, rank=rank, world_size=world_size, crop_size=3, pad=1, mirror=True)

    for rank in range(world_size):
        full = make(rank)
        batches, states = [], []
        for _ in range(9):
            states.append(full.state())
            batches.append(full.next_batch())
        for k in (0, 3, 5, 8):
            resumed = make(rank)
            resumed.load_state(*states[k])
            for j in range(k, 9):
                data, label = resumed.next_batch()
                assert torch.equal(data, batches[j][0]) and torch.equal(label, batches[j][1])


def test_load_state_rejects_a_position_outside_the_shard():
    source = array_source(n=10, batch=2, world_size=2)
    with pytest.raises(DataError, match="shard has 5 samples"):
        source.load_state(0, 5)


def test_random_draws_differ_per_batch_and_rank_but_not_per_run():
    a = array_source(n=64, batch=64, crop_size=2, mirror=True, rank=0, world_size=1)
    b = array_source(n=64, batch=64, crop_size=2, mirror=True, rank=0, world_size=1)
    x1, x2 = a.next_batch()[0], a.next_batch()[0]
    assert torch.equal(x1, b.next_batch()[0]) and not torch.equal(x1, x2)


def test_default_seed_is_shared():
    a = open_source(digits_layer(batch=10), phase=pb.TRAIN)
    b = open_source(digits_layer(batch=10), phase=pb.TRAIN, seed=DEFAULT_SEED)
    assert torch.equal(a.next_batch()[1], b.next_batch()[1])


# ---- MemoryData ------------------------------------------------------------------------------------------------------

def memory_layer(batch=4, shape=(2, 3, 3)):
    layer = pb.LayerParameter(name="mem", type="MemoryData")
    p = layer.memory_data_param
    p.batch_size, (p.channels, p.height, p.width) = batch, shape
    return layer


def test_memory_data_reads_arrays_in_order_without_transform():
    source = open_source(memory_layer(), phase=pb.TEST)
    assert source.top_shapes == infer_top_shapes(memory_layer()) == [(4, 2, 3, 3), (4,)]
    with pytest.raises(DataError, match="call set_data"):
        source.next_batch()
    data = np.random.default_rng(0).normal(size=(8, 2, 3, 3)).astype(np.float32)
    source.set_data(torch.from_numpy(data), np.arange(8.0))
    out = [source.next_batch() for _ in range(3)]
    np.testing.assert_array_equal(out[0][0].numpy(), data[:4])
    np.testing.assert_array_equal(out[2][0].numpy(), data[:4])  # wraps around
    np.testing.assert_array_equal(out[1][1].numpy(), [4, 5, 6, 7])


@pytest.mark.parametrize("n, shape, labels, message", [
    (6, (2, 3, 3), 6, "not a positive multiple of batch_size 4"),
    (8, (3, 3, 3), 8, r"pass an array of shape \(N, 2, 3, 3\)"),
    (8, (2, 3, 3), 7, "8 images but 7 labels"),
])
def test_memory_data_rejects_bad_arrays(n, shape, labels, message):
    source = open_source(memory_layer(), phase=pb.TEST)
    with pytest.raises(DataError, match=message):
        source.set_data(np.zeros((n,) + shape, np.float32), np.zeros(labels))


def test_memory_data_refuses_transform_param():
    layer = memory_layer()
    layer.transform_param.scale = 0.5
    with pytest.raises(DataError, match="does not transform"):
        open_source(layer, phase=pb.TRAIN)


# ---- open_source errors and shape inference --------------------------------------------------------------------------

def test_unknown_type_and_missing_batch_size():
    with pytest.raises(DataError, match="SlimData, Data, ImageData, MemoryData"):
        open_source(pb.LayerParameter(name="x", type="Convolution"), phase=pb.TRAIN)
    layer = digits_layer()
    layer.slim_data_param.ClearField("batch_size")
    with pytest.raises(DataError, match="batch_size is not set"):
        open_source(layer, phase=pb.TRAIN)


def test_crop_larger_than_digits_is_refused_at_open():
    with pytest.raises(DataError, match=r'Layer "data" \(SlimData\).*crop_size 9 is larger'):
        open_source(digits_layer(crop_size=9), phase=pb.TRAIN)


def test_standard_dataset_shapes_need_no_files():
    layer = pb.LayerParameter(name="cifar", type="SlimData")
    layer.slim_data_param.dataset = pb.SlimDataParameter.CIFAR10
    layer.slim_data_param.source = "/nonexistent/cifar"
    layer.slim_data_param.batch_size = 128
    layer.transform_param.crop_size, layer.transform_param.pad = 32, 4
    assert infer_top_shapes(layer) == [(128, 3, 32, 32), (128,)]
    with pytest.raises(DataError, match="does not exist"):
        open_source(layer, phase=pb.TRAIN)


def test_shape_inference_does_not_import_torch():
    code = ("import sys; from slim import proto as pb; from slim.data import infer_top_shapes, open_source\n"
            "l = pb.LayerParameter(name='d', type='SlimData'); l.slim_data_param.batch_size = 8\n"
            "assert infer_top_shapes(l) == [(8, 1, 8, 8), (8,)]\n"
            "assert open_source(l, phase=pb.TEST).top_shapes == [(8, 1, 8, 8), (8,)]\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_skip_starts_inside_the_first_epoch():
    source = BatchSource("d", ArraySamples(np.zeros((10, 1, 1, 1), np.uint8), np.arange(10)),
                         TransformSpec(phase=pb.TRAIN, in_shape=(1, 1, 1)), 3, shuffle=False, skip=13)
    assert source.state() == (0, 3)
    np.testing.assert_array_equal(source.next_batch()[1].numpy(), [3, 4, 5])


@pytest.mark.parametrize("module, call, install", [
    ("lmdb", lambda: __import__("slim.data.lmdb_source", fromlist=["_lmdb"])._lmdb('Layer "d" (Data)'),
     r"reading an LMDB database needs the lmdb package, which is not installed. Run `pip install slim\[lmdb\]`"),
    ("PIL.Image", lambda: __import__("slim.data.folder", fromlist=["_pillow"])._pillow('Layer "d" (ImageData)'),
     r"reading image files needs Pillow, which is not installed. Run `pip install slim\[image\]`"),
])
def test_a_missing_optional_dependency_names_the_layer_and_the_install_command(monkeypatch, module, call, install):
    import sys
    monkeypatch.setitem(sys.modules, module, None)      # import raises ImportError
    with pytest.raises(DataError, match=r'^Layer "d" \(\w+\): ' + install):
        call()
