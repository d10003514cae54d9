"""Channel groups from the graph alone: ties, offsets, groups of convolutions, barriers, pins, roles."""

from pathlib import Path

import numpy as np
import pytest

from slim.deploy import make_deploy
from slim.errors import PruneError
from slim.graph import build_graph
from slim.io import parse_net, read_net
from slim.layers.base import ChannelRole
from slim.prune import analyze

TESTNETS = Path(__file__).resolve().parents[2] / "shared" / "caffe" / "testnets"
NETS = Path(__file__).resolve().parents[1] / "nets"
KINDS = {"produces", "passthrough", "ties", "concat", "slice", "flatten", "sink", "barrier"}


def graph_of(text):
    return build_graph(parse_net(text, "<test>"))


def inp(c=3, h=8, w=8):
    return f'layer {{ name: "input" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: {c} dim: {h} ' \
           f'dim: {w} }} }} }}\n'


def conv(name, bottom, n, k=3, group=1, stride=1, top=None):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {(k - 1) // 2} group: {group} '
            f'stride: {stride} }} }}\n')


def layer(name, type_, bottoms, tops, extra=""):
    b = " ".join(f'bottom: "{x}"' for x in bottoms)
    t = " ".join(f'top: "{x}"' for x in tops)
    return f'layer {{ name: "{name}" type: "{type_}" {b} {t} {extra} }}\n'


def ip(name, bottom, n):
    return layer(name, "InnerProduct", [bottom], [name], f"inner_product_param {{ num_output: {n} }}")


def ch(a, blob):
    return a.blob_channels[blob]


def test_eltwise_ties_both_branches_into_one_group():
    a = analyze(graph_of(inp() + conv("c1", "data", 4) + conv("c2", "c1", 4) + conv("c3", "c1", 5)
                         + layer("sum", "Eltwise", ["c2", "c1"], ["sum"]) + ip("fc", "sum", 2)))
    np.testing.assert_array_equal(ch(a, "c1"), ch(a, "c2"))
    np.testing.assert_array_equal(ch(a, "sum"), ch(a, "c1"))
    assert a.group_of[ch(a, "c1")[0]] != a.group_of[ch(a, "c3")[0]]
    group = a.groups[a.group_of[ch(a, "c1")[0]]]
    assert set(group.producers) == {"c1", "c2"} and group.size == 4 and group.prunable == 4
    assert "tied by" in str(group) and "sum (Eltwise)" in str(group)
    # c3 is a net output: pinned, with the reason
    c3 = a.groups[a.group_of[ch(a, "c3")[0]]]
    assert c3.prunable == 0 and "net output 'c3'" in str(c3)


def test_concat_places_groups_at_offsets_and_slice_cuts_them():
    a = analyze(graph_of(inp() + conv("a", "data", 3) + conv("b", "data", 2)
                         + layer("cat", "Concat", ["a", "b"], ["cat"])
                         + layer("sl", "Slice", ["cat"], ["s1", "s2"], "slice_param { slice_point: 2 }")
                         + layer("cat2", "Concat", ["s2", "s1"], ["cat2"]) + conv("r", "cat2", 4)
                         + ip("fc", "r", 2)))
    cat = ch(a, "cat")
    np.testing.assert_array_equal(cat[:3], ch(a, "a"))
    np.testing.assert_array_equal(cat[3:], ch(a, "b"))
    np.testing.assert_array_equal(ch(a, "cat2"), np.concatenate([cat[2:], cat[:2]]))
    reader = [s for s in a.slots_of("r") if s.side == "input"][0]
    assert len(reader.channels) == 5
    groups = a.group_of[reader.channels]
    assert list(groups) == [a.group_of[ch(a, "a")[0]]] + [a.group_of[ch(a, "b")[0]]] * 2 + \
        [a.group_of[ch(a, "a")[0]]] * 2


def test_depthwise_output_is_its_input_and_grouped_keeps_equal_counts():
    a = analyze(graph_of(inp(4) + conv("c1", "data", 8) + conv("dw", "c1", 8, group=8)
                         + conv("dwm", "dw", 16, group=8) + conv("g", "dwm", 6, group=2) + ip("fc", "g", 2)))
    np.testing.assert_array_equal(ch(a, "dw"), ch(a, "c1"))
    np.testing.assert_array_equal(ch(a, "dwm"), np.repeat(ch(a, "c1"), 2))     # multiplier 2: two per input
    assert a.producers["dw"].mode == "depthwise" and a.producers["g"].mode == "grouped"
    # A grouped convolution ties nothing: its groups only keep as many channels each.
    g = ch(a, "g")
    assert len(set(g.tolist())) == 6
    constraints = {(c.layer, c.side): c for c in a.equal_counts}
    assert set(constraints) == {("g", "input"), ("g", "output")}
    np.testing.assert_array_equal(constraints["g", "input"].channels, ch(a, "dwm"))
    np.testing.assert_array_equal(constraints["g", "output"].channels, g)
    assert constraints["g", "output"].parts == 2
    weight = [s for s in a.slots_of("g") if s.side == "input"][0]
    assert weight.groups == 2 and len(weight.channels) == 16       # group gi's rows read channels[gi * 8 + j]
    assert "grouped by      g (Convolution) [as many kept in each of its 2 groups]" in a.explain()


