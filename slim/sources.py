"""Where a net's data layers read from, set on the command line: ``--source LAYER=PATH``, so that a generated or
downloaded net needs no edit to run on this machine's data.

    slim train --solver examples/mnist/lenet_solver.prototxt \\
        --source mnist@TRAIN=/data/mnist_train_lmdb --source mnist@TEST=/data/mnist_test_lmdb
    slim test --model vgg.prototxt --weights vgg.caffemodel --source data=/data/val_lmdb

The rule, chosen to be simple and never to guess:

* ``LAYER=PATH`` sets the ``source`` of the data layer named LAYER (data_param for Data, image_data_param for
  ImageData, slim_data_param for SlimData; the text up to the first "=" is the name, the rest the path);
* several layers of one net may share a name when they run in different phases (Caffe's examples name the TRAIN
  and the TEST data layer alike): then ``LAYER@TRAIN=PATH`` or ``LAYER@TEST=PATH`` says which, by the phase its
  ``include``/``exclude`` rules (or its ``phase``) name; without it the override is refused as ambiguous. Layers
  with one name in one phase, told apart only by level or stage rules, all get the path;
* a name that is no data layer of the net, or a layer that reads no source (MemoryData, Input, DummyData, SlimData's
  built-in DIGITS), is an error that lists the net's data layers with their phases and sources;
* the override changes the parsed NetParameter before anything is built; the prototxt is never rewritten.
  For a solver, it applies to the nets the solver reads (``net``/``train_net`` and their inline forms, and any
  ``test_net``), which are then handed to the solver inline; a ``train_net`` counts as TRAIN only and a
  ``test_net`` as TEST only.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from slim import proto as pb
from slim.errors import SlimError

__all__ = ["SourceOverride", "parse_source_overrides", "source_field", "layer_phases", "override_sources",
           "override_solver_sources", "describe_data_layers"]

_BOTH = frozenset((pb.TRAIN, pb.TEST))
_PHASE_NAMES = {pb.TRAIN: "TRAIN", pb.TEST: "TEST"}
# The parameter message that holds a data layer type's source field.
_SOURCE_PARAMS = {"Data": "data_param", "ImageData": "image_data_param", "SlimData": "slim_data_param",
                  "HDF5Data": "hdf5_data_param", "WindowData": "window_data_param"}
_DATA_TYPES = frozenset(_SOURCE_PARAMS) | {"MemoryData", "Input", "DummyData"}


@dataclasses.dataclass(frozen=True)
class SourceOverride:
    """One ``--source LAYER[@PHASE]=PATH``.

    Attributes:
        layer: the data layer's name.
        phase: pb.TRAIN or pb.TEST when the flag names one, else None.
        path: the new source.
    """

    layer: str
    phase: Optional[int]
    path: str

    @classmethod
    def parse(cls, text: str) -> "SourceOverride":
        """Reads ``LAYER=PATH`` or ``LAYER@TRAIN=PATH`` / ``LAYER@TEST=PATH``.

        Raises:
            SlimError: no "=", an empty name or path, or a phase other than TRAIN and TEST.
        """
        name, sep, path = text.partition("=")
        layer, at, phase_name = name.partition("@")
        phase = {"TRAIN": pb.TRAIN, "TEST": pb.TEST}.get(phase_name.upper()) if at else None
        if not sep or not layer or not path or (at and phase is None):
            raise SlimError(f"--source {text!r} is not LAYER=PATH or LAYER@PHASE=PATH (PHASE is TRAIN or TEST), e.g. "
                            f"--source data=/data/train_lmdb or --source mnist@TEST=/data/mnist_test_lmdb.")
        return cls(layer, phase, path)

    @property
    def flag(self) -> str:
        return f"--source {self.layer}{'@' + _PHASE_NAMES[self.phase] if self.phase is not None else ''}={self.path}"

    def __str__(self) -> str:
        return self.flag


def parse_source_overrides(specs: Sequence[str]) -> List[SourceOverride]:
    """The overrides of repeated ``--source`` flags.

    Raises:
        SlimError: a malformed flag, or one layer (and phase) given twice.
    """
    overrides = [SourceOverride.parse(s) for s in specs]
    seen: Dict[Tuple[str, Optional[int]], SourceOverride] = {}
    for o in overrides:
        earlier = seen.get((o.layer, o.phase))
        if earlier is not None:
            raise SlimError(f"{earlier.flag} and {o.flag} both set the source of layer {o.layer!r}; give it once.")
        seen[(o.layer, o.phase)] = o
    return overrides


def source_field(layer: "pb.LayerParameter") -> Optional[str]:
    """The field that holds a data layer's source ("data_param.source", ...), or None when it reads none."""
    param = _SOURCE_PARAMS.get(layer.type)
    if param is None or (layer.type == "SlimData" and layer.slim_data_param.dataset == pb.SlimDataParameter.DIGITS):
        return None
    return f"{param}.source"


def layer_phases(layer: "pb.LayerParameter") -> frozenset:
    """The phases a layer can run in, by its ``phase`` or the phases its include/exclude rules name (a rule that
    names no phase, or that also checks a level or stage, does not narrow them)."""
    if layer.HasField("phase"):
        return frozenset((layer.phase,))
    if layer.include:
        if any(not r.HasField("phase") for r in layer.include):
            return _BOTH
        return frozenset(r.phase for r in layer.include)
    excluded = {r.phase for r in layer.exclude if r.HasField("phase") and not (
        r.HasField("min_level") or r.HasField("max_level") or r.stage or r.not_stage)}
    return _BOTH - excluded


