"""ONNX export and import write atomically, as every slim output does (issue 15): a failure mid-export leaves no
partial file and the previous file intact, external-data files move into place with their model, a planted symbolic
link is replaced rather than followed, a missing or read-only folder is one OutputError naming it, and temporary
folders left by a killed export are removed (only those)."""

import errno
import fcntl
import importlib.util
import os
import time

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'slim[onnx]')")

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from slim.cli import main  # noqa: E402
from slim.errors import OutputError  # noqa: E402
from slim.interop import export_onnx, import_onnx, write_imported  # noqa: E402
from slim.io import atomic  # noqa: E402

has_ort = importlib.util.find_spec("onnxruntime") is not None
has_onnxscript = importlib.util.find_spec("onnxscript") is not None

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc" inner_product_param { num_output: 3 } }
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return str(path)


def leftovers(folder):
    """Hidden entries (temporary files and folders) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def fail_inside_the_exporter(monkeypatch, error):
    """torch.onnx.export writes part of the file and of an external-data file, then raises ``error``."""
    def export(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\x08\x09partial")
        with open(f"{f}.data", "wb") as out:
            out.write(b"\0" * 100)
        raise error
    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize("exporter", ["legacy"] + (["dynamo"] if has_onnxscript else []))
def test_a_failure_mid_export_leaves_no_partial_file_and_the_old_one_intact(net, tmp_path, monkeypatch, exporter):
    out = tmp_path / "net.onnx"
    out.write_bytes(b"the previous export")
    fail_inside_the_exporter(monkeypatch, RuntimeError("the exporter crashed"))
    with pytest.raises(RuntimeError, match="the exporter crashed"):
        export_onnx(net, out, exporter=exporter, check=False)
    assert out.read_bytes() == b"the previous export"
    assert not (tmp_path / "net.onnx.data").exists() and leftovers(tmp_path) == []


def test_a_full_disk_mid_export_is_one_clear_error_and_leaves_nothing(net, tmp_path, monkeypatch, capsys):
    out = tmp_path / "net.onnx"
    out.write_bytes(b"the previous export")
    # torch's exporters let the OSError through or wrap it: both are found
    wrapped = RuntimeError("serialization failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    for error in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), wrapped):
        fail_inside_the_exporter(monkeypatch, error)
        with pytest.raises(OutputError, match=rf"Cannot write {out}: the folder {tmp_path} has no space left .* "
                                              r"any previous net\.onnx is unchanged"):
            export_onnx(net, out, exporter="legacy", check=False)
        assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == []
    assert main(["export", net, "--onnx", str(out), "--exporter", "legacy"]) == 2
    err = capsys.readouterr().err
    assert "has no space left" in err and "Traceback" not in err


def test_a_missing_or_read_only_folder_is_one_clear_error(net, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "net.onnx"
    with pytest.raises(OutputError, match=rf"the folder {tmp_path / 'nowhere'} does not exist"):
        export_onnx(net, missing, exporter="legacy", check=False)
    assert not missing.parent.exists()   # not created either
    assert main(["export", net, "--onnx", str(missing), "--exporter", "legacy"]) == 2
    assert "does not exist. No partial file was left" in capsys.readouterr().err

    # These tests may run as root, for whom permission bits do not stop writes: the folder's refusal is injected.
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(atomic.tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError, match=rf"Cannot write {tmp_path}/net.onnx: the folder {tmp_path} is on a "
                                          r"read-only file system"):
        export_onnx(net, tmp_path / "net.onnx", exporter="legacy", check=False)
    assert main(["export", net, "--onnx", str(tmp_path / "net.onnx"), "--exporter", "legacy"]) == 2
    err = capsys.readouterr().err
    assert "read-only file system" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


def test_a_symlink_at_the_destination_is_replaced_not_followed(net, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "net.onnx"
    out.symlink_to(victim)
    result = export_onnx(net, out, exporter="legacy", check=False)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and [v.name for v in onnx.load(str(out)).graph.output] == ["fc"]
    assert result.data_files == [] and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not has_onnxscript, reason="the dynamo exporter needs onnxscript")
def test_external_data_moves_into_place_with_its_model(net, tmp_path, monkeypatch):
    from slim.interop import onnx_export

    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", -1)  # as a model above 2 GB would: weights beside it
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out, data = tmp_path / "net.onnx", tmp_path / "net.onnx.data"
    data.symlink_to(victim)
    result = export_onnx(net, out, exporter="dynamo")
    assert result.data_files == [str(data)] and "net.onnx.data (keep them together)" in str(result)
    assert victim.read_text() == "precious" and not data.is_symlink() and data.stat().st_size > 0
    model = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"net.onnx.data"}   # relative: the pair stays valid where it was moved
    if has_ort:
        assert result.check is not None and result.check.max_rel <= 1e-4   # read from the temporary folder
        from slim.interop.runtime import run_onnxruntime

        assert run_onnxruntime(str(out), {"data": np.ones((2, 3, 6, 6), np.float32)})["fc"].shape == (2, 3)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not has_ort, reason="onnxruntime is not installed: nothing to check against")
def test_a_file_beyond_the_tolerance_is_not_written(net, tmp_path, capsys):
    out = tmp_path / "net.onnx"
    out.write_bytes(b"the previous export")
    assert main(["export", net, "--onnx", str(out), "--exporter", "legacy", "--tolerance", "-1"]) == 2
    err = capsys.readouterr().err
    assert "more than the tolerance -1), so it was not written and any previous net.onnx is unchanged" in err
    assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == []


def test_temporary_folders_a_killed_export_left_are_removed_and_only_those(tmp_path, caplog):
    old = time.time() - 3600

    def planted(name, files=("net.onnx",), age=old):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_bytes(b"partial")
        os.utime(folder, (age, age))
        return folder

    stale = [planted(".net.onnx.abcd_123.tmp", ("net.onnx", "net.onnx.data")), planted(".net.onnx.q1w2e3r4.tmp", ())]
    kept = [planted(".net.onnx.abc.tmp"),               # not mkdtemp's 8 characters
            planted(".other.onnx.abcd1234.tmp"),         # another output
            planted("net.onnx.abcd1234.tmp"),            # not hidden
            planted(".net.onnx.fresh123.tmp", age=time.time())]   # being written right now
    nested = planted(".net.onnx.nested12.tmp")           # holds a folder: not what an export leaves
    (nested / "sub").mkdir()
    os.utime(nested, (old, old))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    linked = planted(".net.onnx.linked12.tmp", ())       # holds a link: never followed, never removed
    (linked / "net.onnx").symlink_to(victim)
    os.utime(linked, (old, old))
    link = tmp_path / ".net.onnx.linkname.tmp"           # a link to a folder, so named
    link.symlink_to(kept[1], target_is_directory=True)
    locked = planted(".net.onnx.locked12.tmp")           # old, but a live writer holds its lock
    holder = os.open(locked, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with atomic.atomic_files(tmp_path / "net.onnx") as folder:
            (folder / "net.onnx").write_bytes(b"new")
    finally:
        os.close(holder)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {p.name for p in stale}
    assert {p.name for p in [*kept, nested, linked, locked, link]} <= left
    assert victim.read_text() == "precious" and (tmp_path / "net.onnx").read_bytes() == b"new"
    assert caplog.text.count("left by a write of") == len(stale)


def test_atomic_files_refuses_a_writer_that_wrote_no_file_of_the_name(tmp_path):
    with pytest.raises(OutputError, match=r"the writer left no file of that name \(it wrote other\)"):
        with atomic.atomic_files(tmp_path / "net.onnx") as folder:
            (folder / "other").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


# ----- slim import: the prototxt and caffemodel pair -------------------------------------------------------------


def conv_model(tmp_path):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("w", (3, 2, 3, 3)), ("b", (3,)))])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def test_import_writes_its_pair_all_or_nothing(tmp_path, monkeypatch):
    import slim.io

    result = import_onnx(conv_model(tmp_path))
    proto, weights = tmp_path / "out.prototxt", tmp_path / "out.caffemodel"
    proto.write_text("old net")
    weights.write_bytes(b"old weights")

    def fail(*args, **kwargs):  # the prototxt fails after the caffemodel was written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real = slim.io.write_net
    monkeypatch.setattr(slim.io, "write_net", fail)
    with pytest.raises(OutputError, match=rf"Cannot write {proto}: the folder {tmp_path} has no space left"):
        write_imported(result, tmp_path / "out")
    assert proto.read_text() == "old net" and weights.read_bytes() == b"old weights"
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(slim.io, "write_net", real)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    weights.unlink()
    weights.symlink_to(victim)
    assert write_imported(result, tmp_path / "out") == (str(proto), str(weights))
    assert victim.read_text() == "precious" and not weights.is_symlink()
    from slim.net import Net

    Net(str(proto), weights=str(weights))   # a matching pair
    assert leftovers(tmp_path) == []
    with pytest.raises(OutputError, match=rf"the folder {tmp_path / 'nowhere'} does not exist"):
        write_imported(result, tmp_path / "nowhere" / "out")
