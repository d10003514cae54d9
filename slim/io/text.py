"""Prototxt nets and solvers: Caffe's text format, strict by default, upgraded the way Caffe upgrades them.

Caffe reads a .prototxt with protobuf's TextFormat, which refuses any field its schema lacks. slim does the same
by default and says where (``file:line:column``), in which layer, and how to fix it. A tolerant mode
(``allow_unknown_fields=True``) skips fields that Caffe forks added (``bn_param``, ``norm_param``, ``new_dim``,
...) and warns once, listing every skipped field with its line. OpenCV's Caffe fork spells BVLC's
``round_mode`` as a bool ``ceil_mode`` inside ``pooling_param``; that alias is read in both modes.

How: before protobuf parses the text, a small scanner walks its tokens alongside the schema. It finds each field
the schema lacks (with the layer around it) and each ``ceil_mode``, and overwrites their text with spaces (line
breaks kept), so protobuf parses the rest strictly and its own ``line:column`` for any later error stays right.
The scanner only follows the text: wherever it cannot (a syntax error), it stops and protobuf reports the error.

Example::

    net = parse_net('layer { name: "pool1" type: "Pooling" pooling_param { pool: MAX ceil_mode: false } }')
    net.layer[0].pooling_param.round_mode == pb.PoolingParameter.FLOOR   # True
"""

import bisect
import difflib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from google.protobuf import text_format

from slim import proto as pb
from slim.errors import ParseError
from slim.io import fast_text
from slim.io.atomic import atomic_write
from slim.io.limits import check_allocation
from slim.io.upgrade import _is_repeated, upgrade_net, upgrade_snapshot_prefix, upgrade_solver

__all__ = ["parse_net", "read_net", "write_net", "net_to_text", "parse_solver", "read_solver", "write_solver",
           "solver_to_text", "spells_ceil_mode", "UnknownFieldWarning"]

PathLike = Union[str, "os.PathLike[str]"]

_FORK_HINT = ("If the file comes from a Caffe fork, skip unknown fields with --allow-unknown-fields (every command "
              "that reads prototxt takes it; allow_unknown_fields=True in Python).")

# Messages whose instances a user knows by their `name`: errors inside them say 'layer "conv1"'.
_LAYER_MESSAGES = ("LayerParameter", "V1LayerParameter", "V0LayerParameter")

# protobuf's text-format bool spellings (the same in its C++ and Python parsers).
_TRUE = ("true", "t", "1", "True")
_FALSE = ("false", "f", "0", "False")

# The token classes of protobuf's text-format tokenizer: identifiers may carry '+'/'-' (e.g. "inf"), numbers
# start with a digit, a sign or ".digit" ("-1", "1.", "1e-5", "0x10", "-inf"), strings use either quote and
# end at the line; every other character is a one-character symbol. Comments run from '#' to the line end.
_TOKEN = re.compile(r"""
    (?P<skip>(?:\s|\#[^\n]*)+)
  | (?P<ident>[A-Za-z_][0-9A-Za-z_+-]*)
  | (?P<number>(?:[0-9+-]|\.[0-9])[0-9A-Za-z_.+-]*)
  | (?P<string>"(?:[^"\n\\]|\\.)*"?|'(?:[^'\n\\]|\\.)*'?)
  | (?P<symbol>.)
""", re.VERBOSE)

_CLOSER = {"{": "}", "<": ">", "[": "]"}


class UnknownFieldWarning(UserWarning):
    """Fields unknown to slim's schema were skipped while reading a prototxt with ``allow_unknown_fields``."""


# ----------------------------------------------------------------------------------------------------------------
# The scanner


class _Frame:
    """One message being read: its type, where it sits in its parent, and its `name` once seen."""

    __slots__ = ("desc", "parent", "field", "index", "label", "counts")

    def __init__(self, desc, parent: Optional["_Frame"], field: Optional[str], index: Optional[int]):
        self.desc = desc
        self.parent = parent
        self.field = field
        self.index = index
        self.label: Optional[str] = None
        self.counts: dict = {}

    def path(self) -> Tuple[Tuple[str, Optional[int]], ...]:
        """The (field, index) steps from the root message to this one."""
        steps, frame = [], self
        while frame.parent is not None:
            steps.append((frame.field, frame.index))
            frame = frame.parent
        return tuple(reversed(steps))


