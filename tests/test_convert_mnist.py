"""convert_mnist_data: IDX files -> LMDB of Datum as Caffe writes it, read back by slim's Data layer, and Caffe's
stock examples/mnist net and solver running on the result."""

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from slim import proto as pb
from slim.cli import main
from slim.data import open_source
from slim.data.lmdb_writer import convert_mnist_data, write_datum_lmdb
from slim.errors import DataError

lmdb = pytest.importorskip("lmdb")

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"


def idx_bytes(array):
    """uint8 IDX bytes, written independently of slim: 00 00 08 ndim, big-endian dims, the values."""
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder, prefix, n, seed, size=28, compress=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        path = folder / f"{prefix}-{kind}{'.gz' if compress else ''}"
        path.write_bytes(gzip.compress(idx_bytes(array)) if compress else idx_bytes(array))
        paths.append(path)
    return paths, images, labels


def varint(value):
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def caffe_datum(image, label):
    """The bytes Caffe's convert_mnist_data stores: Datum fields 1..5 (channels, height, width, data, label)."""
    h, w = image.shape
    return (b"\x08" + varint(1) + b"\x10" + varint(h) + b"\x18" + varint(w) + b"\x22" + varint(h * w)
            + image.tobytes() + b"\x28" + varint(int(label)))


def test_records_are_caffes(tmp_path):
    (images_file, labels_file), images, labels = write_mnist(tmp_path, "train", 23, seed=0, size=7)
    lines = []
    assert convert_mnist_data(images_file, labels_file, tmp_path / "db", echo=lines.append) == 23
    assert lines[:2] == ["A total of 23 items.", "Rows: 7 Cols: 7"]
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    env.close()
    assert [k for k, _ in records] == [b"%08d" % i for i in range(23)]
    assert [v for _, v in records] == [caffe_datum(im, lab) for im, lab in zip(images, labels)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".db.")]  # no temporary folder left


def data_layer(source, batch, scale=0.0):
    lp = pb.LayerParameter(name="mnist", type="Data")
    lp.data_param.source = str(source)
    lp.data_param.batch_size = batch
    lp.data_param.backend = pb.DataParameter.LMDB
    if scale:
        lp.transform_param.scale = scale
    return lp


def idx_layer(source, train, batch, scale=0.0):
    lp = pb.LayerParameter(name="mnist", type="SlimData")
    p = lp.slim_data_param
    p.dataset, p.source, p.train, p.batch_size, p.shuffle = pb.SlimDataParameter.IDX, str(source), train, batch, False
    if scale:
        lp.transform_param.scale = scale
    return lp


@pytest.mark.parametrize("train", [True, False])
def test_data_layer_reads_back_the_idx_source(tmp_path, train):
    prefix = "train" if train else "t10k"
    (images_file, labels_file), _, _ = write_mnist(tmp_path / "idx", prefix, 37, seed=1, compress=not train)
    convert_mnist_data(images_file, labels_file, tmp_path / "db")
    # Caffe's MNIST transform (scale 1/256), both sources read in file order; 37 = 4 batches of 10, wrapping.
    lmdb_source = open_source(data_layer(tmp_path / "db", 10, 0.00390625), phase=pb.TEST)
    idx_source = open_source(idx_layer(tmp_path / "idx", train, 10, 0.00390625), phase=pb.TEST)
    assert lmdb_source.top_shapes == idx_source.top_shapes == [(10, 1, 28, 28), (10,)]
    for _ in range(5):
        a, b = lmdb_source.next_batch(), idx_source.next_batch()
        assert np.array_equal(a[0].numpy(), b[0].numpy()) and np.array_equal(a[1].numpy(), b[1].numpy())


def test_caffe_mnist_example_runs_unchanged(tmp_path, monkeypatch):
    """Caffe's examples/mnist/lenet_train_test.prototxt and lenet_solver.prototxt, copied byte for byte, train on
    databases made by the converter at the paths they name (the solver shortened, the net untouched)."""
    if not TESTNETS.is_dir():
        pytest.skip(f"{TESTNETS} (real Caffe files) is absent")
    from slim.io import read_solver
    from slim.solver.solver import Solver

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "mnist").mkdir(parents=True)
    shutil.copy(TESTNETS / "examples__mnist__lenet_train_test.prototxt", "examples/mnist/lenet_train_test.prototxt")
    shutil.copy(TESTNETS / "examples__mnist__lenet_solver.prototxt", "examples/mnist/lenet_solver.prototxt")
    for prefix, split, n in (("train", "train", 128), ("t10k", "test", 100)):
        (images, labels), _, _ = write_mnist(tmp_path / "data" / "mnist", prefix, n, seed=2, compress=False)
        assert main(["convert_mnist_data", str(images), str(labels), f"examples/mnist/mnist_{split}_lmdb",
                     "--backend", "lmdb"]) == 0
    param = read_solver("examples/mnist/lenet_solver.prototxt")
    assert param.net == "examples/mnist/lenet_train_test.prototxt"
    param.max_iter, param.test_iter[0], param.test_interval, param.display, param.snapshot = 3, 1, 3, 1, 0
    param.snapshot_after_train = False
    solver = Solver(param, solver_path="examples/mnist/lenet_solver.prototxt", metrics=False)
    solver.solve()
    assert solver.iter == 3 and np.isfinite(solver.loss)
    (evaluation,) = solver.test_all()
    assert 0 <= evaluation.as_dict()["accuracy"] <= 1


def test_bad_input(tmp_path, capsys):
    (images_file, labels_file), images, labels = write_mnist(tmp_path, "train", 5, seed=3, size=4)
    with pytest.raises(DataError, match=r"labels-idx1-ubyte.gz' is not an MNIST image file.*images first"):
        convert_mnist_data(labels_file, images_file, tmp_path / "db")
    short = tmp_path / "short-labels"
    short.write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(DataError, match="holds 5 images but .*short-labels' holds 4 labels"):
        convert_mnist_data(images_file, short, tmp_path / "db")
    with pytest.raises(DataError, match="LMDB only"):
        convert_mnist_data(images_file, labels_file, tmp_path / "db", backend="leveldb")
    (tmp_path / "db").mkdir()
    assert main(["convert_mnist_data", str(images_file), str(labels_file), str(tmp_path / "db")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not any((tmp_path / "db").iterdir())  # the existing folder was left alone


def test_failed_write_leaves_nothing(tmp_path):
    images = np.zeros((3, 1, 2, 2), np.uint8)
    with pytest.raises(ValueError):
        write_datum_lmdb(tmp_path / "db", images, np.array([0.0, np.nan, 1.0]))  # int(nan) fails mid-way
    assert list(tmp_path.iterdir()) == []
