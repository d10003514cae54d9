"""Which nets a solver trains and tests, with which NetState: Caffe's ``InitTrainNet`` and ``InitTestNets``.

Pure protobuf, no torch: :func:`solver_nets` turns a SolverParameter into a :class:`SolverNets` whose entries
each hold a NetParameter, the NetState to build it with and a name for messages. Caffe's rules (REFERENCE §2.4):

* the train net comes from exactly one of ``net``, ``net_param``, ``train_net``, ``train_net_param``;
* test nets come, in order, from ``test_net_param[]``, then ``test_net[]``, then one instance of the generic
  ``net``/``net_param`` per remaining ``test_iter``; every test net needs its ``test_iter``, and any test net
  needs ``test_interval > 0``;
* the train NetState is phase TRAIN, merged with the net's own ``state``, then with ``train_state``; test net i
  gets phase TEST, the net's ``state``, then ``test_state[i]`` (given once per test net, or not at all). Caffe
  merges with protobuf's MergeFrom, so a ``phase`` in the net's own state overrides TRAIN/TEST.
* nets read from files are upgraded (V1 layers, input headers); inline ``*net_param`` nets are not, as in Caffe.

Paths (``net:``, ``train_net:``, ``test_net:``) resolve from the working directory, as Caffe's
``ReadNetParamsFromTextFileOrDie`` does. When a path does not exist there but does exist beside the solver file,
that one is used (a convenience Caffe lacks: ``slim train --solver solvers/x.prototxt`` then works from any
folder for solvers that name their nets relative to themselves) and an INFO line says so.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from slim import proto as pb
from slim.errors import SolverError

__all__ = ["NetSpec", "SolverNets", "solver_nets", "resolve_path", "split_weights"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class NetSpec:
    """One net of a solver: its definition, the NetState to filter it with, and where it came from.

    Attributes:
        net: the NetParameter (upgraded when read from a file).
        state: the complete NetState (phase, level, stages) to build it with.
        source: a description for messages: the file path, or e.g. ``net_param of solver.prototxt``.
        test_iter: forward passes per test (test nets only; 0 for the train net).
    """

    net: "pb.NetParameter"
    state: "pb.NetState"
    source: str
    test_iter: int = 0

    def __str__(self) -> str:
        stages = f", stages {list(self.state.stage)}" if self.state.stage else ""
        level = f", level {self.state.level}" if self.state.level else ""
        phase = "TRAIN" if self.state.phase == pb.TRAIN else "TEST"
        return f"{self.source} [{phase}{level}{stages}]"


@dataclasses.dataclass
class SolverNets:
    """The train net and the test nets of a solver, in Caffe's order."""

    train: NetSpec
    tests: list[NetSpec]


def resolve_path(path: str, solver_path: Optional[str], what: str) -> str:
    """A path named in a solver: as given (from the working directory, as Caffe), else beside the solver file.

    Args:
        path: the path as written in the solver.
        solver_path: the solver file, or None for a solver given as a message.
        what: the field, for the message (e.g. ``net``).

    Returns:
        The path to open.

    Raises:
        SolverError: neither location exists.
    """
    if os.path.exists(path) or os.path.isabs(path) or solver_path is None:
        if not os.path.exists(path):
            raise SolverError(f"{solver_path or 'the solver'}: {what} \"{path}\" does not exist. Fix the path "
                              f"(relative paths are read from the working directory, {os.getcwd()}).")
        return path
    beside = os.path.join(os.path.dirname(os.fspath(solver_path)), path)
    if os.path.exists(beside):
        _log.info("%s \"%s\" is not in the working directory; using %s beside the solver file", what, path, beside)
        return beside
    raise SolverError(f"{solver_path}: {what} \"{path}\" does not exist, neither from the working directory "
                      f"({os.getcwd()}) nor beside the solver file ({beside}). Fix the path in the solver; Caffe "
                      f"reads it from the working directory.")


def _read(path: str, solver_path: Optional[str], what: str) -> tuple["pb.NetParameter", str]:
    from slim.io import read_net

    found = resolve_path(path, solver_path, what)
    return read_net(found), found