@dataclass
class _Unknown:
    """A field the schema lacks: its name, the text span of the whole field, and the message it is in."""

    name: str
    start: int
    end: int
    frame: _Frame


@dataclass
class _CeilMode:
    """OpenCV's `ceil_mode: <bool>` found in a PoolingParameter (`found`: the value text, when not a bool)."""

    ceil: bool
    start: int
    end: int
    frame: _Frame
    found: str = ""


class _Stop(Exception):
    """The scanner cannot follow the text from here (a syntax error, which protobuf then reports)."""


class _Scanner:
    """Walks the tokens of a text-format message beside its descriptor; see the module docstring."""

    def __init__(self, text: str, descriptor):
        self.tokens = [(m.lastgroup, m.group(), m.start(), m.end())
                       for m in _TOKEN.finditer(text) if m.lastgroup != "skip"]
        self.pos = 0
        self.unknown: List[_Unknown] = []
        self.ceil_modes: List[_CeilMode] = []
        self.bad_ceil_modes: List[_CeilMode] = []  # ceil_mode with a value that is not a bool
        self.layers: List[list] = []  # [start, end, frame] of each layer-like message, for error context
        try:
            self._message(_Frame(descriptor, None, None, None), None)
        except _Stop:
            pass

    # token helpers
    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _accept(self, symbol: str) -> bool:
        tok = self._peek()
        if tok is not None and tok[0] == "symbol" and tok[1] == symbol:
            self.pos += 1
            return True
        return False

    def _next(self):
        tok = self._peek()
        if tok is None:
            raise _Stop
        self.pos += 1
        return tok

    # grammar
    def _message(self, frame: _Frame, close: Optional[str]) -> None:
        """Fields until `close` (or the end of the text for the root message)."""
        while True:
            tok = self._peek()
            if tok is None:
                if close is None:
                    return
                raise _Stop
            if tok[0] == "symbol" and tok[1] == close:
                self.pos += 1
                return
            if tok[0] != "ident":  # includes '[' of extension names, which Caffe's schema has none of
                raise _Stop
            self.pos += 1
            first, start, name = self.pos, tok[2], tok[1]
            field = frame.desc.fields_by_name.get(name)
            colon = self._accept(":")  # optional before a message value; protobuf checks the rest
            if field is None:
                self._skip_value(colon)
            elif field.message_type is not None:
                self._message_value(frame, field)
            else:
                self._scalar_value(frame, field)
            self._accept(",") or self._accept(";")
            end = self.tokens[self.pos - 1][3]
            if field is None:
                if name == "ceil_mode" and frame.desc.name == "PoolingParameter":
                    values = [t[1] for t in self.tokens[first:self.pos] if t[1] not in (":", ",", ";")]
                    self._ceil_mode(frame, values, start, end)
                else:
                    self.unknown.append(_Unknown(name, start, end, frame))

    def _message_value(self, frame: _Frame, field) -> None:
        tok = self._next()
        if tok[0] == "symbol" and tok[1] in ("{", "<"):
            self._child(frame, field, _CLOSER[tok[1]], tok[2])
        elif tok[0] == "symbol" and tok[1] == "[":  # list form: field: [ {..}, {..} ]
            if self._accept("]"):
                return
            while True:
                tok = self._next()
                if not (tok[0] == "symbol" and tok[1] in ("{", "<")):
                    raise _Stop
                self._child(frame, field, _CLOSER[tok[1]], tok[2])
                if self._accept("]"):
                    return
                if not self._accept(","):
                    raise _Stop
        else:
            raise _Stop

    def _child(self, frame: _Frame, field, close: str, start: int) -> None:
        index = None
        if _is_repeated(field):
            index = frame.counts.get(field.name, 0)
            frame.counts[field.name] = index + 1
        child = _Frame(field.message_type, frame, field.name, index)
        span = None
        if child.desc.name in _LAYER_MESSAGES:
            span = [start, None, child]
            self.layers.append(span)
        self._message(child, close)
        if span is not None:
            span[1] = self.tokens[self.pos - 1][3]

    def _scalar_value(self, frame: _Frame, field) -> None:
        if self._accept("["):  # list form: dim: [1, 3]
            if self._accept("]"):
                return
            while True:
                self._scalar()
                if self._accept("]"):
                    return
                if not self._accept(","):
                    raise _Stop
        value = self._scalar()
        if field.name == "name" and frame.desc.name in _LAYER_MESSAGES and value.startswith(("'", '"')):
            frame.label = value[1:-1]

    def _scalar(self) -> str:
        """One scalar value: an identifier, a number, or adjacent strings (which protobuf concatenates)."""
        tok = self._next()
        if tok[0] in ("ident", "number"):
            return tok[1]
        if tok[0] != "string":
            raise _Stop
        text = tok[1]
        while (nxt := self._peek()) is not None and nxt[0] == "string":
            self.pos += 1
            text = text[:-1] + nxt[1][1:]
        return text

    def _skip_value(self, colon: bool) -> None:
        """The value of an unknown field, whatever it is: a message, a list or a scalar (the last two, as in
        protobuf, only after a colon)."""
        tok = self._peek()
        if tok is None:
            raise _Stop
        if tok[0] == "symbol" and (tok[1] in ("{", "<") or tok[1] == "[" and colon):
            stack = []
            while True:
                tok = self._next()
                if tok[0] == "symbol":
                    if tok[1] in _CLOSER:
                        stack.append(_CLOSER[tok[1]])
                    elif tok[1] in ("}", ">", "]"):
                        if tok[1] != stack.pop():
                            raise _Stop
                        if not stack:
                            return
        elif colon:
            self._scalar()
        else:
            raise _Stop

    def _ceil_mode(self, frame: _Frame, values: List[str], start: int, end: int) -> None:
        # OpenCV's caffe.proto has `optional bool ceil_mode = 13 [default = true]` where BVLC has
        # `optional RoundMode round_mode = 13 [default = CEIL]`: ceil_mode false is round_mode FLOOR.
        if len(values) == 1 and values[0] in _TRUE + _FALSE:
            self.ceil_modes.append(_CeilMode(values[0] in _TRUE, start, end, frame))
        else:
            self.bad_ceil_modes.append(_CeilMode(False, start, end, frame, " ".join(values) or "nothing"))


