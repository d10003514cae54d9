"""``caffe.proto.caffe_pb2``: slim's schema, which holds Caffe's messages with Caffe's field names and numbers.

Every message class (NetParameter, LayerParameter, SolverParameter, BlobProto, Datum, ...) and the Phase values
TRAIN and TEST are the classes of :mod:`slim.proto`, so messages made here are read and written by slim.io.
"""

from slim.proto import *  # noqa: F401,F403 - the schema's names are this module's names
from slim.proto import __all__  # noqa: F401
