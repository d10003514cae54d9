"""compute_image_mean: the mean image of an LMDB as Caffe's BlobProto (1 x C x H x W), read back by slim's
transform_param.mean_file equal to numpy's mean over the images, the per-channel log lines, encoded and float
records, and refused input."""

import numpy as np
import pytest

from slim import proto as pb
from slim.cli import main
from slim.data import open_source
from slim.data.imageset import convert_imageset
from slim.data.lmdb_writer import write_datum_lmdb, write_lmdb
from slim.data.mean import compute_image_mean
from slim.data.transform import read_mean_file
from slim.errors import DataError

lmdb = pytest.importorskip("lmdb")


def random_images(n, shape=(3, 5, 4), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def data_layer(source, batch, mean_file=""):
    lp = pb.LayerParameter(name="data", type="Data")
    lp.data_param.source, lp.data_param.batch_size, lp.data_param.backend = str(source), batch, pb.DataParameter.LMDB
    if mean_file:
        lp.transform_param.mean_file = str(mean_file)
    return lp


def test_mean_file_round_trip(tmp_path, capsys):
    images = random_images(7)
    write_datum_lmdb(tmp_path / "db", images, np.arange(7))
    assert main(["compute_image_mean", str(tmp_path / "db"), str(tmp_path / "mean.binaryproto")]) == 0
    expected = images.astype(np.float64).mean(axis=0).astype(np.float32)
    # Caffe's file: a BlobProto with the legacy 4-D fields (num 1) and float data.
    blob = pb.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 5, 4) and not blob.HasField("shape")
    np.testing.assert_array_equal(np.asarray(blob.data, np.float32).reshape(3, 5, 4), expected)
    # ... which slim's mean_file reader returns as 1 x C x H x W ...
    np.testing.assert_array_equal(read_mean_file(str(tmp_path / "mean.binaryproto"), where="test"), expected[None])
    # ... and the Data layer subtracts.
    data, _ = open_source(data_layer(tmp_path / "db", 7, tmp_path / "mean.binaryproto"), phase=pb.TEST).next_batch()
    np.testing.assert_allclose(data.numpy(), images.astype(np.float32) - expected, rtol=0, atol=1e-5)
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["Starting iteration", "Processed 7 files.", f"Write to {tmp_path / 'mean.binaryproto'}",
                       "Number of channels: 3"]
    assert out[4:] == [f"mean_value channel [{c}]: {expected[c].mean(dtype=np.float64):.6g}" for c in range(3)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_without_an_output_file_only_the_values_are_said(tmp_path):
    images = random_images(3, (1, 4, 4), seed=1)
    write_datum_lmdb(tmp_path / "db", images, np.zeros(3))
    lines = []
    mean = compute_image_mean(tmp_path / "db", echo=lines.append)
    assert mean.count == 3 and mean.mean.shape == (1, 4, 4)
    assert mean.channel_means == pytest.approx([images.mean()], rel=1e-6)
    assert not any(line.startswith("Write to") for line in lines) and lines[-1].startswith("mean_value channel [0]: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_encoded_records_are_decoded(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    (tmp_path / "root").mkdir()
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(tmp_path / "root" / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(4)))
    convert_imageset(tmp_path / "root", tmp_path / "list.txt", tmp_path / "png", encoded=True)
    mean = compute_image_mean(tmp_path / "png", tmp_path / "mean.binaryproto")
    bgr = rgb[..., ::-1].transpose(0, 3, 1, 2)  # Caffe decodes colour files as BGR
    np.testing.assert_array_equal(mean.mean, bgr.astype(np.float64).mean(axis=0).astype(np.float32))
    np.testing.assert_array_equal(read_mean_file(str(tmp_path / "mean.binaryproto"), where="test")[0], mean.mean)


def test_float_records(tmp_path):
    values = np.random.default_rng(3).normal(size=(5, 2, 3, 3)).astype(np.float32)
    datums = (pb.Datum(channels=2, height=3, width=3, float_data=v.ravel(), label=0) for v in values)
    write_lmdb(tmp_path / "db", ((b"%08d" % i, d.SerializeToString()) for i, d in enumerate(datums)))
    mean = compute_image_mean(tmp_path / "db")
    np.testing.assert_allclose(mean.mean, values.astype(np.float64).mean(axis=0), rtol=1e-6)


def test_bad_input(tmp_path, capsys):
    with pytest.raises(DataError, match=r"The database '.*nodb' \(INPUT_DB\) does not exist"):
        compute_image_mean(tmp_path / "nodb")
    write_datum_lmdb(tmp_path / "db", random_images(2), np.zeros(2))
    with pytest.raises(DataError, match="LEVELDB is not supported"):
        compute_image_mean(tmp_path / "db", backend="leveldb")
    mixed = [pb.Datum(channels=1, height=2, width=2, data=bytes(4)), pb.Datum(channels=1, height=3, width=2,
                                                                             data=bytes(6))]
    write_lmdb(tmp_path / "mixed", ((b"%d" % i, d.SerializeToString()) for i, d in enumerate(mixed)))
    assert main(["compute_image_mean", str(tmp_path / "mixed"), str(tmp_path / "mean.binaryproto")]) == 2
    err = capsys.readouterr().err
    assert "record '1' of '" in err and "is 1x3x2 (CxHxW) but the first record is 1x2x2" in err
    assert "Traceback" not in err and not (tmp_path / "mean.binaryproto").exists()
    assert main(["compute_image_mean", str(tmp_path / "db"), str(tmp_path / "no" / "mean.binaryproto")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tool_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    images = random_images(2, (1, 2, 2), seed=4)
    write_datum_lmdb(tmp_path / "db", images, np.zeros(2))
    script = Path(__file__).resolve().parents[1] / "tools" / "compute_image_mean.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "db"), str(tmp_path / "mean.binaryproto"),
                           "-backend", "lmdb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"mean_value channel [0]: {images.mean(dtype=np.float64):.6g}"
    np.testing.assert_array_equal(read_mean_file(str(tmp_path / "mean.binaryproto"), where="test")[0, 0],
                                  images[:, 0].astype(np.float64).mean(axis=0).astype(np.float32))
