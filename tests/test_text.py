"""Prototxt reading and writing: real Caffe files, round trips, strictness, the tolerant mode, ceil_mode."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from slim import proto as pb
from slim.errors import ParseError
from slim.io.text import (UnknownFieldWarning, net_to_text, parse_net, parse_solver, read_net, read_solver,
                          solver_to_text, write_net, write_solver)

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"


def _testnets(kind):
    if not TESTNETS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"real Caffe files not found at {TESTNETS}"))]
    files = sorted(TESTNETS.glob("*.prototxt"))
    return [f for f in files if ("solver" in f.name) == (kind == "solver")]


def _testnet(name):
    path = TESTNETS / name
    if not path.is_file():
        pytest.skip(f"real Caffe file {path} not found")
    return path


def _parse_quietly(text, **kwargs):
    """parse_net, asserting that it warns nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse_net(text, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Real files


@pytest.mark.parametrize("path", _testnets("net"), ids=lambda p: getattr(p, "name", "none"))
def test_real_net_parses_and_round_trips(path):
    net = read_net(path)
    assert len(net.layer) > 0 and not net.layers and not net.input and not net.input_dim
    # text -> NetParameter -> text -> NetParameter keeps every field
    text = net_to_text(net)
    again = parse_net(text, upgrade=False)
    assert again == net
    assert net_to_text(again) == text
    # text -> binary -> text
    binary = pb.NetParameter.FromString(net.SerializeToString())
    assert binary == net and net_to_text(binary) == text


@pytest.mark.parametrize("path", _testnets("solver"), ids=lambda p: getattr(p, "name", "none"))
def test_real_solver_parses_and_round_trips(path):
    solver = read_solver(path)
    assert solver.net and solver.base_lr > 0
    assert not solver.HasField("solver_type")
    text = solver_to_text(solver)
    assert parse_solver(text) == solver
    assert pb.SolverParameter.FromString(solver.SerializeToString()) == solver


def test_real_solver_values():
    solver = read_solver(_testnet("examples__mnist__lenet_solver_adam.prototxt"))
    assert solver.type == "Adam" and solver.lr_policy == "fixed"
    assert solver.base_lr == np.float32(0.001) and solver.momentum2 == np.float32(0.999)
    assert list(solver.test_iter) == [100] and solver.max_iter == 10000
    assert solver.snapshot_prefix == "examples/mnist/lenet"  # set, and not a directory here: kept as written
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"  # never resolved against the solver's folder
    assert solver.solver_mode == pb.SolverParameter.GPU


def test_real_v1_net_upgrades_to_the_v2_file():
    # The same AlexNet deploy net in BVLC's V1 format (a66100181) and V2 format (HEAD): after the upgrade they
    # differ only in the Input layer's name ("input" from the upgrade, "data" in the hand-written V2 file).
    v1 = read_net(_testnet("v1__models__bvlc_alexnet__deploy.prototxt"))
    v2 = read_net(_testnet("models__bvlc_alexnet__deploy.prototxt"))
    assert v1.layer[0].name == "input" and v1.layer[0].type == "Input"
    assert list(v1.layer[0].input_param.shape[0].dim) == [10, 3, 227, 227]
    assert list(v1.layer[0].top) == ["data"]
    v1.layer[0].name = "data"
    assert v1 == v2
    conv1 = v1.layer[1]
    assert conv1.type == "Convolution"
    assert [(p.lr_mult, p.decay_mult) for p in conv1.param] == [(1, 1), (2, 0)]


def test_real_batchnorm_params_are_upgraded():
    net = read_net(_testnet("examples__cifar10__cifar10_full_sigmoid_train_test_bn.prototxt"))
    bns = [layer for layer in net.layer if layer.type == "BatchNorm"]
    assert len(bns) == 3
    for bn in bns:
        assert [(p.HasField("decay_mult"), p.lr_mult, p.decay_mult) for p in bn.param] == [(True, 0, 0)] * 3
    raw = read_net(_testnet("examples__cifar10__cifar10_full_sigmoid_train_test_bn.prototxt"), upgrade=False)
    raw_bn = next(layer for layer in raw.layer if layer.type == "BatchNorm")
    assert [p.HasField("decay_mult") for p in raw_bn.param] == [False] * 3


# ---------------------------------------------------------------------------------------------------------------
# Syntax Caffe accepts


CANONICAL = """
name: "n"
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  include { phase: TEST }
  convolution_param { num_output: 8 kernel_size: 3 kernel_size: 5 pad: 1 }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param { pool: AVE kernel_size: 2 }
}
"""

VARIANTS = """
# a comment line
name: 'n'  # trailing comment
layer: {
  name: 'conv1'; type: "Convolution", bottom: "data" top: 'conv1'
  include < phase: TEST >
  convolution_param: { num_output: 8 kernel_size: [3, 5] pad: 1 }
}
layer < name: "pool1" type: 'Pool' 'ing' bottom: "conv1" top: "pool1" pooling_param { pool: 1, kernel_size: 2; } >
"""


def test_syntax_variants_parse_like_the_canonical_form():
    assert _parse_quietly(VARIANTS) == _parse_quietly(CANONICAL)


def test_numbers_and_enums():
    net = _parse_quietly("layer { loss_weight: 1. loss_weight: .5 loss_weight: -2e-3 loss_weight: 7 "
                         "convolution_param { num_output: 0x10 } phase: TEST }")
    layer = net.layer[0]
    assert list(layer.loss_weight) == [1.0, 0.5, np.float32(-2e-3), 7.0]
    assert layer.convolution_param.num_output == 16 and layer.phase == pb.TEST


def test_floats_round_trip_exactly():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(3000) * 10.0 ** rng.integers(-44, 38, 3000)).astype(np.float32)  # denormals too
    special = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -0.0, 0.1, 1 / 3, 1e-5]
    values = np.concatenate([values, np.array(special, np.float32)])
    assert values.dtype == np.float32 and np.isfinite(values).all()
    net = pb.NetParameter()
    layer = net.layer.add(name="a")
    layer.blobs.add().data.extend(values.tolist())
    layer.loss_weight.extend(values[:100].tolist())
    again = parse_net(net_to_text(net), upgrade=False)
    assert again == net
    bits = np.array(again.layer[0].blobs[0].data, np.float32).view(np.uint32)
    assert np.array_equal(bits, values.view(np.uint32))  # bit for bit, -0.0 and denormals included
    assert "data: 0.1\n" in net_to_text(net) and "data: 1e-05\n" in net_to_text(net)


