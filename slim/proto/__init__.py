"""The message classes of proto/slim.proto (package ``caffe``), built at import from a shipped descriptor.

``slim.desc`` is the serialized FileDescriptorSet that ``python tools/gen_proto.py`` compiles from
proto/slim.proto. Building the classes from it at import, rather than shipping protoc-generated code, keeps
slim working on every protobuf runtime from 4.25 on: generated code requires a runtime as new as the protoc that
wrote it. The classes live in a private descriptor pool, so a ``caffe_pb2`` of another package can be imported
beside them.
"""

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

try:  # protobuf >= 4.22
    from google.protobuf.message_factory import GetMessageClass as _get_class
except ImportError:  # pragma: no cover - older runtimes
    from google.protobuf.message_factory import MessageFactory as _MessageFactory

    _get_class = _MessageFactory().GetPrototype

DESCRIPTOR_PATH = Path(__file__).with_name("slim.desc")

_files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_PATH.read_bytes())
POOL = descriptor_pool.DescriptorPool()
for _file in _files.file:
    POOL.Add(_file)
FILE = POOL.FindFileByName("slim.proto")

# Every top-level message becomes a module attribute: slim.proto.NetParameter, slim.proto.BlobProto, ...
for _name in FILE.message_types_by_name:
    globals()[_name] = _get_class(FILE.message_types_by_name[_name])
Phase = FILE.enum_types_by_name["Phase"]
TRAIN = Phase.values_by_name["TRAIN"].number
TEST = Phase.values_by_name["TEST"].number

__all__ = sorted(FILE.message_types_by_name) + ["Phase", "TRAIN", "TEST", "POOL", "FILE", "DESCRIPTOR_PATH"]
