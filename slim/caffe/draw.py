"""pycaffe's ``caffe.draw``: a net's graph in Graphviz, layers as boxes and blobs as octagons.

The DOT text is made here (:func:`net_to_dot`, no dependency); drawing it needs the optional ``pydot`` or
``graphviz`` package and Graphviz's ``dot`` program. ``get_pydot_graph`` needs pydot itself.
"""

from __future__ import annotations

import os
from typing import List, Optional

from slim import proto as caffe_pb2
from slim.errors import SlimError
from slim.io.atomic import atomic_write

__all__ = ["net_to_dot", "get_pydot_graph", "draw_net", "draw_net_to_file"]

_LAYER_STYLE = 'shape=record, style=filled, fillcolor="#6495ED"'
_BLOB_STYLE = 'shape=octagon, style=filled, fillcolor="#E0E0E0"'


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _layer_label(layer, separator: str) -> str:
    parts = [layer.name, f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        cp = layer.convolution_param
        kernel = cp.kernel_size[0] if cp.kernel_size else cp.kernel_h
        stride = cp.stride[0] if cp.stride else (cp.stride_h or 1)
        pad = cp.pad[0] if cp.pad else cp.pad_h
        parts.append(f"kernel size: {kernel}{separator}stride: {stride}{separator}pad: {pad}")
    elif layer.type == "Pooling":
        pp = layer.pooling_param
        kind = caffe_pb2.PoolingParameter.PoolMethod.Name(pp.pool)
        parts.append(f"pool: {kind}{separator}kernel size: {pp.kernel_size or pp.kernel_h}{separator}"
                     f"stride: {pp.stride or pp.stride_h}{separator}pad: {pp.pad or pp.pad_h}")
    return separator.join(parts)


def _layers(net, phase: Optional[int]) -> List:
    if phase is None:
        return list(net.layer)
    from slim.graph import filter_net, make_state
    return list(filter_net(net, make_state(phase)).layer)


def net_to_dot(net, rankdir: str = "LR", label_edges: bool = True, phase: Optional[int] = None) -> str:
    """The DOT text of a NetParameter: one node per layer and per blob, edges bottom -> layer -> top.

    Args:
        net: the NetParameter (e.g. ``caffe.io``/``text_format`` read, or ``NetSpec.to_proto()``).
        rankdir: Graphviz's direction: "LR", "TB", "BT" or "RL".
        label_edges: label an edge from a layer to its top with the top's name.
        phase: caffe.TRAIN or caffe.TEST to draw only that phase's layers; None draws all.
    """
    if rankdir not in ("LR", "TB", "BT", "RL"):
        raise SlimError(f"caffe.draw: rankdir {rankdir!r} is not one of LR, TB, BT, RL.")
    lines = [f"digraph {_quote(net.name or 'net')} {{", f"  rankdir={rankdir};"]
    blobs = set()
    for i, layer in enumerate(_layers(net, phase)):
        node = f"layer{i}"
        lines.append(f"  {node} [label={_quote(_layer_label(layer, ' | '))}, {_LAYER_STYLE}];")
        for name in list(layer.bottom) + list(layer.top):
            if name not in blobs:
                blobs.add(name)
                lines.append(f"  {_quote('blob_' + name)} [label={_quote(name)}, {_BLOB_STYLE}];")
        for name in layer.bottom:
            lines.append(f"  {_quote('blob_' + name)} -> {node};")
        for name in layer.top:
            label = f" [label={_quote(name)}]" if label_edges else ""
            lines.append(f"  {node} -> {_quote('blob_' + name)}{label};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def get_pydot_graph(caffe_net, rankdir: str, label_edges: bool = True, phase: Optional[int] = None):
    """The net as a ``pydot.Dot`` (needs pydot)."""
    try:
        import pydot
    except ImportError:
        raise SlimError("caffe.draw.get_pydot_graph needs the optional pydot package; run `pip install slim[draw]` "
                        "(drawing also needs Graphviz's dot program), or use caffe.draw.net_to_dot for the "
                        "DOT text.") from None
    return pydot.graph_from_dot_data(net_to_dot(caffe_net, rankdir, label_edges, phase))[0]


def draw_net(caffe_net, rankdir: str, ext: str = "png", phase: Optional[int] = None) -> bytes:
    """The net drawn in format ``ext`` (png, pdf, svg, ...), through pydot or the graphviz package.

    Raises:
        SlimError: neither package is installed, or Graphviz's dot program failed (or is missing).
    """
    dot = net_to_dot(caffe_net, rankdir, True, phase)
    try:
        import pydot
    except ImportError:
        pydot = None
    try:
        if pydot is not None:
            return pydot.graph_from_dot_data(dot)[0].create(format=ext)
        try:
            import graphviz
        except ImportError:
            raise SlimError("caffe.draw needs the optional pydot or graphviz package to draw; run `pip install "
                            "slim[draw]` (and install Graphviz's dot program), or use caffe.draw.net_to_dot for the "
                            "DOT text.") from None
        return graphviz.Source(dot).pipe(format=ext)
    except SlimError:
        raise
    except Exception as e:  # noqa: BLE001 - the renderers raise their own types (dot missing, bad format)
        raise SlimError(f"caffe.draw: Graphviz could not draw the net as {ext!r} ({e}). Check that Graphviz's dot "
                        f"program is installed and that the format is one it knows.") from e


def draw_net_to_file(caffe_net, filename, rankdir: str = "LR", phase: Optional[int] = None) -> None:
    """Draw the net into ``filename``; the format is its extension (``net.png``, ``net.pdf``)."""
    ext = os.path.splitext(str(filename))[1].lstrip(".") or "png"
    data = draw_net(caffe_net, rankdir, ext, phase)
    with atomic_write(filename) as f:  # replaces, never follows, a link at the name
        f.write(data)
