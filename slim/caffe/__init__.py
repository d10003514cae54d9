"""pycaffe on slim: a ``caffe``-compatible module for scripts written against pycaffe.

    import slim.caffe as caffe          # or: python -m slim.caffe script.py (``import caffe`` then resolves here)
    caffe.set_mode_cpu()
    net = caffe.Net("deploy.prototxt", caffe.TEST, weights="w.caffemodel")
    net.blobs["data"].data[...] = batch
    prob = net.forward()["prob"]
    solver = caffe.SGDSolver("solver.prototxt"); solver.step(100)

A thin adapter with pycaffe's names over slim: ``caffe.Net`` runs a ``slim.Net`` (``net.slim_net``) layer by layer
over numpy views of its blobs, solvers drive ``slim.solver.Solver`` (so Caffe's update rules and slim's sparsity
penalty apply), ``caffe.proto.caffe_pb2`` is slim's schema and weights go through slim.io. Not supported, by design:
Python layers (slim never runs code named in a net file), multi-GPU NCCL objects (use ``slim train --gpus``),
Caffe's ``*_split_*`` blobs (fan-out is implicit).

``import caffe`` is left alone unless asked for: :func:`slim.caffe.alias.install_alias`, or running a script with
``python -m slim.caffe script.py``; neither shadows a real Caffe unless told to.
"""

from slim.caffe import io, net_spec, proto
from slim.caffe._mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from slim.caffe.classifier import Classifier
from slim.caffe.net import TEST, TRAIN, Layer, Net
from slim.caffe.net_spec import NetSpec, layers, params, to_proto
from slim.caffe.solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver, SGDSolver,
                               Solver, get_solver)

__version__ = "1.0.0"   # the pycaffe interface followed (BVLC Caffe 1.0)

__all__ = ["Net", "Layer", "TRAIN", "TEST", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver", "set_mode_cpu", "set_mode_gpu",
           "set_device", "set_random_seed", "layer_type_list", "NetSpec", "layers", "params", "to_proto", "io",
           "proto", "net_spec", "Classifier", "draw"]


def layer_type_list() -> list:
    """The layer types slim builds (Caffe's registry minus Python layers, which slim refuses)."""
    from slim.layers import registered_types
    return registered_types()


def __getattr__(name):
    if name == "draw":      # imported on first use, as ``import caffe.draw`` in pycaffe
        import importlib
        return importlib.import_module("slim.caffe.draw")
    raise AttributeError(f"module 'slim.caffe' has no attribute {name!r}")