def test_layer_is_written_last():
    net = pb.NetParameter(name="n")
    net.layer.add(name="a", type="ReLU")
    net.input.append("data")
    net.input_dim.extend([1, 2, 3, 4])
    net.state.phase = pb.TRAIN
    net.force_backward = True
    text = net_to_text(net)
    assert text.index("layer {") > max(text.index("input_dim"), text.index("state"), text.index("force_backward"))
    assert parse_net(text, upgrade=False) == net


def test_write_and_read_net(tmp_path):
    net = _parse_quietly(CANONICAL)
    path = tmp_path / "n.prototxt"
    write_net(net, path)
    assert read_net(path) == net
    write_net(net, str(path))  # overwrite in place, by str path
    assert read_net(str(path)) == net
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.prototxt"]  # no temporary file left behind


def test_write_and_read_solver(tmp_path):
    solver = parse_solver('net: "a.prototxt" base_lr: 0.1 lr_policy: "multistep" stepvalue: 10 stepvalue: 20 '
                          'snapshot_prefix: "snap/x" sparsity { penalty: 1e-4 layer: "scale1" }')
    path = tmp_path / "s.prototxt"
    write_solver(solver, path)
    assert read_solver(path) == solver


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _position(text, needle):
    """1-based (line, column) of the first `needle` in `text`."""
    pos = text.index(needle)
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


@pytest.mark.parametrize("text, needle, words", [
    ('layer {\n  name: "a"\n  top: "b"\n', None, ['Expected "}"']),
    ('layer {\n  name "a"\n}\n', '"a"', ['Expected ":"']),
    ('layer {\n  name: "a\n}\n', '"a', ["quote"]),
    ('layer {\n  convolution_param { num_output: 1.5 }\n}\n', "1.5", ["integer"]),
    ('layer {\n  convolution_param { num_output: -1 }\n}\n', "-1", ["-1"]),
    ('layer {\n  pooling_param { pool: MIN }\n}\n', "MIN", ["MIN", "MAX, AVE, STOCHASTIC"]),
    ('name: "a"\nname: "b"\n', 'name: "b"', ["multiple", '"name"']),
    ('layer {\n  name: "x" }\n  }\n', "  }", ["got }"]),
])
def test_syntax_errors_name_file_line_and_column(text, needle, words):
    with pytest.raises(ParseError) as info:
        parse_net(text, "nets/bad.prototxt")
    message = str(info.value)
    match = re.match(r"nets/bad\.prototxt:(\d+):(\d+): ", message)
    assert match, message
    if needle is not None:
        line, col = (int(g) for g in match.groups())
        want_line, want_col = _position(text, needle)
        assert line == want_line
        assert abs(col - want_col) <= len(needle) + 1  # protobuf points at or just after the bad token
    for word in words:
        assert word in message