def test_flatten_and_innerproduct_columns_follow_c_h_w_order():
    a = analyze(graph_of(inp(3, 2, 3) + conv("c", "data", 4) + layer("flat", "Flatten", ["c"], ["flat"])
                         + ip("fc", "flat", 2) + ip("fc2", "c", 2)))
    np.testing.assert_array_equal(ch(a, "flat"), np.repeat(ch(a, "c"), 6))
    cols = [s for s in a.slots_of("fc2") if s.side == "input"][0]
    np.testing.assert_array_equal(cols.channels, np.repeat(ch(a, "c"), 6))
    assert cols.axis == 1 and cols.blob == 0


def test_option_a_shortcut_holds_each_channel_twice():
    a = analyze(graph_of(inp() + conv("c1", "data", 4)
                         + layer("sub", "Pooling", ["c1"], ["sub"],
                                 "pooling_param { pool: MAX kernel_size: 1 stride: 2 round_mode: FLOOR }")
                         + layer("zeros", "Power", ["sub"], ["zeros"], "power_param { scale: 0 }")
                         + layer("short", "Concat", ["sub", "zeros"], ["short"]) + conv("c2", "c1", 8, stride=2)
                         + layer("sum", "Eltwise", ["c2", "short"], ["sum"]) + ip("fc", "sum", 2)))
    c1 = ch(a, "c1")
    np.testing.assert_array_equal(ch(a, "sum"), np.concatenate([c1, c1]))
    assert a.group_of[c1[0]] == a.group_of[ch(a, "c2")[0]]
    assert a.groups[a.group_of[c1[0]]].size == 4


@pytest.mark.parametrize("extra, pinned", [
    (layer("sm", "Softmax", ["c"], ["sm"]), True),
    (layer("lrn", "LRN", ["c"], ["lrn"], "lrn_param { local_size: 3 }"), True),
    (layer("lrn", "LRN", ["c"], ["lrn"], "lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL }") + ip("f", "lrn", 2),
     False),
    (layer("rs", "Reshape", ["c"], ["rs"], "reshape_param { shape { dim: 0 dim: 4 dim: -1 } }") + ip("f", "rs", 2),
     True),
    (layer("rs", "Reshape", ["c"], ["rs"], "reshape_param { shape { dim: 0 dim: -1 } }") + ip("f", "rs", 2), False),
    (layer("sig", "Sigmoid", ["c"], ["sig"]) + conv("d", "sig", 2) + ip("f", "d", 2), True),
    (layer("sig", "Sigmoid", ["c"], ["sig"]) + conv("d", "sig", 2, k=1) + ip("f", "d", 2), False),
    (layer("sig", "Sigmoid", ["c"], ["sig"]) + layer("p", "Pooling", ["sig"], ["p"],
                                                     "pooling_param { pool: AVE kernel_size: 3 pad: 1 }")
     + conv("d", "p", 2, k=1) + ip("f", "d", 2), True),
    (layer("sil", "Silence", ["c"], []) + conv("d", "c", 2) + ip("f", "d", 2), False),
])
def test_barriers_and_inexact_paths_pin_the_channels_they_read(extra, pinned):
    a = analyze(graph_of(inp() + conv("c", "data", 4) + extra))
    assert bool(a.pinned[ch(a, "c")].all()) is pinned
    if pinned:
        assert a.groups[a.group_of[ch(a, "c")[0]]].pinned


def test_sigmoid_before_an_unpadded_reader_is_recorded_for_folding():
    a = analyze(graph_of(inp() + conv("c", "data", 4) + layer("sig", "Sigmoid", ["c"], ["c"])
                         + conv("d", "c", 2, k=1) + ip("f", "d", 2)))
    assert ("d", "c@1") in a.constant_at and a.constant_at[("d", "c@1")].all()


