"""Hostile and damaged inputs, one test per defect found by the attack of issue 15: each is slim's own error,
raised before anything is allocated, mapped or resumed."""

import os
import pickle
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slim import proto as pb
from slim.data.cifar import load_array_pickle, load_cifar
from slim.errors import DataError, OutputError, ParseError, ResourceError, SolverError, WeightsError
from slim.io import atomic_write, read_caffemodel, read_net, read_solverstate, write_solverstate
from slim.net import Net
from slim.solver import Solver
from solver_helpers import tiny_net, write_solver

ROOT = Path(__file__).resolve().parents[1]
# A blob far larger than any machine's memory, declared by a sparse file that takes a few KB on disk.
TIB_FLOATS = 1 << 38


def key(number, wire=2):
    return varint(number << 3 | wire)


def varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def sparse_file(path: Path, head: bytes, data_bytes: int) -> Path:
    """``head`` followed by ``data_bytes`` of holes: the file's size is real, its blocks are not."""
    with open(path, "wb") as f:
        f.write(head)
        try:
            f.truncate(len(head) + data_bytes)
        except OSError as e:  # a file system without sparse files this large
            pytest.skip(f"cannot make a {data_bytes:,}-byte sparse file here: {e}")
    return path


def huge_blob_head(count: int) -> bytes:
    """A BlobProto declaring ``count`` floats (shape [count]) whose packed data follows: head bytes only."""
    shape = key(1) + varint(len(varint(count))) + varint(count)
    return key(7) + varint(len(shape)) + shape + key(5) + varint(4 * count)


def huge_caffemodel(path: Path, layer="ip") -> Path:
    """A caffemodel whose layer ``layer`` holds one blob of 2^38 floats (1 TiB), as a sparse file."""
    count = TIB_FLOATS
    blob = huge_blob_head(count)
    name = key(1) + varint(len(layer)) + layer.encode()
    layer_head = name + key(7) + varint(len(blob) + 4 * count) + blob
    head = key(100) + varint(len(layer_head) + 4 * count) + layer_head
    return sparse_file(path, head, 4 * count)


# ----- the blob codec --------------------------------------------------------------------------------------------


def test_a_blob_with_1001_axes_is_a_parse_error(tmp_path):
    net = pb.NetParameter(name="n")
    blob = net.layer.add(name="ip", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([1] * 1001)
    blob.data.append(1.0)
    path = tmp_path / "axes.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(ParseError, match="1001 axes; Caffe's blobs have at most 32"):
        read_caffemodel(path)
    state = pb.SolverState(iter=1)
    state.history.add().CopyFrom(blob)
    path = tmp_path / "axes.solverstate"
    path.write_bytes(state.SerializeToString())
    with pytest.raises(ParseError, match="history blob 0 has a shape of 1001 axes"):
        read_solverstate(path)


def test_a_name_that_is_not_utf8_is_a_parse_error(tmp_path):
    # proto2 does not check UTF-8; protobuf hands back bytes, which used to travel on as a layer name or a path.
    layer = key(1) + varint(3) + b"\xff\xfeA"
    path = tmp_path / "name.caffemodel"
    path.write_bytes(key(100) + varint(len(layer)) + layer)
    with pytest.raises(ParseError, match=r"NetParameter.layer\[0\].name holds b'\\xff\\xfeA', which is not UTF-8"):
        read_caffemodel(path)


def test_a_sparse_tib_blob_is_refused_before_allocating(tmp_path):
    path = huge_caffemodel(tmp_path / "huge.caffemodel")
    assert os.stat(path).st_blocks * 512 < 1 << 20  # a few KB on disk
    with pytest.raises(ResourceError, match=r"blob 0 of layer 'ip' \(shape 274877906944\) needs 1\.0 TiB"):
        read_caffemodel(path, copy=True)
    # Views cost nothing; the net checks the shape it expects before copying anything.
    net = Net(tiny_ip_net(bias=False), seed=0)
    with pytest.raises(WeightsError, match=r"layer 'ip' blob 0 has shape \(274877906944,\), the net expects \(3, 4\)"):
        net.load_weights(str(path))


def tiny_ip_net(bias=True):
    net = pb.NetParameter(name="ip")
    net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, 4])
    ip = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"]).inner_product_param
    ip.num_output, ip.bias_term = 3, bias
    return net


def test_a_file_larger_than_ulimit_v_is_a_resource_error(tmp_path):
    # mmap reserves address space for the whole file; under ulimit -v that fails. A child process, so that the
    # limit does not outlive the test.
    path = huge_caffemodel(tmp_path / "huge.caffemodel")
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "from slim.errors import ResourceError\n"
            "from slim.io import read_caffemodel\n"
            "try:\n    read_caffemodel(sys.argv[1])\n"
            "except ResourceError as e:\n    print('ResourceError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ResourceError: The caffemodel" in result.stdout and "cannot be mapped into memory" in result.stdout
    assert "ulimit -v" in result.stdout


