"""The schema: the shipped descriptor matches proto/slim.proto, and wire facts match BVLC Caffe."""

import importlib.util
from pathlib import Path

import pytest

from slim import proto as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_descriptor_is_not_stale():
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    assert gen_proto.compile_descriptor() == (ROOT / "slim" / "proto" / "slim.desc").read_bytes(), \
        "slim/proto/slim.desc is stale: run python tools/gen_proto.py"


def _field(message, name):
    return message.DESCRIPTOR.fields_by_name[name]


@pytest.mark.parametrize("message,name,number", [
    (pb.NetParameter, "layer", 100), (pb.NetParameter, "layers", 2), (pb.NetParameter, "input_dim", 4),
    (pb.LayerParameter, "convolution_param", 106), (pb.LayerParameter, "batch_norm_param", 139),
    (pb.LayerParameter, "clip_param", 148), (pb.V1LayerParameter, "blobs", 6), (pb.BlobProto, "data", 5),
    (pb.BlobShape, "dim", 1), (pb.SolverParameter, "type", 40), (pb.SolverState, "history", 3),
    (pb.PoolingParameter, "round_mode", 13), (pb.V0LayerParameter, "blobs", 50),
])
def test_field_numbers(message, name, number):
    assert _field(message, name).number == number


def test_packed_fields_exactly_as_caffe():
    found = set()
    for name in pb.FILE.message_types_by_name:
        desc = pb.FILE.message_types_by_name[name]
        for f in desc.fields:
            repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
            packed = f.is_packed if hasattr(f, "is_packed") else f.GetOptions().packed
            if repeated and packed:
                found.add(f"{name}.{f.name}")
    assert found == {"BlobShape.dim", "BlobProto.data", "BlobProto.diff", "BlobProto.double_data",
                      "BlobProto.double_diff"}


def test_defaults_follow_caffe():
    assert pb.NetState().phase == pb.TEST
    assert pb.ParamSpec().lr_mult == 1 and pb.ParamSpec().decay_mult == 1
    assert pb.FillerParameter().type == "constant" and pb.FillerParameter().value == 0
    assert pb.BatchNormParameter().moving_average_fraction == pytest.approx(0.999)
    assert pb.BatchNormParameter().eps == pytest.approx(1e-5)
    assert pb.SolverParameter().type == "SGD" and pb.SolverParameter().random_seed == -1
    assert pb.SolverParameter().lr_policy == "" and pb.SolverParameter().momentum == 0
    assert pb.ConvolutionParameter().bias_term and pb.ConvolutionParameter().group == 1
    assert pb.PoolingParameter().round_mode == pb.PoolingParameter.CEIL


def test_extensions_are_numbered_from_1000():
    caffe_messages = set(pb.FILE.message_types_by_name) - {n for n in pb.FILE.message_types_by_name
                                                           if n.startswith("Slim")}
    extensions = [(n, f.name, f.number) for n in caffe_messages for f in pb.FILE.message_types_by_name[n].fields
                  if f.message_type is not None and f.message_type.name.startswith("Slim")]
    assert extensions and all(num >= 1000 for _, _, num in extensions)
    assert _field(pb.TransformationParameter, "pad").number >= 1000


def test_private_pool_allows_another_caffe_schema():
    from google.protobuf import descriptor_pool
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("caffe.NetParameter")
