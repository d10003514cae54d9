"""A net's shapes where its data is not on this machine: ``slim summary`` and ``slim calflop`` of a train/val net
whose LMDB, image list or dataset folder is elsewhere.

A data layer's top shape comes from its prototxt where the prototxt states it, and otherwise from the first record
or image header of its data (slim.data.sample_shape). For each data layer of the phase being built whose source is
absent here:

* where the prototxt states the shape (SlimData's standard datasets, ImageData's new_height/new_width, a Data
  layer's crop_size with colour assumed unless force_gray), the layer stays and one note says so (the commands print
  it as one warning line naming the layer and the missing path);
* where it does not (a Data layer without crop_size: the image size is in the database), the error names the layer
  and the path and says to give the shape with ``--input-shape TOP:C,H,W`` or the data with ``--source``.

``--input-shape TOP:C,H,W`` (per sample, no batch axis) replaces the data layer whose first top is TOP by an Input
layer of the same name and tops, shaped (batch, C, H, W) and (batch,) for the label, whether its data is here or
not: its data is then not read. The batch size stays the layer's own.

    graph, notes = build_offline("lenet_train_test.prototxt", "TEST", input_shapes=["data:1,28,28"])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

from slim import proto as pb
from slim.errors import DataError, SlimError

__all__ = ["AbsentData", "parse_input_shapes", "stand_in_absent_data", "build_offline"]


@dataclasses.dataclass(frozen=True)
class AbsentData:
    """A data layer whose data is not on this machine, and where its shape came from instead.

    Attributes:
        layer: the layer's name.
        type: its type (Data, ImageData, SlimData).
        field: the field naming the data, e.g. "data_param.source".
        path: the path that does not exist ("" when the field is not set).
        top: the layer's first top.
        shape: the per-sample shape used (C, H, W).
        origin: "the prototxt" or "--input-shape".
    """

    layer: str
    type: str
    field: str
    path: str
    top: str
    shape: Tuple[int, ...]
    origin: str

    def __str__(self) -> str:
        where = f"'{self.path}' does not exist here" if self.path else "is not set"
        shape = "x".join(map(str, self.shape))
        if self.origin == "--input-shape":
            return (f'Layer "{self.layer}" ({self.type}): {self.field} {where}; it stands as an Input layer with top '
                    f"{self.top} {shape} per sample (--input-shape).")
        # A Data layer's channels are in its records only: crop_size gives H and W, the channels are assumed.
        guess = (f" (crop_size; {self.shape[0]} channel{'s' if self.shape[0] > 1 else ''} assumed, 1 with "
                 f"force_gray: --input-shape {self.top}:C,H,W says otherwise)" if self.type == "Data" else "")
        return (f'Layer "{self.layer}" ({self.type}): {self.field} {where}; the shape of its top {self.top}, {shape} '
                f"per sample, is taken from the prototxt{guess}, not read from the data.")


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``TOP:C,H,W`` flags as {top: (C, H, W)} (any number of positive dimensions).

    Raises:
        SlimError: a malformed flag, a dimension that is not a positive integer, or a top given twice.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    for spec in specs:
        top, sep, dims = spec.partition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
            if not sep or not top or min(shape) <= 0:
                raise ValueError
        except ValueError:
            raise SlimError(f"--input-shape {spec!r} is not TOP:C,H,W with positive sizes (the shape of one sample, "
                            f"without the batch axis), e.g. --input-shape data:3,224,224.") from None
        if top in shapes:
            raise SlimError(f"--input-shape gives top {top!r} twice; give it once.")
        shapes[top] = shape
    return shapes


def _included(layer: "pb.LayerParameter", state: "pb.NetState") -> bool:
    from slim.graph import state_meets_rule

    if layer.include:
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


def _data_path(layer: "pb.LayerParameter") -> Optional[Tuple[str, str]]:
    """(field, path) of the data a layer reads, or None for layers that read none (MemoryData, DIGITS)."""
    from slim.sources import source_field

    field = source_field(layer)
    if field is None:
        return None
    param = getattr(layer, field.split(".")[0])
    if layer.type == "SlimData" and not param.source and param.image_file:
        return "slim_data_param.image_file", param.image_file  # IDX files named without a folder
    return field, param.source


def _stand_in(layer: "pb.LayerParameter", shape: Tuple[int, ...]) -> "pb.LayerParameter":
    """An Input layer with the data layer's name, tops and rules: (batch,) + shape, and (batch,) for a label."""
    from slim.data import layer_batch_size

    batch = layer_batch_size(layer)
    out = pb.LayerParameter(name=layer.name, type="Input", top=list(layer.top))
    out.include.extend(layer.include)
    out.exclude.extend(layer.exclude)
    if layer.HasField("phase"):
        out.phase = layer.phase
    for j in range(len(layer.top)):
        out.input_param.shape.add(dim=[batch, *shape] if j == 0 else [batch])
    return out