def _merged_state(phase: int, net: "pb.NetParameter", extra: Optional["pb.NetState"]) -> "pb.NetState":
    # Caffe: NetState with the phase, MergeFrom(net_param.state()), MergeFrom(train_state / test_state[i]).
    # MergeFrom overwrites set scalars (phase, level) and appends repeated stages.
    state = pb.NetState(phase=phase)
    state.MergeFrom(net.state)
    if extra is not None:
        state.MergeFrom(extra)
    return state


def solver_nets(solver: "pb.SolverParameter", solver_path: Optional[str | Path] = None) -> SolverNets:
    """The train and test nets of a solver, read and checked as Caffe's Solver::Init does.

    Args:
        solver: the solver definition.
        solver_path: the solver file (for messages and the beside-the-solver path fallback), or None.

    Returns:
        The train net and test nets with their NetStates.

    Raises:
        SolverError: no train net or several, test_iter or test_state counts that do not fit the test nets, test
            nets without test_interval, a net file that does not exist.
        ParseError: a net file does not parse.
    """
    where = os.fspath(solver_path) if solver_path is not None else "the solver"
    spath = os.fspath(solver_path) if solver_path is not None else None
    fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if solver.HasField(f)]
    if not fields:
        raise SolverError(f"{where}: the solver names no train net. Add net: \"path/to/train_val.prototxt\" (or "
                          f"train_net, net_param or train_net_param).")
    if len(fields) > 1:
        raise SolverError(f"{where}: the solver names the train net more than once ({', '.join(fields)}); Caffe "
                          f"accepts exactly one of net, net_param, train_net and train_net_param. Keep one.")
    field = fields[0]
    if field.endswith("_param"):
        train_def = getattr(solver, field)
        train_source = f"{field} of {where}"
    else:
        train_def, train_source = _read(getattr(solver, field), spath, field)
    train = NetSpec(train_def, _merged_state(pb.TRAIN, train_def, solver.train_state
                                             if solver.HasField("train_state") else None), train_source)

    defs: list[tuple[pb.NetParameter, str]] = []
    for i, net in enumerate(solver.test_net_param):
        defs.append((net, f"test_net_param #{i} of {where}"))
    for path in solver.test_net:
        defs.append(_read(path, spath, "test_net"))
    specific = len(defs)
    generic = solver.HasField("net") or solver.HasField("net_param")
    if generic:
        if len(solver.test_iter) < specific:
            raise SolverError(f"{where}: {specific} test nets (test_net, test_net_param) but {len(solver.test_iter)} "
                              f"test_iter values; give one test_iter per test net.")
        for _ in range(len(solver.test_iter) - specific):
            defs.append((train_def, train_source))
    elif len(solver.test_iter) != specific:
        raise SolverError(f"{where}: {specific} test nets (test_net, test_net_param) but {len(solver.test_iter)} "
                          f"test_iter values; give exactly one test_iter per test net.")
    if solver.test_state and len(solver.test_state) != len(defs):
        raise SolverError(f"{where}: {len(solver.test_state)} test_state entries for {len(defs)} test nets; give "
                          f"test_state once per test net, or not at all.")
    if defs and solver.test_interval <= 0:
        raise SolverError(f"{where}: the solver has {len(defs)} test net(s) but test_interval is "
                          f"{solver.test_interval}; set test_interval > 0 (iterations between tests), or remove "
                          f"test_iter to train without testing.")
    tests = []
    for i, (net, source) in enumerate(defs):
        if solver.test_iter[i] <= 0:
            raise SolverError(f"{where}: test_iter #{i} is {solver.test_iter[i]}; it must be positive (forward "
                              f"passes per test of {source}).")
        extra = solver.test_state[i] if solver.test_state else None
        tests.append(NetSpec(net, _merged_state(pb.TEST, net, extra), source, int(solver.test_iter[i])))
    return SolverNets(train, tests)


def split_weights(entries: Sequence[str]) -> list[str]:
    """Caffe's ``weights`` value(s): each entry may hold several comma-separated .caffemodel paths."""
    return [p.strip() for entry in entries for p in entry.split(",") if p.strip()]