def test_paths_with_a_nul_byte_are_clear_errors(tmp_path):
    with pytest.raises(ParseError, match="without NUL bytes"):
        read_caffemodel(str(tmp_path / "a\0b.caffemodel"))
    with pytest.raises(ParseError, match="prototxt path .* contains a NUL byte"):
        read_net(str(tmp_path / "a\0b.prototxt"))
    with pytest.raises(OutputError, match="contains a NUL byte"):
        with atomic_write(str(tmp_path / "a\0b")):
            pass
    with pytest.raises(SolverError, match="snapshot_prefix .* contains a NUL byte"):
        Solver(write_solver(tmp_path, tiny_net(), snapshot=2, snapshot_prefix=str(tmp_path / "x\\000y")),
               metrics=False)
    path = write_solver(tmp_path, tiny_net())
    with pytest.raises(SolverError, match="--snapshot .* contains a NUL byte"):
        Solver(path, snapshot=str(tmp_path / "s\0.solverstate"), metrics=False)


# ----- nets --------------------------------------------------------------------------------------------------------


def test_a_huge_num_output_is_refused_with_the_figure_before_any_filler_runs():
    net = tiny_ip_net()
    net.layer[0].input_param.shape[0].dim[1] = 10**6
    net.layer[1].inner_product_param.num_output = 10**6
    with pytest.raises(ResourceError, match=r"largest: layer 'ip'.* need 3\.6 TiB \(4,000,004,000,000 bytes\)"):
        Net(net)


def test_fillers_of_empty_blobs_and_bad_filler_ranges():
    net = tiny_ip_net()
    net.layer[0].input_param.shape[0].dim[1] = 0  # an InnerProduct over 0 inputs: msra's fan_in is 0
    net.layer[1].inner_product_param.weight_filler.type = "msra"
    assert Net(net).params["ip"][0].shape == (3, 0)
    net = tiny_ip_net()
    net.layer[1].inner_product_param.weight_filler.type = "uniform"
    net.layer[1].inner_product_param.weight_filler.min = 2  # max is 1
    from slim.errors import NetError
    with pytest.raises(NetError, match="uniform filler needs finite min <= max"):
        Net(net)
    net.layer[1].inner_product_param.weight_filler.type = "gaussian"
    net.layer[1].inner_product_param.weight_filler.std = -1
    with pytest.raises(NetError, match="gaussian filler needs a finite mean and a finite std >= 0"):
        Net(net)


# ----- CIFAR pickles --------------------------------------------------------------------------------------------


def test_a_pickle_nested_100000_deep_is_a_data_error(tmp_path):
    depth = 100_000
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    with pytest.raises(DataError, match="nests containers more than 64 deep"):
        load_array_pickle(path)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="nests containers"):
        load_cifar(str(tmp_path), 10, False, where="data")


@pytest.mark.parametrize("name, body, message", [
    ("bytes8", b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.", "expected 1099511627776 bytes"),
    ("unicode8", b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"abc.", "expected 1099511627776 bytes"),
    ("frame", b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"].", "a frame of 1,099,511,627,776 bytes"),
    ("memo", b"\x80\x02]r" + struct.pack("<I", 2**31) + b".", "memo index 2147483648"),
    ("ndarray", b"\x80\x02cnumpy\nndarray\n(J\xff\xff\xff\x7ftR.", "larger than the file"),
    ("reconstruct", b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\xff\xff\xff\x7f\x85C\x01b"
                    b"\x87R.", "larger than the file"),
])
def test_a_pickle_declaring_a_huge_size_is_refused_before_allocating(tmp_path, name, body, message):
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(body)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        in_use = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (1 << 30), hard))  # an allocation of the declared size fails
    try:
        with pytest.raises(DataError, match=message):
            load_array_pickle(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_pickle_cannot_change_a_dtype_or_a_function(tmp_path):
    # numpy pickles a dtype as dtype('u1', False, True) plus a state; with the copy flag forged to False the state
    # used to land on numpy's one shared uint8 dtype.
    forged = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00u1K\x00K\x00\x87R"
              b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ftb.")
    path = tmp_path / "dtype.pkl"
    path.write_bytes(forged)
    with pytest.raises(DataError, match="differs from the one numpy writes"):
        load_array_pickle(path)
    assert np.dtype("u1").flags == 0 and np.zeros(2, np.uint8).sum() == 0
    path.write_bytes(b"\x80\x02c_codecs\nencode\n}X\x03\x00\x00\x00fooK\x01sb.")  # a BUILD on a function
    with pytest.raises(DataError, match="sets the state of a function"):
        load_array_pickle(path)


def test_real_pickles_of_every_protocol_still_load(tmp_path):
    batch = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2],
             b"big": np.arange(3, dtype=">f4"), b"half": np.float16(2.5), b"empty": np.zeros((0, 3), "<i8")}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        got = load_array_pickle(path)
        for k, v in batch.items():
            # numpy itself hands back big-endian data in native order; kind and size stay
            assert np.array_equal(got[k], v) and np.asarray(got[k]).dtype.str[1:] == np.asarray(v).dtype.str[1:]
        path.write_bytes(pickle.dumps({b"rec": np.zeros(2, dtype=[("a", "<i4"), ("b", "u1")])}, protocol=protocol))
        with pytest.raises(DataError, match="structured or sub-array dtype"):
            load_array_pickle(path)


