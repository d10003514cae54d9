"""Caffe's Data layer: Datum records (raw, float and encoded) in a small LMDB written here."""

import io

import numpy as np
import pytest

from slim import proto as pb
from slim.data import infer_top_shapes, open_source
from slim.errors import DataError

lmdb = pytest.importorskip("lmdb", reason="the lmdb package (slim[lmdb]) is needed for Data layers")


def write_db(path, datums):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, datum in datums:
            txn.put(key, datum.SerializeToString())
    env.close()


def raw_datum(image, label):
    c, h, w = image.shape
    return pb.Datum(channels=c, height=h, width=w, data=image.tobytes(), label=label)


def data_layer(source, batch=2, backend=pb.DataParameter.LMDB, **transform):
    lp = pb.LayerParameter(name="data", type="Data")
    lp.data_param.source, lp.data_param.batch_size, lp.data_param.backend = str(source), batch, backend
    for k, v in transform.items():
        setattr(lp.transform_param, k, v)
    return lp


def test_raw_datums_in_key_order(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    keys = [f"{i:08d}_img".encode() for i in range(5)]
    write_db(tmp_path / "db", [(keys[i], raw_datum(imgs[i], 10 + i)) for i in (3, 0, 4, 1, 2)])  # written unsorted
    lp = data_layer(tmp_path / "db", batch=3, crop_size=4, mirror=False)
    assert infer_top_shapes(lp) == [(3, 3, 4, 4), (3,)]
    source = open_source(lp, phase=pb.TEST)
    data, label = source.next_batch()
    np.testing.assert_array_equal(label.numpy(), [10, 11, 12])  # LMDB keys are read sorted, as Caffe's cursor
    np.testing.assert_array_equal(data.numpy(), imgs[:3, :, :, 1:5].astype(np.float32))  # TEST: center crop
    data, label = source.next_batch()
    np.testing.assert_array_equal(label.numpy(), [13, 14, 10])  # wraps around


def test_float_and_encoded_datums(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow decodes encoded Datum records")
    values = np.random.default_rng(1).normal(size=(2, 1, 3, 3)).astype(np.float32)
    floats = [pb.Datum(channels=1, height=3, width=3, float_data=v.ravel(), label=i) for i, v in enumerate(values)]
    write_db(tmp_path / "f", [(b"%d" % i, d) for i, d in enumerate(floats)])
    data, label = open_source(data_layer(tmp_path / "f"), phase=pb.TEST).next_batch()
    np.testing.assert_allclose(data.numpy(), values)
    rgb = np.random.default_rng(2).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    datums = []
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(rgb[i]).save(buf, format="PNG")
        datums.append((b"%d" % i, pb.Datum(data=buf.getvalue(), encoded=True, label=i)))
    write_db(tmp_path / "e", datums)
    lp = data_layer(tmp_path / "e")
    assert infer_top_shapes(lp) == [(2, 3, 5, 4), (2,)]
    data, _ = open_source(lp, phase=pb.TEST).next_batch()
    np.testing.assert_array_equal(data.numpy(), rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32))  # BGR
    lp.transform_param.force_gray = True
    data, _ = open_source(lp, phase=pb.TEST).next_batch()
    assert data.shape == (2, 1, 5, 4)


def test_data_layer_errors(tmp_path):
    with pytest.raises(DataError, match="LEVELDB.*convert_imageset with -backend lmdb"):
        open_source(data_layer(tmp_path / "db", backend=pb.DataParameter.LEVELDB), phase=pb.TRAIN)
    with pytest.raises(DataError, match="'.*nowhere' \\(data_param.source\\) does not exist"):
        open_source(data_layer(tmp_path / "nowhere"), phase=pb.TRAIN)
    write_db(tmp_path / "empty", [])
    with pytest.raises(DataError, match="holds no records"):
        open_source(data_layer(tmp_path / "empty"), phase=pb.TRAIN)
    write_db(tmp_path / "mixed", [(b"a", raw_datum(np.zeros((1, 2, 2), np.uint8), 0)),
                                  (b"b", raw_datum(np.zeros((1, 3, 3), np.uint8), 1))])
    source = open_source(data_layer(tmp_path / "mixed"), phase=pb.TRAIN)
    with pytest.raises(DataError, match="record 'b' .* is 1x3x3 .* first record is 1x2x2"):
        source.next_batch()
    bad = pb.Datum(channels=1, height=2, width=2, data=b"abc")
    write_db(tmp_path / "bad", [(b"a", bad)])
    with pytest.raises(DataError, match="declares 1x2x2 .* holds 3 values"):
        open_source(data_layer(tmp_path / "bad"), phase=pb.TRAIN)
    write_db(tmp_path / "big", [(b"a", raw_datum(np.zeros((1, 2, 2), np.uint8), 0))])
    with pytest.raises(DataError, match="crop_size 3 is larger than the 2x2 images"):
        open_source(data_layer(tmp_path / "big", crop_size=3), phase=pb.TRAIN)


def test_deprecated_data_param_fields_warn(tmp_path):
    write_db(tmp_path / "db", [(b"a", raw_datum(np.zeros((1, 2, 2), np.uint8), 0))])
    lp = data_layer(tmp_path / "db")
    lp.data_param.scale = 0.5
    with pytest.warns(UserWarning, match="move them into transform_param"):
        open_source(lp, phase=pb.TRAIN)


def test_deploy_net_and_train_net_take_the_shape_from_the_same_records(tmp_path):
    # A grey LMDB without crop_size: the prototxt does not state the shape, the first record does, and the deploy
    # net derived from the train net gets the train net's own data shape (one source: slim.data.sample_shape).
    from slim.deploy import data_shape, make_deploy
    from slim.graph import build_graph

    rng = np.random.default_rng(1)
    write_db(tmp_path / "grey", [(b"0", raw_datum(rng.integers(0, 256, (1, 6, 5), dtype=np.uint8), 0))])
    net = pb.NetParameter(name="n")
    net.layer.append(data_layer(tmp_path / "grey", batch=4))
    net.layer[0].top.extend(["data", "label"])
    net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"]).inner_product_param.num_output = 2
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["ip", "label"], top=["loss"])
    assert data_shape(net.layer[0]) == (1, 6, 5)
    train = build_graph(net, phase="TRAIN")
    deploy = build_graph(make_deploy(net))
    assert train.layer("data").top_shapes[0] == (4, 1, 6, 5)
    assert deploy.layer("input").top_shapes[0] == (1, 1, 6, 5)
    # Without the database the same layer with a crop is assumed colour, in both nets alike.
    net.layer[0].data_param.source = str(tmp_path / "absent")
    net.layer[0].transform_param.crop_size = 4
    assert data_shape(net.layer[0]) == (3, 4, 4)
    assert build_graph(net, phase="TRAIN").layer("data").top_shapes[0] == (4, 3, 4, 4)


def test_one_database_read_by_several_layers_at_once(tmp_path):
    # py-lmdb opens an environment once per process: a train net and a test net (or a solver and the pruner after
    # it) reading the same database share it, and it closes when the last reader goes.
    import gc
    import os

    from slim.data import lmdb_source

    imgs = np.random.default_rng(5).integers(0, 256, (4, 1, 2, 2), dtype=np.uint8)
    write_db(tmp_path / "db", [(b"%d" % i, raw_datum(imgs[i], i)) for i in range(4)])
    first = open_source(data_layer(tmp_path / "db", batch=4), phase=pb.TRAIN)
    (tmp_path / "x").mkdir()
    second = open_source(data_layer(f"{tmp_path}/x/../db", batch=2), phase=pb.TEST)  # the same folder
    assert infer_top_shapes(data_layer(tmp_path / "db")) == [(2, 1, 2, 2), (2,)]
    np.testing.assert_array_equal(first.next_batch()[1].numpy(), [0, 1, 2, 3])
    np.testing.assert_array_equal(second.next_batch()[1].numpy(), [0, 1])
    del first, second
    gc.collect()
    assert os.path.realpath(tmp_path / "db") not in set(lmdb_source._OPEN_ENVS.keys())