# ----------------------------------------------------------------------------------------------------------------
# Messages


class _Lines:
    """Maps a text position to a 1-based (line, column), the convention of protobuf's errors."""

    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def at(self, pos: int) -> Tuple[int, int]:
        line = bisect.bisect_right(self.starts, pos)
        return line, pos - self.starts[line - 1] + 1

    def offset(self, line: int, column: int) -> int:
        return self.starts[min(max(line, 1), len(self.starts)) - 1] + max(column, 1) - 1


def _layer_label(frame: _Frame) -> str:
    if frame.label is not None:
        return f'layer "{frame.label}"'
    return f"{frame.field} #{frame.index + 1}" if frame.index is not None else f"the unnamed {frame.field}"


def _describe(frame: _Frame) -> str:
    """Where a message sits, for a user: 'layer "conv1" (LayerParameter)', 'pooling_param of layer "pool1"
    (PoolingParameter)', 'the top level (NetParameter)', 'train_state (NetState)'."""
    inner, layer = [], frame
    while layer is not None and layer.desc.name not in _LAYER_MESSAGES:
        inner.append(layer)
        layer = layer.parent
    steps = ".".join(f.field if f.index is None else f"{f.field}[{f.index}]" for f in reversed(inner) if f.parent)
    if layer is None:
        where = steps or "the top level"
    elif steps:
        where = f"{steps} of {_layer_label(layer)}"
    else:
        where = _layer_label(layer)
    return f"{where} ({frame.desc.name})"


