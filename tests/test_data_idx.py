"""IDX (MNIST-format) files: the reader against bytes written here by hand, the SlimData source, and bad input."""

import gzip
import struct
import time

import numpy as np
import pytest

from slim import proto as pb
from slim.data import infer_top_shapes, open_source, sample_shape
from slim.data.idx import idx_pair, load_idx, read_idx, read_idx_header, write_idx
from slim.errors import DataError

WHERE = 'Layer "data" (SlimData)'
CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(array, dtype="u1"):
    """The IDX encoding, written independently of slim: magic 00 00 type ndim, big-endian dims, big-endian values."""
    array = np.asarray(array)
    head = bytes([0, 0, CODES[dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(dtype).tobytes()


def dataset(n, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_split(folder, prefix, images, labels, compress=False, dotted=False):
    folder.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    suffix = ".gz" if compress else ""
    for name, data in ((f"{prefix}-images{sep}idx3-ubyte", idx_bytes(images)),
                       (f"{prefix}-labels{sep}idx1-ubyte", idx_bytes(labels))):
        (folder / (name + suffix)).write_bytes(gzip.compress(data) if compress else data)


def idx_layer(source="", train=True, batch=4, image_file="", label_file=""):
    lp = pb.LayerParameter(name="data", type="SlimData")
    p = lp.slim_data_param
    p.dataset = pb.SlimDataParameter.IDX
    p.batch_size = batch
    p.train = train
    if source:
        p.source = str(source)
    if image_file:
        p.image_file, p.label_file = image_file, label_file
    return lp


# ----- the format ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_reader_decodes_every_type(tmp_path, compress, dtype):
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(3, 4, 2)) * 50).astype(dtype) if dtype[-2] != "u" else rng.integers(0, 256, (3, 4, 2))
    data = idx_bytes(array, dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.shape == (3, 4, 2) and out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, np.asarray(array).astype(dtype))
    header = read_idx_header(path)
    assert header.compressed == compress and header.dims == (3, 4, 2) and header.offset == 16


@pytest.mark.parametrize("dtype", list(CODES))
def test_writer_matches_the_format(tmp_path, dtype):
    array = np.arange(24).reshape(2, 3, 4).astype(np.dtype(dtype).newbyteorder("="))
    assert write_idx(tmp_path / "a", array).read_bytes() == idx_bytes(array, dtype)
    assert gzip.decompress(write_idx(tmp_path / "a.gz", array).read_bytes()) == idx_bytes(array, dtype)
    # Reproducible bytes (no timestamp in the gzip header).
    assert write_idx(tmp_path / "b.gz", array).read_bytes() == (tmp_path / "a.gz").read_bytes()


def test_writer_refuses_what_idx_cannot_hold(tmp_path):
    for bad in (np.zeros(3, np.uint32), np.zeros(3, np.complex64), np.float32(1)):
        with pytest.raises(DataError, match="IDX holds"):
            write_idx(tmp_path / "x", bad)
    assert not (tmp_path / "x").exists()


# ----- the data source -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress,dotted", [(False, False), (True, False), (False, True)])
def test_folder_splits(tmp_path, compress, dotted):
    train_x, train_y = dataset(12, seed=1)
    test_x, test_y = dataset(7, seed=2)
    write_split(tmp_path, "train", train_x, train_y, compress, dotted)
    write_split(tmp_path, "t10k", test_x, test_y, compress, dotted)
    for train, (x, y) in ((True, (train_x, train_y)), (False, (test_x, test_y))):
        samples = load_idx(*idx_pair(str(tmp_path), train, where=WHERE), where=WHERE)
        assert samples.images.shape == (len(x), 1, 6, 5) and samples.images.dtype == np.uint8
        np.testing.assert_array_equal(samples.images[:, 0], x)
        np.testing.assert_array_equal(samples.labels, y)
        assert samples.labels.dtype == np.int64
        assert infer_top_shapes(idx_layer(tmp_path, train, batch=3)) == [(3, 1, 6, 5), (3,)]


def test_source_applies_the_transform(tmp_path):
    x, y = dataset(10, h=8, w=8, seed=3)
    write_split(tmp_path, "t10k", x, y)
    lp = idx_layer(tmp_path, train=False, batch=10)
    lp.slim_data_param.shuffle = False
    lp.transform_param.mean_value.append(73)
    lp.transform_param.scale = 1 / 64
    data, label = open_source(lp, phase=pb.TEST).next_batch()
    np.testing.assert_allclose(data.numpy(), (x[:, None].astype(np.float32) - 73) / 64, rtol=1e-6)
    np.testing.assert_array_equal(label.numpy(), y)
    # TRAIN: pad-and-crop back to 8x8 plus mirror; every output is a window of the zero-padded (mirrored) image.
    write_split(tmp_path, "train", x, y)
    lp = idx_layer(tmp_path, train=True, batch=10)
    lp.slim_data_param.shuffle = False
    lp.transform_param.crop_size, lp.transform_param.pad, lp.transform_param.mirror = 8, 2, True
    data, _ = open_source(lp, phase=pb.TRAIN).next_batch()
    assert data.shape == (10, 1, 8, 8)
    for image, out in zip(x, data.numpy()[:, 0]):
        padded = np.pad(image.astype(np.float32), 2)
        windows = [p[i:i + 8, j:j + 8] for p in (padded, padded[:, ::-1]) for i in range(5) for j in range(5)]
        assert any(np.array_equal(out, win) for win in windows)


def test_explicit_files(tmp_path):
    x, y = dataset(5, seed=4)
    (tmp_path / "sub").mkdir()
    write_idx(tmp_path / "sub" / "imgs.gz", x)
    write_idx(tmp_path / "sub" / "labs", y)
    lp = idx_layer(tmp_path / "sub", batch=5, image_file="imgs.gz", label_file="labs")
    lp.slim_data_param.shuffle = False
    data, label = open_source(lp, phase=pb.TEST).next_batch()
    np.testing.assert_array_equal(data.numpy()[:, 0], x)
    np.testing.assert_array_equal(label.numpy(), y)
    # Absolute names work without a source folder.
    lp = idx_layer("", batch=5, image_file=str(tmp_path / "sub" / "imgs.gz"), label_file=str(tmp_path / "sub/labs"))
    assert infer_top_shapes(lp) == [(5, 1, 6, 5), (5,)]


def test_shape_without_the_data_comes_from_crop_size(tmp_path):
    lp = idx_layer(tmp_path / "absent", train=False, batch=2)
    with pytest.raises(DataError, match="does not exist"):
        sample_shape(lp)
    lp.transform_param.crop_size = 28
    assert sample_shape(lp) == (1, 28, 28)  # grey: IDX images have one channel


# ----- bad input: one clear error naming the file ----------------------------------------------------------------

def test_wrong_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x01\x08\x03" + b"\0" * 64)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte' is not an IDX file.*00010803"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated(tmp_path, compress):
    x, _ = dataset(10)
    data = idx_bytes(x)[:-7]
    path = tmp_path / "imgs"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError, match=r"'.*imgs' is truncated.*10x6x5"):
        read_idx(path)
    path.write_bytes(gzip.compress(idx_bytes(x))[:-20] if compress else idx_bytes(x)[:9])
    with pytest.raises(DataError, match="imgs"):
        read_idx(path)


def test_declared_size_is_checked_before_allocating(tmp_path):
    # A header claiming 4G x 4G x 4G bytes must be refused from the file size, not attempted.
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)))
    start = time.perf_counter()
    with pytest.raises(DataError, match="huge.gz' is truncated or corrupt"):
        read_idx(path)
    assert time.perf_counter() - start < 1


