"""slim.offline: a net's shapes where its data is not on this machine: shapes the prototxt states are kept with one
note per absent data layer, --input-shape stands an Input layer in for a data layer, and an unknown shape is an
error that says which flag to pass."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from slim import proto as pb
from slim.errors import DataError, SlimError
from slim.graph import build_graph
from slim.io import parse_net
from slim.offline import build_offline, parse_input_shapes, stand_in_absent_data

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"
REST = """layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def data_net(train_source="absent/train_lmdb", test_source="absent/test_lmdb", crop=0, test_type="Data"):
    crop_text = f"transform_param {{ crop_size: {crop} }}" if crop else ""
    test = (f'data_param {{ source: "{test_source}" batch_size: 10 backend: LMDB }}' if test_type == "Data" else
            f'image_data_param {{ source: "{test_source}" batch_size: 10 new_height: 12 new_width: 14 }}')
    return parse_net(f"""name: "n"
layer {{ name: "d" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }} {crop_text}
  data_param {{ source: "{train_source}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "d" type: "{test_type}" top: "data" top: "label" include {{ phase: TEST }} {crop_text} {test} }}
""" + REST)


def test_input_shapes_are_parsed():
    assert parse_input_shapes(["data:3,32,32", "x:10"]) == {"data": (3, 32, 32), "x": (10,)}
    for bad in ("data", "data:", ":3,4,4", "data:3,0,4", "data:3,a,4"):
        with pytest.raises(SlimError, match="is not TOP:C,H,W with positive sizes"):
            parse_input_shapes([bad])
    with pytest.raises(SlimError, match="gives top 'data' twice"):
        parse_input_shapes(["data:1,2,2", "data:1,3,3"])


def test_an_absent_database_without_a_stated_size_says_which_flag_to_pass():
    with pytest.raises(DataError) as e:
        stand_in_absent_data(data_net(), "TEST", where="n.prototxt")
    message = str(e.value)
    assert message.startswith('Layer "d" (Data): the LMDB database \'absent/test_lmdb\' (data_param.source) does not '
                              "exist.")
    assert message.endswith("Without its data, the shape of top 'data' is not known here: give it with --input-shape "
                            "data:C,H,W (one sample, e.g. data:3,224,224), or point the layer at its data with "
                            "--source d@TEST=PATH.")


def test_input_shape_stands_an_input_layer_in():
    net, notes = stand_in_absent_data(data_net(), "TRAIN", input_shapes={"data": (1, 5, 6)}, where="n.prototxt")
    assert [str(n) for n in notes] == ['Layer "d" (Data): data_param.source \'absent/train_lmdb\' does not exist here; '
                                       "it stands as an Input layer with top data 1x5x6 per sample (--input-shape)."]
    graph = build_graph(net, "TRAIN", source="n.prototxt")
    node = graph.layers[0]
    assert (node.name, node.type, node.top_shapes) == ("d", "Input", [(4, 1, 5, 6), (4,)])
    assert graph.layer("conv").top_shapes == [(4, 4, 3, 4)]
    # The TEST layer is left alone (only the phase built is touched).
    assert [lp.type for lp in net.layer[:2]] == ["Input", "Data"]


def test_stated_shapes_are_kept_with_one_note_per_absent_layer():
    net, notes = stand_in_absent_data(data_net(crop=8, test_type="ImageData", test_source="absent/list.txt"), "TEST")
    assert len(notes) == 1 and notes[0].shape == (3, 8, 8) and notes[0].origin == "the prototxt"
    assert str(notes[0]) == ('Layer "d" (ImageData): image_data_param.source \'absent/list.txt\' does not exist here; '
                             "the shape of its top data, 3x8x8 per sample, is taken from the prototxt, not read from "
                             "the data.")
    assert build_graph(net, "TEST").layers[0].top_shapes == [(10, 3, 8, 8), (10,)]
    net, notes = stand_in_absent_data(data_net(crop=8), "TRAIN")
    assert "taken from the prototxt (crop_size; 3 channels assumed, 1 with force_gray: --input-shape data:C,H,W " \
           "says otherwise)" in str(notes[0])
    cifar = parse_net('layer { name: "c" type: "SlimData" top: "data" top: "label" slim_data_param { dataset: '
                      'CIFAR10 source: "absent/cifar" batch_size: 2 } }')
    _, notes = stand_in_absent_data(cifar, "TEST")
    assert [(n.field, n.path, n.shape) for n in notes] == [("slim_data_param.source", "absent/cifar", (3, 32, 32))]
    digits = parse_net('layer { name: "c" type: "SlimData" top: "data" top: "label" slim_data_param { batch_size: 2 }'
                       ' }')
    assert stand_in_absent_data(digits, "TEST")[1] == []  # the built-in digits read no source


def test_data_that_is_here_is_read_and_needs_no_note(tmp_path):
    pytest.importorskip("lmdb")
    from slim.data.lmdb_writer import write_datum_lmdb

    write_datum_lmdb(tmp_path / "db", np.zeros((3, 1, 5, 7), np.uint8), np.zeros(3))
    net, notes = stand_in_absent_data(data_net(test_source=str(tmp_path / "db")), "TEST")
    assert notes == [] and build_graph(net, "TEST").layers[0].top_shapes == [(10, 1, 5, 7), (10,)]
    # --input-shape replaces it all the same (its data is then not read), without a note.
    net, notes = stand_in_absent_data(data_net(test_source=str(tmp_path / "db")), "TEST", input_shapes={"data": (2,)})
    assert notes == [] and net.layer[1].type == "Input"


def test_an_input_shape_for_no_data_top_lists_the_data_tops():
    with pytest.raises(SlimError, match=r"--input-shape label:1,2,2: no data layer of the TEST net of n.prototxt has "
                                        r"the top 'label'. Its data tops are: 'data' \(layer 'd', Data\)."):
        stand_in_absent_data(data_net(crop=4), "TEST", input_shapes={"label": (1, 2, 2)}, where="n.prototxt")
    net, _ = stand_in_absent_data(data_net(crop=4), "TEST", input_shapes={"label": (1, 2, 2)}, strict=False)
    assert [lp.type for lp in net.layer[:2]] == ["Data", "Data"]


def test_caffe_lenet_train_test(tmp_path):
    # Caffe's examples/mnist/lenet_train_test.prototxt, unchanged; its LMDBs are not here.
    if not TESTNETS.is_dir():
        pytest.skip(f"{TESTNETS} (real Caffe files) is absent")
    path = str(tmp_path / "lenet_train_test.prototxt")
    shutil.copy(TESTNETS / "examples__mnist__lenet_train_test.prototxt", path)
    with pytest.raises(DataError, match=r"mnist_test_lmdb.*--input-shape data:C,H,W .*--source mnist@TEST=PATH"):
        build_offline(path, "TEST")
    graph, notes = build_offline(path, "TRAIN", input_shapes=["data:1,28,28"])
    assert graph.source == path and graph.layer("mnist").top_shapes == [(64, 1, 28, 28), (64,)]
    assert graph.layer("ip2").top_shapes == [(64, 10)] and graph.param_count == 431080
    assert [n.path for n in notes] == ["examples/mnist/mnist_train_lmdb"] and graph.phase == pb.TRAIN
