"""``caffe.proto``: the schema module ``caffe_pb2`` (slim's proto/slim.proto, package ``caffe``)."""

from slim.caffe.proto import caffe_pb2

__all__ = ["caffe_pb2"]