def _phase_text(phases: frozenset) -> str:
    return " and ".join(_PHASE_NAMES[p] for p in sorted(phases)) or "no phase"


def describe_data_layers(nets: Sequence["pb.NetParameter"]) -> str:
    """The data layers of ``nets`` as a message lists them: name, type, phases and source."""
    entries = []
    for net in nets:
        for lp in net.layer:
            if lp.type not in _DATA_TYPES:
                continue
            field = source_field(lp)
            where = f"{field} '{getattr(lp, field.split('.')[0]).source}'" if field else "no source"
            entry = f"{lp.name!r} ({lp.type}, {_phase_text(layer_phases(lp))}, {where})"
            if entry not in entries:
                entries.append(entry)
    return ", ".join(entries) if entries else "none"


def _apply(net: "pb.NetParameter", overrides: Sequence[SourceOverride], allowed: frozenset, where: str) -> set:
    """Set the sources of ``net`` (in place); returns the indices of the overrides that matched a layer."""
    used = set()
    for k, o in enumerate(overrides):
        matches = [lp for lp in net.layer if lp.name == o.layer and layer_phases(lp) & allowed
                   and (o.phase is None or o.phase in layer_phases(lp) & allowed)]
        if not matches:
            continue
        phases = {frozenset(layer_phases(lp) & allowed) for lp in matches}
        if o.phase is None and len(phases) > 1:
            listed = ", ".join(f"{lp.type} in {_phase_text(layer_phases(lp))}" for lp in matches)
            raise SlimError(f"{where}: {o.flag} is ambiguous: {len(matches)} layers are named {o.layer!r} ({listed}). "
                            f"Say which with --source {o.layer}@TRAIN={o.path} or --source {o.layer}@TEST={o.path}.")
        for lp in matches:
            field = source_field(lp)
            if field is None:
                article = "an" if lp.type[:1] in "AEIOU" else "a"
                why = "the built-in DIGITS dataset" if lp.type == "SlimData" else f"{article} {lp.type} layer"
                raise SlimError(f"{where}: {o.flag}: layer {o.layer!r} is {why}, which reads no source. The net's "
                                f"data layers are: {describe_data_layers([net])}.")
            getattr(lp, field.split(".")[0]).source = o.path
        used.add(k)
    return used


def _unmatched(overrides: Sequence[SourceOverride], used: set, nets: Sequence["pb.NetParameter"], where: str) -> None:
    missing = [o for k, o in enumerate(overrides) if k not in used]
    if missing:
        o = missing[0]
        phase = f" in phase {_PHASE_NAMES[o.phase]}" if o.phase is not None else ""
        raise SlimError(f"{where}: {o.flag}: there is no layer named {o.layer!r}{phase}. The data layers are: "
                        f"{describe_data_layers(nets)}.")


def override_sources(net: "pb.NetParameter", specs: Sequence[str], *, where: str = "<net>",
                     strict: bool = True) -> "pb.NetParameter":
    """A copy of ``net`` with the ``--source`` overrides applied (see the module docstring).

    Args:
        net: the parsed (upgraded) net.
        specs: the ``--source`` values.
        where: names the net in messages (its file).
        strict: refuse a flag that names no layer of the net (False skips it: calflop's baseline).

    Raises:
        SlimError: a malformed or repeated flag, an unknown or ambiguous layer, a layer that reads no source.
    """
    overrides = parse_source_overrides(specs)
    out = pb.NetParameter()
    out.CopyFrom(net)
    used = _apply(out, overrides, _BOTH, where)
    if strict:
        _unmatched(overrides, used, [net], where)
    return out


def override_solver_sources(solver: "pb.SolverParameter", solver_path: Optional[str],
                            specs: Sequence[str], *, allow_unknown_fields: bool = False) -> "pb.SolverParameter":
    """A copy of ``solver`` whose nets carry the ``--source`` overrides, every net inline (``net`` becomes
    ``net_param``, ``train_net`` ``train_net_param``, the ``test_net`` files ``test_net_param`` entries after the
    inline ones, which keeps Caffe's order of the test nets).

    Args:
        solver: the solver as read.
        solver_path: the solver file (net paths resolve as the solver resolves them; messages name it).
        specs: the ``--source`` values (none: the nets are only read and inlined).
        allow_unknown_fields: read the net files skipping fields slim's schema lacks (``--allow-unknown-fields``).

    Raises:
        SlimError: as ``override_sources``, judged over all the solver's nets; SolverError: a net file is missing.
    """
    from slim.io import read_net
    from slim.solver.nets import resolve_path

    overrides = parse_source_overrides(specs)
    where = solver_path or "the solver"
    out = pb.SolverParameter()
    out.CopyFrom(solver)
    nets, used = [], set()
    for field, inline, allowed in (("net", "net_param", _BOTH), ("train_net", "train_net_param", {pb.TRAIN})):
        if out.HasField(field):
            getattr(out, inline).CopyFrom(read_net(resolve_path(getattr(out, field), solver_path, field),
                                                   allow_unknown_fields=allow_unknown_fields))
            out.ClearField(field)
        if out.HasField(inline):
            nets.append(getattr(out, inline))
            used |= _apply(nets[-1], overrides, frozenset(allowed), where)
    for path in out.test_net:
        out.test_net_param.add().CopyFrom(read_net(resolve_path(path, solver_path, "test_net"),
                                                   allow_unknown_fields=allow_unknown_fields))
    out.ClearField("test_net")
    for net in out.test_net_param:
        nets.append(net)
        used |= _apply(net, overrides, frozenset({pb.TEST}), where)
    _unmatched(overrides, used, nets, where)
    return out