# ----- solverstates ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A finished tiny run with a snapshot at iteration 2: (solver path, state, history)."""
    folder = tmp_path_factory.mktemp("resume")
    path = write_solver(folder, tiny_net(batch=4, channels=3), max_iter=4, snapshot=2)
    Solver(path, metrics=False).solve()
    state, history = read_solverstate(folder / "solver_iter_2.solverstate", copy=True)
    return path, state, history


def forged(tmp_path, snapshot, change):
    path, state, history = snapshot
    state = pb.SolverState.FromString(state.SerializeToString())
    history = list(history)
    change(state, history)
    out = tmp_path / "forged.solverstate"
    write_solverstate(out, state, history)
    return path, str(out)


def set_iter(value):
    def change(state, history):
        state.iter = value
    return change


@pytest.mark.parametrize("change, error, message", [
    (set_iter(-2**31), SolverError, "iter is -2147483648, which no training run writes"),
    (set_iter(5), SolverError, "past max_iter 4"),
    (lambda s, h: setattr(s, "current_step", -3), SolverError, "current_step is -3"),
    (lambda s, h: setattr(s.slim_state, "torch_rng_state", s.slim_state.torch_rng_state[:-16]), SolverError,
     "is not a state of this torch's CPU generator \\(5040 bytes, not 5056\\)"),
    (lambda s, h: setattr(s.slim_state, "torch_rng_state", b"\xff" * 5056), SolverError,
     "is not a state of this torch's CPU generator"),
    (lambda s, h: s.slim_state.data[0].__setattr__("position", -1), SolverError, "is at epoch 0, position -1"),
    (lambda s, h: s.slim_state.smoothed_loss.append(float("nan")), SolverError, "smoothed_loss holds a value"),
    (lambda s, h: setattr(s.slim_state, "loss_scale", -1.0), SolverError, "fp16 loss scale is -1"),
    (lambda s, h: setattr(s.slim_state, "world_size", -2), SolverError, "world_size is -2"),
])
def test_a_forged_solverstate_is_refused_before_anything_is_resumed(tmp_path, snapshot, change, error, message):
    path, state_path = forged(tmp_path, snapshot, change)
    before = torch.get_rng_state()
    with pytest.raises(error, match=message):
        Solver(path, snapshot=state_path, metrics=False)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was not touched


def test_a_solverstate_whose_learned_net_is_not_text_is_a_parse_error(tmp_path, snapshot):
    path, state, history = snapshot
    data = pb.SolverState(iter=2).SerializeToString() + key(2) + varint(3) + b"\xff\xfe\x00"
    out = tmp_path / "bad_name.solverstate"
    out.write_bytes(data)
    with pytest.raises(ParseError, match="SolverState.learned_net holds .* not UTF-8"):
        Solver(path, snapshot=str(out), metrics=False)


def test_a_sparse_tib_history_blob_is_refused_against_the_net(tmp_path, snapshot):
    path, state, history = snapshot
    head = pb.SolverState(iter=2, learned_net=state.learned_net).SerializeToString()
    blob = huge_blob_head(TIB_FLOATS)
    out = sparse_file(tmp_path / "huge.solverstate", head + key(3) + varint(len(blob) + 4 * TIB_FLOATS) + blob,
                      4 * TIB_FLOATS)
    with pytest.raises(SolverError, match=r"but the snapshot has 1"):
        Solver(path, snapshot=str(out), metrics=False)
    # With as many history blobs as the net has params, the first one's shape is what gives it away.
    count = len(history)
    small = b"".join(key(3) + varint(len(b)) + b for b in
                     (pb.BlobProto(shape=pb.BlobShape(dim=h.shape), data=h.ravel()).SerializeToString()
                      for h in history[1:]))
    out = sparse_file(tmp_path / "huge2.solverstate", head + key(3) + varint(len(blob) + 4 * TIB_FLOATS) + blob,
                      4 * TIB_FLOATS)
    with open(out, "ab") as f:
        f.write(small)
    assert count > 1
    with pytest.raises(SolverError, match=r"history blob 0 .* the snapshot's has shape \(274877906944,\)"):
        Solver(path, snapshot=str(out), metrics=False)
