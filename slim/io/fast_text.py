"""A fast reader for the plain subset of protobuf's text format that prototxt files use.

protobuf's own text parser is pure Python and reads about 10,000 fields a second; a ResNet-164 prototxt (5,000
fields) took most of ``slim.Net``'s construction. This reader tokenises the text with one regular expression and
sets the fields directly, for the subset real nets and solvers are written in:

* ``name: value`` for scalars and ``name { ... }`` / ``name: { ... }`` / ``name < ... >`` for messages;
* decimal integers, decimal floats (``1``, ``-0.5``, ``1e-4``, ``.5``), the bool spellings protobuf accepts, enum
  values by name, and quoted strings without escapes;
* ``#`` comments.

Anything else (a field the schema lacks, an escape sequence, hex or octal numbers, ``inf``/``nan``, list syntax
``[...]``, separators ``,``/``;``, adjacent strings, an enum by number, a value out of range, a singular field set
twice, a oneof member, a bytes field, a syntax error) is declined: ``parse`` returns False with the message
cleared, and the caller runs protobuf's parser, which then gives the same result or its error. So a True answer
always means the message protobuf's ``text_format.Parse`` would produce (tests/test_text.py checks this field for
field over every prototxt in the repository and over mutated ones).
"""

import re

from google.protobuf import descriptor as _descriptor

from slim.io.upgrade import _is_repeated

__all__ = ["parse"]

# Whitespace and comments, then one token: an identifier, a number-like run, a string without escapes or line
# breaks, any other single character, or the end of the text (an empty token, dropped). Ending at \Z keeps the
# match from ever failing, so the engine never backtracks into a comment and findall never skips a character.
_TOKEN = re.compile(r"""(?:\s|\#[^\n]*)*
    ( [A-Za-z_][0-9A-Za-z_]*
    | -?[0-9.][0-9A-Za-z_.+-]*
    | "[^"\\\n]*"
    | '[^'\\\n]*'
    | .
    | \Z )""", re.VERBOSE | re.ASCII)
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)", re.ASCII)
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_OCTAL_FLOAT = re.compile(r"-?0[0-9]")  # protobuf refuses "01.5" as a float
_BOOLS = {"true": True, "t": True, "1": True, "True": True, "false": False, "f": False, "0": False, "False": False}

_FD = _descriptor.FieldDescriptor
_INTEGERS = (_FD.CPPTYPE_INT32, _FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT32, _FD.CPPTYPE_UINT64)
_FLOATS = (_FD.CPPTYPE_FLOAT, _FD.CPPTYPE_DOUBLE)


class _Decline(Exception):
    """The text leaves the subset: protobuf's parser decides."""


def _int(token: str) -> int:
    if not _INT.fullmatch(token):
        raise _Decline
    return int(token)


def _float(token: str) -> float:
    if not _FLOAT.fullmatch(token) or _OCTAL_FLOAT.match(token):
        raise _Decline
    return float(token)


def _bool(token: str) -> bool:
    try:
        return _BOOLS[token]
    except KeyError:
        raise _Decline from None


def _string(token: str) -> str:
    if len(token) < 2 or token[0] not in "\"'" or token[-1] != token[0]:
        raise _Decline
    return token[1:-1]


def _converter(field):
    """The function turning a token into ``field``'s value, or None when the field lies outside the subset."""
    kind = field.cpp_type
    if field.containing_oneof is not None or field.type == _FD.TYPE_BYTES:
        return None
    if kind in _INTEGERS:
        return _int
    if kind in _FLOATS:
        return _float
    if kind == _FD.CPPTYPE_BOOL:
        return _bool
    if kind == _FD.CPPTYPE_STRING:
        return _string
    if kind == _FD.CPPTYPE_ENUM:
        names = field.enum_type.values_by_name

        def enum(token):
            value = names.get(token)
            if value is None:
                raise _Decline
            return value.number
        return enum
    return None


_MESSAGE = object()   # the "converter" of a message field
_TABLES = {}          # message descriptor -> {field name: (repeated, converter or _MESSAGE or None)}


def _table(descriptor):
    """A message type's fields as the reader needs them (built once per type)."""
    table = _TABLES.get(descriptor)
    if table is None:
        table = _TABLES[descriptor] = {
            f.name: (_is_repeated(f), (_MESSAGE if f.containing_oneof is None else None)
                     if f.cpp_type == _FD.CPPTYPE_MESSAGE else _converter(f))
            for f in descriptor.fields}
    return table


def _merge(tokens, message) -> None:
    """Fill ``message`` from ``tokens``; _Decline (or any exception) when the text leaves the subset."""
    stack = []
    fields, seen, closer = _table(message.DESCRIPTOR), set(), None
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        if token == closer:
            message, fields, seen, closer = stack.pop()
            i += 1
            continue
        repeated, convert = fields.get(token, (False, None))
        if convert is None:
            raise _Decline   # not a field of this message, or one outside the subset
        if not repeated:
            if token in seen:
                raise _Decline  # protobuf's Parse refuses a singular field given twice
            seen.add(token)
        nxt = tokens[i + 1] if i + 1 < n else None
        if convert is _MESSAGE:
            if nxt == ":":
                i += 1
                nxt = tokens[i + 1] if i + 1 < n else None
            if nxt == "{":
                close = "}"
            elif nxt == "<":
                close = ">"
            else:
                raise _Decline
            if repeated:
                child = getattr(message, token).add()
            else:
                child = getattr(message, token)
                child.SetInParent()
            stack.append((message, fields, seen, closer))
            message, fields, seen, closer = child, _table(child.DESCRIPTOR), set(), close
            i += 2
            continue
        if nxt != ":" or i + 2 >= n:
            raise _Decline
        value = convert(tokens[i + 2])
        if i + 3 < n and tokens[i + 3][0] in "\"'":
            raise _Decline  # adjacent strings concatenate in protobuf; a value followed by a string is an error
        if repeated:
            getattr(message, token).append(value)
        else:
            setattr(message, token, value)
        i += 3
    if stack:
        raise _Decline  # an unclosed message


def parse(text: str, message) -> bool:
    """Parse ``text`` into the empty ``message`` if it lies in the subset (see the module docstring).

    Returns:
        True with ``message`` filled exactly as ``google.protobuf.text_format.Parse`` fills it, or False with
        ``message`` cleared, for the caller to run protobuf's parser.
    """
    try:
        tokens = _TOKEN.findall(text)
        while tokens and not tokens[-1]:   # the end of the text (matched once more after trailing space)
            tokens.pop()
        _merge(tokens, message)
        return True
    except Exception:  # _Decline, or a value protobuf refuses (out of range): protobuf's parser will say why
        message.Clear()
        return False
