"""slim: Caffe's workflow on PyTorch's engine, for channel-level model compression.

The public API, in the spirit of pycaffe::

    import slim
    net = slim.Net("deploy.prototxt", weights="w.caffemodel", phase="TEST")   # a torch.nn.Module
    out = net(data=x)                     # dict: output blob name -> tensor
    net.params["conv1"]                   # that layer's blobs as tensors, in Caffe's order
    net.save("out.caffemodel")            # weights as a .caffemodel that Caffe and OpenCV read

Names that need torch are imported on first use, so ``slim.graph`` and the file readers work without it; so are the
subpackages (``slim.solver``, ``slim.prune``, ``slim.flops``, ...), which ``dir(slim)`` lists.
"""

__version__ = "0.1.0"

_LAZY = {
    "Net": "slim.net",
    "read_net": "slim.io",
    "write_net": "slim.io",
    "read_solver": "slim.io",
    "read_caffemodel": "slim.io",
    "write_caffemodel": "slim.io",
    "NetGraph": "slim.graph",
    "build_graph": "slim.graph",
    "SlimError": "slim.errors",
}

#: The subpackages and modules the README names (``slim.solver.Solver``, ``slim.prune.prune_net``, ...): imported on
#: first use, so ``import slim`` stays cheap and torch-free.
_SUBMODULES = ("caffe", "cli", "data", "decompose", "demo", "deploy", "errors", "flops", "graph", "interop", "io",
               "layers", "net", "offline", "pipeline", "proto", "prune", "solver", "sources", "threads", "timing", "zoo")

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"slim.{name}")
    raise AttributeError(f"module 'slim' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