def _suggestion(unknown: _Unknown) -> str:
    """A hint for a misplaced or misspelt field, or the empty string."""
    frame = unknown.frame.parent
    while frame is not None:
        if unknown.name in frame.desc.fields_by_name:
            return (f' "{unknown.name}" is a field of {frame.desc.name}, not of {unknown.frame.desc.name}: '
                    f'move it out of {unknown.frame.field}.')
        frame = frame.parent
    close = difflib.get_close_matches(unknown.name, unknown.frame.desc.fields_by_name, n=1, cutoff=0.85)
    return f' Did you mean "{close[0]}"?' if close else ""


def _wrong_kind(unknown: List[_Unknown], source: str) -> Optional[str]:
    """The file is another kind than the one being read (a solver given as a net, a net as a solver), or a net whose
    layer fields stand at the top level (a missing ``layer {``): what to do instead; None otherwise."""
    top = [u.name for u in unknown if u.frame.parent is None]
    if not top:
        return None
    reading = unknown[0].frame
    while reading.parent is not None:
        reading = reading.parent
    kinds = [("a solver", pb.SolverParameter.DESCRIPTOR, "where a solver is expected (slim train --solver FILE); "
                                                          "the net it names goes where a net is expected"),
             ("a net", pb.NetParameter.DESCRIPTOR, "where a net is expected (slim summary FILE, --model FILE, the "
                                                   "solver's net: field); slim train takes the solver")]
    for kind, desc, advice in kinds:
        if desc is reading.desc:
            continue
        hits = [name for name in dict.fromkeys(top) if name in desc.fields_by_name]
        if len(hits) * 2 > len(set(top)):
            fields = ", ".join(hits[:4])
            return (f"{source} is {kind} prototxt, not a {_KIND[reading.desc.name]} (it sets {fields}, fields of "
                    f"{desc.name}): pass it {advice}.")
    if reading.desc is pb.NetParameter.DESCRIPTOR:
        layer_fields = [name for name in dict.fromkeys(top) if name in pb.LayerParameter.DESCRIPTOR.fields_by_name]
        if len(layer_fields) * 2 > len(set(top)):
            return (f"{source} has layer fields at its top level ({', '.join(layer_fields[:4])}): a `layer {{` is "
                    f"missing before them, or a brace closes a layer too early. Wrap each layer in layer {{ ... }}.")
    return None


_KIND = {"NetParameter": "net", "SolverParameter": "solver"}


def _unknown_error(unknown: List[_Unknown], lines: _Lines, source: str) -> str:
    wrong = _wrong_kind(unknown, source)
    if wrong:
        return wrong
    first = unknown[0]
    line, col = lines.at(first.start)
    text = (f'{source}:{line}:{col}: {_describe(first.frame)} has no field named "{first.name}".'
            f"{_suggestion(first)} {_FORK_HINT}")
    if len(unknown) > 1:
        more = ", ".join(f'"{u.name}" (line {lines.at(u.start)[0]})' for u in unknown[1:])
        text += f" The file has {len(unknown) - 1} more unknown field(s): {more}."
    return text


def _skipped_warning(unknown: List[_Unknown], lines: _Lines, source: str) -> str:
    fields = "; ".join(f'line {lines.at(u.start)[0]}: "{u.name}" in {_describe(u.frame)}' for u in unknown)
    return (f"{source}: skipped {len(unknown)} field(s) that slim's Caffe schema does not have "
            f"(allow_unknown_fields): {fields}. Their settings have no effect; check that the net does not "
            f"depend on them.")


_PB_POSITION = re.compile(r"^\s*(\d+):(\d+)\s*:\s*")
_PB_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named ([^\s.]+)')