def test_more_bytes_than_declared(tmp_path):
    x, _ = dataset(3)
    path = tmp_path / "imgs"
    path.write_bytes(idx_bytes(x) + b"\0")
    with pytest.raises(DataError, match="more bytes than its header declares"):
        read_idx(path)


def test_counts_differ(tmp_path):
    x, y = dataset(8)
    write_split(tmp_path, "train", x, y[:7])
    with pytest.raises(DataError, match=r"holds 8 images but '.*train-labels-idx1-ubyte' holds 7 labels"):
        open_source(idx_layer(tmp_path), phase=pb.TRAIN)


def test_images_and_labels_swapped(tmp_path):
    x, y = dataset(4)
    write_idx(tmp_path / "a", x)
    write_idx(tmp_path / "b", y)
    with pytest.raises(DataError, match="'.*b' has dimensions 4; an IDX image file"):
        open_source(idx_layer(tmp_path, image_file="b", label_file="a"), phase=pb.TRAIN)
    with pytest.raises(DataError, match="'.*a' has 3 dimensions.*expected 1"):
        load_idx(tmp_path / "a", tmp_path / "a", where=WHERE)


def test_folder_missing_a_file(tmp_path):
    x, y = dataset(4)
    write_split(tmp_path, "train", x, y, compress=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has train-images-idx3-ubyte.gz but lacks train-labels-idx1-ubyte"):
        open_source(idx_layer(tmp_path), phase=pb.TRAIN)
    with pytest.raises(DataError, match=r"lacks the test split: expected t10k-images-idx3-ubyte and t10k-labels"):
        open_source(idx_layer(tmp_path, train=False), phase=pb.TEST)
    with pytest.raises(DataError, match="IDX folder '.*nowhere' .* does not exist"):
        open_source(idx_layer(tmp_path / "nowhere"), phase=pb.TRAIN)


def test_explicit_files_checked(tmp_path):
    with pytest.raises(DataError, match="sets only image_file"):
        idx_pair(str(tmp_path), True, "a", "", where=WHERE)
    with pytest.raises(DataError, match=r"'.*nope' \(slim_data_param.image_file\) does not exist"):
        idx_pair(str(tmp_path), True, "nope", "nope2", where=WHERE)
    with pytest.raises(DataError, match="source is not set"):
        idx_pair("", True, where=WHERE)


def test_bad_labels(tmp_path):
    x, _ = dataset(3)
    write_idx(tmp_path / "imgs", x)
    write_idx(tmp_path / "labs", np.array([1, -2, 3], np.int32))
    with pytest.raises(DataError, match=r"label -2 \(item 1 of '.*labs'\) is negative"):
        load_idx(tmp_path / "imgs", tmp_path / "labs", where=WHERE)
    write_idx(tmp_path / "labs", np.array([1, 2.5, 3], np.float32))
    with pytest.raises(DataError, match="not an integer class"):
        load_idx(tmp_path / "imgs", tmp_path / "labs", where=WHERE)