def stand_in_absent_data(net: "pb.NetParameter", phase="TEST", *, level: int = 0, stages: Sequence[str] = (),
                         input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None, where: str = "<net>",
                         strict: bool = True) -> Tuple["pb.NetParameter", List[AbsentData]]:
    """A copy of ``net`` whose data layers of the given NetState can be built here (see the module docstring).

    Args:
        net: the parsed (upgraded) net.
        phase, level, stages: the NetState the net will be built with.
        input_shapes: per-sample shapes by data top (``parse_input_shapes``).
        where: names the net in messages (its file).
        strict: refuse an ``input_shapes`` top that no data layer produces (False skips it: calflop's baseline).

    Returns:
        The net, with Input layers in place of the data layers ``input_shapes`` names, and a note per data layer
        whose data is absent.

    Raises:
        DataError: an absent data layer whose shape the prototxt does not state (the message says to pass
            --input-shape). SlimError: ``input_shapes`` names a top no data layer of this phase produces.
    """
    from slim.data import DATA_LAYER_TYPES, sample_shape
    from slim.graph import make_state

    state = make_state(phase, level, stages, base=net.state if net.HasField("state") else None)
    phase_name = "TRAIN" if state.phase == pb.TRAIN else "TEST"
    shapes = dict(input_shapes or {})
    out = pb.NetParameter()
    out.CopyFrom(net)
    notes: List[AbsentData] = []
    indices = [i for i, lp in enumerate(out.layer) if lp.type in DATA_LAYER_TYPES and lp.top and _included(lp, state)]
    unknown = [top for top in shapes if top not in {out.layer[i].top[0] for i in indices}]
    if unknown and strict:
        top = unknown[0]
        tops = ", ".join(f"{out.layer[i].top[0]!r} (layer {out.layer[i].name!r}, {out.layer[i].type})" for i in indices)
        raise SlimError(f"--input-shape {top}:{','.join(map(str, shapes[top]))}: no data layer of the {phase_name} "
                        f"net of {where} has the top {top!r}. Its data tops are: {tops or 'none'}.")
    for i in indices:
        layer = out.layer[i]
        top = layer.top[0]
        found = _data_path(layer)
        absent = found is not None and not (found[1] and os.path.exists(found[1]))
        if top in shapes:
            shape = shapes[top]
            if absent:
                notes.append(AbsentData(layer.name, layer.type, found[0], found[1], top, shape, "--input-shape"))
            out.layer[i].CopyFrom(_stand_in(layer, shape))
            continue
        try:
            shape = sample_shape(layer)
        except DataError as e:
            if found is None:
                raise
            raise DataError(f"{e} Without its data, the shape of top {top!r} is not known here: give it with "
                            f"--input-shape {top}:C,H,W (one sample, e.g. {top}:3,224,224), or point the layer at "
                            f"its data with --source {layer.name}@{phase_name}=PATH.") from None
        if absent:
            notes.append(AbsentData(layer.name, layer.type, found[0], found[1], top, tuple(shape), "the prototxt"))
    return out, notes


def build_offline(path: str, phase="TEST", *, level: int = 0, stages: Sequence[str] = (),
                  input_shapes: Sequence[str] = (), sources: Sequence[str] = (),
                  allow_unknown_fields: bool = False, strict: bool = True):
    """The NetGraph of a prototxt built where its data may be absent: ``--source`` overrides first (slim.sources),
    then ``stand_in_absent_data`` with the ``--input-shape`` flags (``strict=False``: flags that fit no layer of
    this net are skipped).

    Returns:
        (NetGraph named after ``path``, list of AbsentData notes).

    Raises:
        SlimError: as the steps above, and the graph's own errors.
    """
    from slim.graph import build_graph
    from slim.io import read_net
    from slim.sources import override_sources

    net = read_net(path, allow_unknown_fields=allow_unknown_fields)
    if sources:
        net = override_sources(net, sources, where=path, strict=strict)
    net, notes = stand_in_absent_data(net, phase, level=level, stages=stages,
                                      input_shapes=parse_input_shapes(input_shapes), where=path, strict=strict)
    return build_graph(net, phase, level=level, stages=stages, source=path), notes