def _protobuf_error(exc: text_format.ParseError, text: str, lines: _Lines, scanner: _Scanner, source: str,
                    tolerant: bool) -> str:
    """protobuf's ParseError, rewritten as file:line:col, the enclosing layer, the problem and a fix."""
    message, line, col = str(exc), exc.GetLine(), exc.GetColumn()
    match = _PB_POSITION.match(message)
    if match:
        message = message[match.end():]
        line, col = line or int(match.group(1)), col or int(match.group(2))
    # Python's protobuf quotes the offending line before some messages: drop the echo, the position says it.
    if message.startswith("'") and "': " in message and message[1:message.index("': ")] in text:
        message = message[message.index("': ") + 3:]
    message = message.rstrip()
    if not message.endswith("."):
        message += "."
    where = f"{source}:{line}:{col}" if line else source
    context = ""
    if line:
        pos = lines.offset(line, col or 1)
        inside = [span for span in scanner.layers if span[0] <= pos and (span[1] is None or pos < span[1])]
        if inside:
            context = f"in {_layer_label(inside[-1][2])}: "
    hint = " Fix the text there; a prototxt is protobuf text format (name: value, and name { ... } for messages)."
    enum = _PB_ENUM.search(message)
    if enum:
        try:
            values = [v.name for v in pb.POOL.FindEnumTypeByName(enum.group(1)).values]
            hint = f" Valid values: {', '.join(values)}."
        except KeyError:
            pass
    elif "has no field named" in message:
        # Reached only where the scanner could not skip the field: in tolerant mode, its value is malformed.
        hint = (" Its value could not be skipped either: a value needs a colon before it (name: value), a message "
                "braces (name { ... })." if tolerant else " " + _FORK_HINT)
    elif "should not have multiple" in message:
        hint = " A non-repeated field may be given once per message; remove the duplicate."
    return f"{where}: {context}{message}{hint}"


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _blank(text: str, spans: List[Tuple[int, int]]) -> str:
    """`text` with each span overwritten by spaces, line breaks kept, so later positions do not move."""
    if not spans:
        return text
    pieces, last = [], 0
    for start, end in sorted(spans):
        pieces.append(text[last:start])
        pieces.append(re.sub(r"[^\n]", " ", text[start:end]))
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


def _follow(message, path):
    for name, index in path:
        message = getattr(message, name)
        if index is not None:
            message = message[index]
    return message


def _parse(text: str, message, source: str, allow_unknown_fields: bool) -> None:
    """Parses `text` into `message` (see the module docstring); raises ParseError, warns UnknownFieldWarning."""
    if not isinstance(text, str):
        raise TypeError(f"expected the prototxt text as str, got {type(text).__name__}; read files with read_net "
                        f"or read_solver")
    if "ceil_mode" not in text and _parse_plain(text, message):
        _check_required(message, source)
        return
    scanner = _Scanner(text, message.DESCRIPTOR)
    lines = _Lines(text)
    problems = [(bad.start, f'{_describe(bad.frame)}: ceil_mode (OpenCV\'s spelling of round_mode) must be true or '
                            f'false, found "{bad.found}". Write ceil_mode: false for floor rounding, or BVLC\'s '
                            f'round_mode: FLOOR (CEIL is the default).') for bad in scanner.bad_ceil_modes]
    # A file of the wrong kind is refused even in tolerant mode: skipping its fields would leave an empty message.
    if scanner.unknown and (not allow_unknown_fields or _wrong_kind(scanner.unknown, source)):
        problems.append((scanner.unknown[0].start, _unknown_error(scanner.unknown, lines, source)))
    if problems:
        pos, problem = min(problems, key=lambda p: p[0])
        if not problem.startswith(source):
            line, col = lines.at(pos)
            problem = f"{source}:{line}:{col}: {problem}"
        raise ParseError(problem)

    spans = [(u.start, u.end) for u in scanner.unknown] + [(c.start, c.end) for c in scanner.ceil_modes]
    try:
        text_format.Parse(_blank(text, spans), message)
    except text_format.ParseError as exc:
        raise ParseError(_protobuf_error(exc, text, lines, scanner, source, allow_unknown_fields)) from None
    except Exception as exc:  # anything else protobuf raises is still a file it cannot read
        raise ParseError(f"{source}: protobuf could not parse the text ({type(exc).__name__}: {exc}).") from exc

    for found in scanner.ceil_modes:
        pooling = _follow(message, found.frame.path())
        mode = pb.PoolingParameter.CEIL if found.ceil else pb.PoolingParameter.FLOOR
        if pooling.HasField("round_mode") and pooling.round_mode != mode:
            line, col = lines.at(found.start)
            name = pb.PoolingParameter.RoundMode.Name(pooling.round_mode)
            raise ParseError(f"{source}:{line}:{col}: {_describe(found.frame)} sets both ceil_mode: "
                             f"{str(found.ceil).lower()} and round_mode: {name}, which disagree. Keep one of them.")
        pooling.round_mode = mode

    _check_required(message, source)
    if scanner.unknown:
        warnings.warn(_skipped_warning(scanner.unknown, lines, source), UnknownFieldWarning, stacklevel=3)