def test_syntax_error_names_the_enclosing_layer():
    text = 'layer {\n  name: "conv1"\n  convolution_param { num_output: 1.5 }\n}\n'
    with pytest.raises(ParseError, match=r'x\.prototxt:3:\d+: in layer "conv1": '):
        parse_net(text, "x.prototxt")


def test_unknown_field_strict():
    text = ('name: "x"\n'
            'layer {\n'
            '  name: "conv1"\n'
            '  type: "Convolution"\n'
            '  bn_param { scale_filler { type: "constant" } }\n'
            '}\n'
            'layer { name: "pool1" pooling_param { pool: MAX new_dim: 3 } }\n')
    with pytest.raises(ParseError) as info:
        parse_net(text, "nets/x.prototxt")
    message = str(info.value)
    assert message.startswith('nets/x.prototxt:5:3: layer "conv1" (LayerParameter) has no field named "bn_param".')
    assert "--allow-unknown-fields" in message and "allow_unknown_fields=True" in message
    assert '"new_dim" (line 7)' in message  # the others are counted too


def test_unknown_field_strict_names_later_layer_name_and_nesting():
    # The layer's name comes after the unknown field; the message still names the layer.
    text = 'layer {\n  pooling_param {\n    pool: MAX\n    foo: "bar"\n  }\n  name: "pool9"\n}\n'
    with pytest.raises(ParseError, match=r'^x:4:5: pooling_param of layer "pool9" \(PoolingParameter\) has no '
                                         r'field named "foo"\.'):
        parse_net(text, "x")


def test_unknown_field_at_top_level_and_in_solver():
    with pytest.raises(ParseError, match=r'^n:1:11: the top level \(NetParameter\) has no field named "bogus"'):
        parse_net('name: "a" bogus: 1', "n")
    with pytest.raises(ParseError, match=r'^s:2:1: the top level \(SolverParameter\) has no field named "iter_sz"'):
        parse_solver('base_lr: 0.1\niter_sz: 2\n', "s")
    with pytest.raises(ParseError, match=r'train_state \(NetState\) has no field named "levl"'):
        parse_solver('train_state { levl: 2 }', "s")


def test_misspelt_field_gets_a_suggestion():
    with pytest.raises(ParseError, match='Did you mean "num_output"'):
        parse_net('layer { convolution_param { num_ouput: 3 } }')


def test_misplaced_transform_param_is_a_clean_error():
    # BVLC's old examples/mnist/mnist_autoencoder.prototxt nests transform_param inside data_param, which the
    # current schema rejects.
    text = ('layer {\n  name: "data"\n  type: "Data"\n  top: "data"\n  data_param {\n'
            '    source: "examples/mnist/mnist_train_lmdb"\n    batch_size: 100\n'
            '    transform_param {\n      scale: 0.0039215684\n    }\n    backend: LMDB\n  }\n}\n')
    with pytest.raises(ParseError) as info:
        parse_net(text, "mnist_autoencoder.prototxt")
    message = str(info.value)
    assert message.startswith('mnist_autoencoder.prototxt:8:5: data_param of layer "data" (DataParameter) has no '
                              'field named "transform_param".')
    assert "move it out of data_param" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no protobuf traceback attached


