"""Reading and writing Caffe's files: prototxt nets and solvers, .caffemodel, .solverstate, .binaryproto.

Text goes through protobuf's text format with strict checking and Caffe's upgrades (V0/V1 layers, input
headers, old BatchNorm params, solver_type); binary weights go through a streaming codec that never puts blob
data through Python element by element. Every write is atomic.
"""

from slim.io.atomic import atomic_write
from slim.io.binary import (CaffeModel, LayerBlobs, StreamedBlob, read_blobproto, read_caffemodel, read_solverstate,
                            write_blobproto, write_caffemodel, write_solverstate)
from slim.io.text import (UnknownFieldWarning, net_to_text, parse_net, parse_solver, read_net, read_solver,
                          solver_to_text, write_net, write_solver)
from slim.io.upgrade import upgrade_net, upgrade_solver

__all__ = [
    "atomic_write", "UnknownFieldWarning", "CaffeModel", "LayerBlobs", "StreamedBlob", "read_caffemodel",
    "write_caffemodel", "read_solverstate", "write_solverstate", "read_blobproto", "write_blobproto", "parse_net",
    "read_net", "write_net", "net_to_text", "parse_solver", "read_solver", "write_solver", "solver_to_text",
    "upgrade_net", "upgrade_solver",
]