def test_protect_pins_and_an_unknown_layer_is_an_error():
    text = inp() + conv("c1", "data", 4) + conv("c2", "c1", 4) + ip("fc", "c2", 2)
    a = analyze(graph_of(text), protect=["c1"])
    assert a.pinned[ch(a, "c1")].all() and not a.pinned[ch(a, "c2")].any()
    assert "protected (--protect c1)" in str(a.groups[a.group_of[ch(a, "c1")[0]]])
    with pytest.raises(PruneError, match="--protect names layer 'c9'.*Use the layer names"):
        analyze(graph_of(text), protect=["c9"])


def test_shared_parameters_pin_their_channels():
    text = inp() + conv("c1", "data", 4) + """
layer { name: "a" type: "Convolution" bottom: "c1" top: "a" param { name: "w" }
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "b" type: "Convolution" bottom: "c1" top: "b" param { name: "w" }
        convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
""" + layer("sum", "Eltwise", ["a", "b"], ["sum"]) + ip("fc", "sum", 2)
    a = analyze(graph_of(text))
    assert a.pinned[ch(a, "a")].all() and a.pinned[ch(a, "c1")].all()
    assert "shares its parameters" in a.groups[a.group_of[ch(a, "a")[0]]].pinned[0]


def test_elementwise_roles_probe_f_of_zero():
    a = graph_of(inp() + conv("c", "data", 4) + layer("r", "ReLU", ["c"], ["r"]) + layer("s", "Sigmoid", ["r"], ["s"])
                 + layer("p0", "Power", ["s"], ["p0"], "power_param { scale: 0 }")
                 + layer("p1", "Power", ["p0"], ["p1"], "power_param { shift: 1 }")
                 + layer("t", "TanH", ["p1"], ["t"]))
    zp = {n.name: n.layer.channel_role().zero_preserving for n in a.layers[2:]}
    assert zp == {"r": True, "s": False, "p0": True, "p1": False, "t": True}


def _all_graphs():
    graphs = [build_graph(read_net(p), "TEST") for p in sorted(NETS.glob("*.prototxt"))]
    if TESTNETS.is_dir():
        for p in sorted(TESTNETS.glob("*.prototxt")):
            if "solver" in p.name:
                continue
            net = read_net(p)
            if any(layer.type == "Data" for layer in net.layer):  # its LMDB is not here: feed the deploy form
                net = make_deploy(net, input_shapes={"data": (1, 28, 28) if "mnist" in p.name else (3, 32, 32)})
            graphs.append(build_graph(net, "TEST"))
    return graphs


def test_every_layer_of_every_known_net_declares_a_valid_role():
    graphs = _all_graphs()
    if not graphs:
        pytest.skip("neither nets/ nor ../shared/caffe/testnets/ is present")
    seen = set()
    for graph in graphs:
        for node in graph.layers:
            role = node.layer.channel_role()
            assert isinstance(role, ChannelRole) and role.kind in KINDS, (node.name, role)
            for blob, axis in role.channel_blobs + role.input_blobs:
                assert blob < len(node.blob_shapes) and axis < len(node.blob_shapes[blob]), (node.name, role)
            seen.add((node.type, role.kind))
        analyze(graph)
    assert ("Convolution", "produces") in seen and ("BatchNorm", "passthrough") in seen


def test_real_caffe_alexnet_pins_lrn_inputs_and_ties_its_grouped_convolutions():
    path = TESTNETS / "models__bvlc_alexnet__deploy.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared Caffe test nets are not beside this checkout)")
    a = analyze(build_graph(read_net(path)))
    assert a.pinned[ch(a, "conv1")].all() and a.pinned[ch(a, "conv2")].all()    # LRN across channels follows
    assert a.producers["conv2"].mode == "grouped" and not a.pinned[ch(a, "conv3")].any()
    conv4 = ch(a, "conv4")                                                          # conv5 has group 2
    assert len(set(ch(a, "conv3").tolist())) == 384                                 # conv4 (group 2) ties nothing
    assert {(c.layer, c.side) for c in a.equal_counts} >= {("conv4", "input"), ("conv5", "input"), ("conv5", "output")}
    assert not a.pinned[conv4].any()


def test_real_caffe_sigmoid_net_prunes_only_where_exact():
    path = TESTNETS / "examples__cifar10__cifar10_full_sigmoid_train_test_bn.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared Caffe test nets are not beside this checkout)")
    deploy = make_deploy(read_net(path), input_shapes={"data": (3, 32, 32)})
    a = analyze(build_graph(deploy))
    # conv1 and conv2 reach a padded convolution through a Sigmoid: pinned; conv3 reaches ip1: folded.
    assert a.pinned[ch(a, "conv1")].all() and a.pinned[ch(a, "conv2")].all()
    assert not a.pinned[ch(a, "conv3")].any()
    assert "Sigmoid" in a.groups[a.group_of[ch(a, "conv1")[0]]].pinned[0]