def test_tolerant_mode_skips_unknown_fields_with_one_warning():
    text = ('name: "x"\n'
            'layer {\n'
            '  name: "conv1"\n'
            '  bn_param { scale_filler { type: "constant" value: 1 } nested { deep: [1, 2] } }\n'
            '  type: "Convolution"\n'
            '  mil_param: "s", top: "conv1"\n'
            '  convolution_param { num_output: 4 new_dim: [3, 4]; bicubic: true kernel_size: 3 }\n'
            '}\n'
            'layer < name: "l2" norm_param < across_spatial: false > type: "ReLU" >\n'
            'future_net_field: -inf\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = parse_net(text, "fork.prototxt", allow_unknown_fields=True)
    assert len(caught) == 1 and caught[0].category is UnknownFieldWarning
    message = str(caught[0].message)
    for line, name in [(4, "bn_param"), (6, "mil_param"), (7, "new_dim"), (7, "bicubic"), (9, "norm_param"),
                       (10, "future_net_field")]:
        assert f'line {line}: "{name}"' in message
    assert message.startswith("fork.prototxt: skipped 6 field(s)")
    expected = _parse_quietly('name: "x" layer { name: "conv1" type: "Convolution" top: "conv1" '
                              'convolution_param { num_output: 4 kernel_size: 3 } } layer { name: "l2" type: "ReLU" }')
    assert net == expected


def test_tolerant_mode_still_reports_syntax_errors_at_the_right_column():
    text = 'layer {\n  bn_param { a: 1 }  name: "x" convolution_param { num_output: 1.5 }\n}\n'
    with pytest.raises(ParseError) as info:
        parse_net(text, "f", allow_unknown_fields=True)
    line, col = _position(text, "1.5")
    assert str(info.value).startswith(f"f:{line}:{col}: ") or str(info.value).startswith(f"f:{line}:{col + 3}: ")


def test_tolerant_mode_does_not_skip_malformed_values():
    # protobuf's own skipping needs "name: value" or "name { ... }"; so does slim's.
    with pytest.raises(ParseError, match=r'^f:1:9: .*no field named "foo"\. Its value could not be skipped'):
        parse_net('layer { foo 3 name: "a" }', "f", allow_unknown_fields=True)


def test_tolerant_mode_without_unknown_fields_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_net(CANONICAL, allow_unknown_fields=True) == parse_net(CANONICAL)


def test_unknown_enum_value_is_an_error_even_when_tolerant():
    with pytest.raises(ParseError, match="has no value named MIN"):
        parse_net("layer { pooling_param { pool: MIN } }", allow_unknown_fields=True)


def test_required_fields_are_checked():
    with pytest.raises(ParseError, match=r'layer\[0\]\.clip_param\.max \(layer "clip"\)'):
        parse_net('layer { name: "clip" type: "Clip" clip_param { min: 0 } }')


# ---------------------------------------------------------------------------------------------------------------
# OpenCV's ceil_mode


@pytest.mark.parametrize("value, mode", [("false", "FLOOR"), ("true", "CEIL"), ("0", "FLOOR"), ("1", "CEIL"),
                                         ("False", "FLOOR"), ("t", "CEIL")])
def test_ceil_mode_is_read_as_round_mode(value, mode):
    text = f'layer {{ name: "p" type: "Pooling" pooling_param {{ pool: MAX ceil_mode: {value} kernel_size: 3 }} }}'
    net = _parse_quietly(text)  # strict mode, and no warning
    pooling = net.layer[0].pooling_param
    assert pooling.HasField("round_mode") and pooling.round_mode == getattr(pb.PoolingParameter, mode)
    assert pooling.kernel_size == 3 and pooling.pool == pb.PoolingParameter.MAX


def test_ceil_mode_in_many_layers_and_list_syntax():
    text = ('layers [{ name: "a" type: POOLING pooling_param { ceil_mode: false } },'
            ' { name: "b" type: POOLING pooling_param { } }, { name: "c" type: POOLING pooling_param: '
            '{ ceil_mode: true, } }]')
    net = _parse_quietly(text)
    modes = [(layer.pooling_param.HasField("round_mode"), layer.pooling_param.round_mode) for layer in net.layer]
    assert modes == [(True, pb.PoolingParameter.FLOOR), (False, pb.PoolingParameter.CEIL),
                     (True, pb.PoolingParameter.CEIL)]


def test_ceil_mode_in_strings_and_comments_is_left_alone():
    text = ('layer {\n  name: "ceil_mode: false"  # ceil_mode: false\n  type: "Pooling"\n'
            '  pooling_param { pool: MAX }  # pooling_param { ceil_mode: false }\n}\n')
    net = _parse_quietly(text)
    assert net.layer[0].name == "ceil_mode: false"
    assert not net.layer[0].pooling_param.HasField("round_mode")


def test_ceil_mode_outside_pooling_param_is_unknown():
    with pytest.raises(ParseError, match='has no field named "ceil_mode"'):
        parse_net('layer { convolution_param { ceil_mode: false } }')


def test_ceil_mode_conflicts_and_bad_values():
    with pytest.raises(ParseError, match=r"^x:1:\d+: .*ceil_mode: false and round_mode: CEIL"):
        parse_net('layer { pooling_param { round_mode: CEIL ceil_mode: false } }', "x")
    assert _parse_quietly('layer { pooling_param { round_mode: FLOOR ceil_mode: false } }') \
        .layer[0].pooling_param.round_mode == pb.PoolingParameter.FLOOR
    with pytest.raises(ParseError, match=r'^x:1:25: pooling_param of layer "p" .*found "maybe"'):
        parse_net('layer { pooling_param { ceil_mode: maybe } name: "p" }', "x")


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.prototxt"
    with pytest.raises(ParseError, match=re.escape(str(path)) + ": no such file"):
        read_net(path)
    with pytest.raises(ParseError, match="no such file"):
        read_solver(str(path))


def test_directory(tmp_path):
    with pytest.raises(ParseError, match=re.escape(str(tmp_path)) + " is a directory"):
        read_net(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.prototxt"
    path.write_bytes('name: "a"\nlayer { name: "caf\u00e9" }\n'.encode("latin-1"))
    with pytest.raises(ParseError, match=re.escape(str(path)) + r":2: is not UTF-8 text \(byte 0xe9"):
        read_net(path)


def test_utf8_and_byte_order_mark(tmp_path):
    path = tmp_path / "u.prototxt"
    path.write_bytes('\ufefflayer { name: "caf\u00e9" }\n'.encode("utf-8"))
    net = read_net(path)
    assert net.layer[0].name == "caf\u00e9"
    write_net(net, path)
    assert read_net(path) == net


def test_errors_from_files_name_the_path(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer {\n  name: "a"\n  bn_param { }\n}\n')
    with pytest.raises(ParseError, match=re.escape(f"{path}:3:3: ")):
        read_net(path)


def test_opencv_dialect_writes_round_mode_as_opencv_reads_it():
    net = parse_net("""
layer { name: "ceil" type: "Pooling" bottom: "x" top: "a" pooling_param { pool: MAX kernel_size: 3 round_mode: CEIL } }
layer { name: "floor" type: "Pooling" bottom: "x" top: "b"
        pooling_param { kernel_size: 2 stride: 2 round_mode: FLOOR } }
layer { name: "plain" type: "Pooling" bottom: "x" top: "c" pooling_param { pool: AVE kernel_size: 2 } }
""")
    text = net_to_text(net, opencv=True)
    assert "round_mode" not in text and text.count("ceil_mode: false") == 1
    assert re.search(r'name: "floor".*?pooling_param \{\n    kernel_size: 2\n    stride: 2\n    ceil_mode: false\n  \}',
                     text, re.S)
    expected = pb.NetParameter()
    expected.CopyFrom(net)
    expected.layer[0].pooling_param.ClearField("round_mode")  # CEIL is the default: left out
    assert parse_net(text) == expected
    assert net_to_text(net) == net_to_text(parse_net(net_to_text(net)))  # the BVLC spelling is untouched
    assert "round_mode: FLOOR" in net_to_text(net)


# ----------------------------------------------------------------------------------------------------------------
# a file of the wrong kind


def test_a_solver_read_as_a_net_and_a_net_read_as_a_solver_say_so():
    # The first hour of a real user: swapping the net and the solver got advice to pass --allow-unknown-fields, and
    # `slim summary --allow-unknown-fields SOLVER` printed an empty net and exited 0.
    solver = 'net: "n.prototxt"\nbase_lr: 0.01\nmax_iter: 100\nlr_policy: "fixed"\nsnapshot_prefix: "s"\n'
    net = 'name: "n"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
    for tolerant in (False, True):
        with pytest.raises(ParseError) as info:
            parse_net(solver, "s.prototxt", allow_unknown_fields=tolerant)
        message = str(info.value)
        assert message.startswith("s.prototxt is a solver prototxt, not a net") and "base_lr" in message
        assert "--solver" in message and "allow-unknown-fields" not in message
    with pytest.raises(ParseError, match=r"n.prototxt is a net prototxt, not a solver \(it sets name, layer"):
        parse_solver(net, "n.prototxt")


def test_layer_fields_at_the_top_level_point_at_a_missing_layer_brace():
    text = ('name: "n"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }\n'
            '  name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }\n')
    with pytest.raises(ParseError, match=r"layer fields at its top level \(type, bottom, top, inner_product_param\)"
                                         r": a `layer \{` is missing"):
        parse_net(text, "n.prototxt")
    # A genuinely unknown fork field still gets the fork advice.
    with pytest.raises(ParseError, match="allow-unknown-fields"):
        parse_net('name: "n"\nsome_fork_field: 3\n', "n.prototxt")


def test_summary_of_a_solver_is_an_error_not_an_empty_net(tmp_path, capsys):
    from slim.cli import main
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "n.prototxt"\nbase_lr: 0.01\nmax_iter: 100\n')
    assert main(["summary", str(path), "--allow-unknown-fields"]) == 2
    assert "is a solver prototxt, not a net" in capsys.readouterr().err
