"""CIFAR-10/100 in the python (pickle) and binary formats, and the restricted unpickler."""

import os
import pickle
import struct

import numpy as np
import pytest

from slim import proto as pb
from slim.data import infer_top_shapes, open_source
from slim.data.cifar import load_array_pickle, load_cifar
from slim.errors import DataError

WHERE = 'Layer "data" (SlimData)'


def fake_split(n, classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n)


def write_python_cifar10(folder, n=6, protocol=pickle.HIGHEST_PROTOCOL, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = fake_split(n, 10, i)
        batches[name] = (data, labels)
        if name in skip:
            continue
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": [int(v) for v in labels],
                         b"filenames": [b"f.png"] * n}, f, protocol=protocol)
    return batches


def py2_cifar_pickle(data: np.ndarray, labels, label_key: bytes) -> bytes:
    """The bytes Python 2's cPickle.dump(batch, f, 2) wrote for the official CIFAR files (str keys, numpy.core)."""
    def short(b):  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b

    n = len(data)
    out = b"\x80\x02}(" + short(b"data")                                   # PROTO 2, EMPTY_DICT, MARK
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
    out += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", 3072) + b"\x86"   # state: 1, (n, 3072)
    out += b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"          # dtype('u1', 0, 1)
    out += b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # its state, BUILD
    out += b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"   # not Fortran, raw bytes; BUILD
    out += short(label_key) + b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return out + b"u."                                                      # SETITEMS, STOP


def layer(source, dataset=pb.SlimDataParameter.CIFAR10, train=True, batch=4):
    lp = pb.LayerParameter(name="data", type="SlimData")
    lp.slim_data_param.dataset = dataset
    lp.slim_data_param.source = str(source)
    lp.slim_data_param.train = train
    lp.slim_data_param.batch_size = batch
    return lp


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_format_cifar10(tmp_path, protocol):
    batches = write_python_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_cifar(str(tmp_path), 10, True, where=WHERE)  # the parent folder is accepted too
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == np.uint8
    data = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = np.concatenate([batches[f"data_batch_{k}"][1] for k in range(1, 6)])
    # A row is the R, G, B planes, each 32x32 row-major.
    np.testing.assert_array_equal(train.images[7, 1, 2, 5], data[7, 1024 + 2 * 32 + 5])
    np.testing.assert_array_equal(train.images.reshape(30, -1), data)
    np.testing.assert_array_equal(train.labels, labels)
    test = load_cifar(str(tmp_path / "cifar-10-batches-py"), 10, False, where=WHERE)
    np.testing.assert_array_equal(test.images.reshape(6, -1), batches["test_batch"][0])


def test_python2_pickles_as_distributed(tmp_path):
    data, labels = fake_split(5, 100, 0)
    for name in ("train", "test"):
        (tmp_path / name).write_bytes(py2_cifar_pickle(data, labels, b"fine_labels"))
    samples = load_cifar(str(tmp_path), 100, False, where=WHERE)
    np.testing.assert_array_equal(samples.images.reshape(5, -1), data)
    np.testing.assert_array_equal(samples.labels, labels)


def test_binary_formats(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = []
    for k in range(1, 6):
        data, labels = fake_split(3, 10, k)
        expected.append((data, labels))
        (folder / f"data_batch_{k}.bin").write_bytes(np.concatenate([labels[:, None].astype(np.uint8), data], 1)
                                                     .tobytes())
    (folder / "test_batch.bin").write_bytes(b"")
    samples = load_cifar(str(tmp_path), 10, True, where=WHERE)
    np.testing.assert_array_equal(samples.images.reshape(15, -1), np.concatenate([d for d, _ in expected]))
    np.testing.assert_array_equal(samples.labels, np.concatenate([lab for _, lab in expected]))
    with pytest.raises(DataError, match="0 bytes, not a positive multiple of the 3073-byte"):
        load_cifar(str(tmp_path), 10, False, where=WHERE)
    # CIFAR-100: coarse label byte, fine label byte, pixels; the fine label is the class.
    folder = tmp_path / "c100"
    folder.mkdir()
    data, fine = fake_split(4, 100, 9)
    coarse = fine // 5
    (folder / "test.bin").write_bytes(np.concatenate([coarse[:, None], fine[:, None], data], 1).astype(np.uint8)
                                      .tobytes())
    samples = load_cifar(str(folder), 100, False, where=WHERE)
    np.testing.assert_array_equal(samples.labels, fine)
    np.testing.assert_array_equal(samples.images.reshape(4, -1), data)


def test_layer_reads_cifar_batches(tmp_path):
    write_python_cifar10(tmp_path, n=4)
    lp = layer(tmp_path, batch=8)
    lp.transform_param.crop_size, lp.transform_param.pad, lp.transform_param.mirror = 32, 4, True
    source = open_source(lp, phase=pb.TRAIN, seed=0)
    assert source.top_shapes == infer_top_shapes(lp) == [(8, 3, 32, 32), (8,)]
    data, label = source.next_batch("cpu")
    assert data.shape == (8, 3, 32, 32) and set(label.numpy().astype(int)) <= set(range(10))


def test_missing_batches_and_folders(tmp_path):
    write_python_cifar10(tmp_path, skip=("data_batch_3", "data_batch_5"))
    with pytest.raises(DataError, match="lacks data_batch_3, data_batch_5 .training split, python format"):
        open_source(layer(tmp_path), phase=pb.TRAIN)
    with pytest.raises(DataError, match="does not exist"):
        open_source(layer(tmp_path / "nowhere"), phase=pb.TRAIN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no CIFAR-100 files"):
        open_source(layer(tmp_path / "empty", dataset=pb.SlimDataParameter.CIFAR100), phase=pb.TRAIN)


def test_label_out_of_range_and_wrong_fields(tmp_path):
    data, _ = fake_split(2, 10, 0)
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [3, 100]}, f)
    with pytest.raises(DataError, match=r"label 100 \(sample 1 .*outside 0..99"):
        open_source(layer(tmp_path, dataset=pb.SlimDataParameter.CIFAR100, train=False), phase=pb.TEST)
    c10 = tmp_path / "c10"  # CIFAR-100 style batches where CIFAR-10 is declared
    c10.mkdir()
    for name in [f"data_batch_{k}" for k in range(1, 6)]:
        with open(c10 / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [1, 2]}, f)
    with pytest.raises(DataError, match="lacks the field 'labels'"):
        load_cifar(str(c10), 10, True, where=WHERE)


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="names the global (posix|os|nt).system"):
        load_array_pickle(evil)
    assert not marker.exists()
    evil.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(DataError, match="not allowed"):
        load_array_pickle(evil)
    evil.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(DataError, match="array of Python objects"):
        load_array_pickle(evil)
    evil.write_bytes(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.")
    with pytest.raises(DataError, match="builtins.eval"):
        load_array_pickle(evil)
