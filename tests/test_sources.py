"""slim.sources: ``--source LAYER[@PHASE]=PATH`` sets a data layer's source in the parsed net (never the file), with
clear errors for malformed flags, unknown, ambiguous or source-less layers; a solver's nets are handed over inline."""

import pytest

from slim import proto as pb
from slim.errors import SlimError
from slim.io import parse_net, read_solver
from slim.solver.nets import solver_nets
from slim.sources import (SourceOverride, layer_phases, override_solver_sources, override_sources,
                          parse_source_overrides)

# Caffe's examples/mnist layout: a TRAIN and a TEST data layer that share the name "mnist".
LENET = """name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "examples/mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "examples/mnist/mnist_test_lmdb" batch_size: 100 backend: LMDB } }
layer { name: "extra" type: "ImageData" top: "extra" top: "extra_label" exclude { phase: TEST }
  image_data_param { source: "list.txt" batch_size: 4 } }
layer { name: "digits" type: "SlimData" top: "digits" top: "digits_label" slim_data_param { batch_size: 2 } }
layer { name: "mem" type: "MemoryData" top: "mem" top: "mem_label"
  memory_data_param { batch_size: 1 channels: 1 height: 2 width: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10 } }
"""


def sources(net):
    return [(lp.name, getattr(lp, p).source) for lp in net.layer
            for p in ("data_param", "image_data_param") if lp.HasField(p)]


def test_flags_are_parsed():
    assert SourceOverride.parse("data=/d/x=y_lmdb") == SourceOverride("data", None, "/d/x=y_lmdb")  # up to the 1st =
    assert SourceOverride.parse("mnist@test=db") == SourceOverride("mnist", pb.TEST, "db")
    assert str(SourceOverride.parse("mnist@TRAIN=db")) == "--source mnist@TRAIN=db"
    for bad in ("data", "=db", "data=", "mnist@VAL=db"):
        with pytest.raises(SlimError, match=r"is not LAYER=PATH or LAYER@PHASE=PATH \(PHASE is TRAIN or TEST\)"):
            SourceOverride.parse(bad)
    with pytest.raises(SlimError, match="--source a=x and --source a=y both set the source of layer 'a'; give it"):
        parse_source_overrides(["a=x", "b=z", "a=y"])


def test_phases_come_from_the_rules():
    net = parse_net(LENET)
    assert [sorted(layer_phases(lp)) for lp in net.layer[:4]] == [[pb.TRAIN], [pb.TEST], [pb.TRAIN],
                                                                  [pb.TRAIN, pb.TEST]]
    staged = pb.LayerParameter(name="x")
    staged.include.add(phase=pb.TEST)
    staged.include.add(stage=["deploy"])  # a rule without a phase: any phase
    assert layer_phases(staged) == {pb.TRAIN, pb.TEST}


def test_override_sets_the_named_layer_in_a_copy():
    net = parse_net(LENET)
    out = override_sources(net, ["mnist@TRAIN=/data/train_lmdb", "mnist@TEST=/data/test_lmdb", "extra=other.txt"],
                           where="lenet.prototxt")
    assert sources(out) == [("mnist", "/data/train_lmdb"), ("mnist", "/data/test_lmdb"), ("extra", "other.txt")]
    assert sources(net)[0] == ("mnist", "examples/mnist/mnist_train_lmdb")  # the parsed net is left as it was
    # With one layer of that name, no phase is needed; with one in each phase it is.
    assert sources(override_sources(net, ["extra=b.txt"]))[2] == ("extra", "b.txt")
    with pytest.raises(SlimError, match=r"lenet.prototxt: --source mnist=db is ambiguous: 2 layers are named 'mnist' "
                                        r"\(Data in TRAIN, Data in TEST\). Say which with --source mnist@TRAIN=db or "
                                        r"--source mnist@TEST=db"):
        override_sources(net, ["mnist=db"], where="lenet.prototxt")


def test_unknown_or_sourceless_layers_list_the_data_layers():
    net = parse_net(LENET)
    listing = ("'mnist' (Data, TRAIN, data_param.source 'examples/mnist/mnist_train_lmdb'), 'mnist' (Data, TEST, "
               "data_param.source 'examples/mnist/mnist_test_lmdb'), 'extra' (ImageData, TRAIN, "
               "image_data_param.source 'list.txt'), 'digits' (SlimData, TRAIN and TEST, no source), 'mem' "
               "(MemoryData, TRAIN and TEST, no source)")
    with pytest.raises(SlimError) as e:
        override_sources(net, ["minst=db"], where="lenet.prototxt")
    assert str(e.value) == ("lenet.prototxt: --source minst=db: there is no layer named 'minst'. The data layers "
                            f"are: {listing}.")
    with pytest.raises(SlimError, match="--source extra@TEST=x: there is no layer named 'extra' in phase TEST"):
        override_sources(net, ["extra@TEST=x"])
    for flag, what in (("mem=x", "a MemoryData layer"), ("ip=x", "an InnerProduct layer"),
                       ("digits=x", "the built-in DIGITS dataset")):
        with pytest.raises(SlimError, match=f"layer '{flag[:-2]}' is {what}, which reads no source. The net's data "
                                            f"layers are: 'mnist'"):
            override_sources(net, [flag])


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_solver_nets_are_handed_over_inline(tmp_path):
    net = write(tmp_path, "lenet.prototxt", LENET)
    solver = write(tmp_path, "solver.prototxt", f'net: "{net}"\ntest_iter: 1\ntest_interval: 5\nbase_lr: 0.1\n')
    out = override_solver_sources(read_solver(solver), solver, ["mnist@TRAIN=tr", "mnist@TEST=te"])
    assert not out.HasField("net") and sources(out.net_param)[:2] == [("mnist", "tr"), ("mnist", "te")]
    nets = solver_nets(out, solver)  # the generic net serves the train net and the test net, as before
    assert sources(nets.train.net)[:2] == sources(nets.tests[0].net)[:2] == [("mnist", "tr"), ("mnist", "te")]
    assert "examples/mnist/mnist_train_lmdb" in (tmp_path / "lenet.prototxt").read_text()  # the file is unchanged


def test_train_net_is_train_and_test_nets_are_test(tmp_path):
    one = LENET.replace('include { phase: TRAIN }', '').replace('''layer { name: "mnist" type: "Data" top: "data" \
top: "label" include { phase: TEST }
  data_param { source: "examples/mnist/mnist_test_lmdb" batch_size: 100 backend: LMDB } }
''', '')
    train = write(tmp_path, "train.prototxt", one)
    test = write(tmp_path, "test.prototxt", one)
    solver = write(tmp_path, "solver.prototxt", f'train_net: "{train}"\ntest_net: "{test}"\ntest_iter: 1\n'
                                                f'test_interval: 5\nbase_lr: 0.1\n')
    out = override_solver_sources(read_solver(solver), solver, ["mnist@TEST=te", "extra@TRAIN=list2.txt"])
    assert sources(out.train_net_param)[0] == ("mnist", "examples/mnist/mnist_train_lmdb")
    assert sources(out.test_net_param[0])[0] == ("mnist", "te")
    assert sources(out.train_net_param)[1] == ("extra", "list2.txt")
    assert not out.test_net and not out.HasField("train_net")
    with pytest.raises(SlimError, match=f"{solver}: --source nothing=x: there is no layer named 'nothing'"):
        override_solver_sources(read_solver(solver), solver, ["nothing=x"])