def _parse_plain(text: str, message) -> bool:
    """The fast path: protobuf's strict parse alone, for the usual file with nothing to report or rewrite. False
    (and ``message`` cleared) when it fails; the scanning path then finds and explains the problem. Text in the plain
    subset (slim.io.fast_text) is read without protobuf's (slow, pure Python) parser, to the same message."""
    if fast_text.parse(text, message):
        return True
    try:
        text_format.Parse(text, message)
        return True
    except Exception:
        message.Clear()
        return False


def _check_required(message, source: str) -> None:
    # Caffe's C++ parser refuses a message whose required fields are missing (only ClipParameter has any).
    missing = message.FindInitializationErrors()
    if missing:
        named = []
        for path in missing:  # e.g. "layer[3].clip_param.max": say which layer that is
            match = re.match(r"(layers?)\[(\d+)\]", path)
            layer = getattr(message, match.group(1))[int(match.group(2))] if match else None
            named.append(f'{path} (layer "{layer.name}")' if layer is not None and layer.name else path)
        raise ParseError(f"{source}: required field(s) missing: {', '.join(named)}. Caffe's parser refuses such a "
                         f"file; add the missing values.")


def _read_text(path: PathLike) -> str:
    """The UTF-8 text of a prototxt file, or a ParseError that names the path."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            check_allocation(size, f"{path} is a prototxt of", "A prototxt is a small text file; check the path.")
            data = f.read()
    except ValueError:  # a NUL byte in the path
        raise ParseError(f"The prototxt path {os.fspath(path)!r} contains a NUL byte, which no file name may hold; "
                         f"fix the path.") from None
    except FileNotFoundError:
        raise ParseError(f"{path}: no such file. Check the path; a relative path is taken from the working "
                         f"directory {os.getcwd()}.") from None
    except IsADirectoryError:
        raise ParseError(f"{path} is a directory, not a prototxt file. Give the path of the .prototxt file.") from None
    except OSError as exc:
        raise ParseError(f"{path}: cannot be read ({exc.strerror or exc}). Check the file's permissions.") from None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParseError(f"{path}:{line}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}). "
                         f"A prototxt is text: a binary .caffemodel or .solverstate is read with read_caffemodel or "
                         f"read_solverstate; a text file in another encoding must be re-saved as UTF-8.") from None


def parse_net(text: str, source: str = "<string>", *, allow_unknown_fields: bool = False,
              upgrade: bool = True) -> "pb.NetParameter":
    """Parses a net prototxt and, like Caffe, upgrades V0/V1 layers, input headers and old BatchNorm params.

    Args:
        text: the prototxt.
        source: what error messages call the text (a file path).
        allow_unknown_fields: skip fields slim's schema lacks (Caffe forks) with one UnknownFieldWarning
            instead of raising.
        upgrade: run upgrade_net (Caffe's UpgradeNetAsNeeded); False returns the net as written.

    Returns:
        The NetParameter.

    Raises:
        ParseError: a syntax error, an unknown field (strict mode), a bad value, or a net that cannot be upgraded;
            the message names source:line:column.
    """
    net = pb.NetParameter()
    _parse(text, net, source, allow_unknown_fields)
    if upgrade:
        upgrade_net(net, source)
    return net


def read_net(path: PathLike, *, allow_unknown_fields: bool = False, upgrade: bool = True) -> "pb.NetParameter":
    """Reads a net prototxt file; see parse_net. Error messages name the path."""
    return parse_net(_read_text(path), os.fspath(path), allow_unknown_fields=allow_unknown_fields, upgrade=upgrade)


def spells_ceil_mode(path: PathLike) -> bool:
    """Whether a net prototxt writes pooling rounding in OpenCV's ``ceil_mode`` spelling, so that a net derived from
    it (pruned, deployed) is written the same way (``net_to_text(..., opencv=True)``) for the reader it was made
    for."""
    text = _read_text(path)
    return "ceil_mode" in text and bool(_Scanner(text, pb.NetParameter.DESCRIPTOR).ceil_modes)


def parse_solver(text: str, source: str = "<string>", *, allow_unknown_fields: bool = False) -> "pb.SolverParameter":
    """Parses a solver prototxt and upgrades its deprecated ``solver_type`` enum to ``type``.

    Nets given inline (net_param, train_net_param, test_net_param) are not upgraded, as in Caffe.

    Args:
        text: the prototxt.
        source: what error messages call the text (a file path).
        allow_unknown_fields: skip fields slim's schema lacks with one UnknownFieldWarning instead of raising.

    Raises:
        ParseError: as parse_net.
        SolverError: both solver_type and type are set.
    """
    solver = pb.SolverParameter()
    _parse(text, solver, source, allow_unknown_fields)
    upgrade_solver(solver, source)
    return solver


def read_solver(path: PathLike, *, allow_unknown_fields: bool = False) -> "pb.SolverParameter":
    """Reads a solver prototxt file: parse_solver, then Caffe's snapshot_prefix rule for solver files.

    An unset ``snapshot_prefix`` becomes the solver path without its extension; a prefix naming an existing
    directory becomes ``<dir>/<solver file stem>``. Net paths (``net:``, ``train_net:``, ...) are left as written:
    Caffe resolves them from the working directory, not from the solver's folder.
    """
    solver = parse_solver(_read_text(path), os.fspath(path), allow_unknown_fields=allow_unknown_fields)
    upgrade_snapshot_prefix(solver, path)
    return solver


def net_to_text(net: "pb.NetParameter", *, opencv: bool = False) -> str:
    """The net as prototxt that Caffe reads: fields in number order (so ``layer``, field 100, comes last) and
    floats in the shortest form that reads back to the same float32.

    Args:
        net: the net.
        opencv: write for OpenCV's Caffe importer instead. Its caffe.proto has ``bool ceil_mode = 13`` where BVLC
            has ``RoundMode round_mode = 13``, and it rejects ``round_mode`` whatever its value, so a CEIL round
            mode (the default) is left out and FLOOR is written ``ceil_mode: false``. BVLC Caffe cannot read
            ``ceil_mode``; slim reads both spellings.
    """
    if not opencv:
        return text_format.MessageToString(net, as_utf8=True)
    return text_format.MessageToString(net, as_utf8=True, message_formatter=_opencv_pooling)


def _opencv_pooling(message, indent: int, as_one_line: bool):
    """text_format's message_formatter for net_to_text(opencv=True): a PoolingParameter's round_mode in OpenCV's
    spelling; None (the default printing) for every other message."""
    if message.DESCRIPTOR.full_name != "caffe.PoolingParameter" or not message.HasField("round_mode"):
        return None
    floor = message.round_mode == pb.PoolingParameter.FLOOR
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField("round_mode")
    lines = text_format.MessageToString(copy, as_utf8=True).splitlines() + (["ceil_mode: false"] if floor else [])
    return (" " if as_one_line else "\n" + " " * indent).join(lines)


def solver_to_text(solver: "pb.SolverParameter") -> str:
    """The solver as prototxt that Caffe reads; floats as in net_to_text."""
    return text_format.MessageToString(solver, as_utf8=True)


def write_net(net: "pb.NetParameter", path: PathLike, *, opencv: bool = False) -> None:
    """Writes net_to_text(net, opencv=opencv) to `path` atomically (the old file stays whole if the write fails)."""
    with atomic_write(path, "w") as f:
        f.write(net_to_text(net, opencv=opencv))


def write_solver(solver: "pb.SolverParameter", path: PathLike) -> None:
    """Writes solver_to_text(solver) to `path` atomically."""
    with atomic_write(path, "w") as f:
        f.write(solver_to_text(solver))
