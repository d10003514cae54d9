"""The fast binary codec: .caffemodel, .solverstate and .binaryproto without blob data going through Python.

Python protobuf is far too slow for large repeated floats and refuses messages over 2 GB, so this module reads and
writes the protobuf wire format itself where the bulk is and lets protobuf handle the rest:

* Reading walks the top-level fields of the message (NetParameter, SolverState or BlobProto) over an ``mmap`` of
  the file. Each layer's ``blobs`` (V2 ``layer`` = field 100, blobs field 7; V1 ``layers`` = field 2, blobs field 6;
  V0 ``layers { layer {...} }``, blobs field 50) are cut out and decoded here; what remains of each layer (a few
  hundred bytes) is parsed by protobuf. Packed float data becomes an ``np.frombuffer`` view into the mapping: no
  copy, and only the pages a caller touches are read from disk. With ``copy=True`` each blob is instead read
  straight into an owned array by one plain read, the fastest way to get all the data into memory.
* Writing serialises each layer without blobs through protobuf and splices in the blob fields, whose length
  prefixes are computed from array sizes, so the data goes from the arrays to the file with no intermediate copy.

Blob encoding (BlobProto): 1-4 legacy num/channels/height/width, 5 ``data`` (packed float), 6 ``diff``, 7 ``shape``
(BlobShape.dim = field 1, packed int64), 8 ``double_data``, 9 ``double_diff``. Caffe's rules, mirrored here: a blob
with any legacy dimension set is 4-D from those four values; otherwise ``shape`` gives the dims, and no ``shape`` at
all means a 0-axis blob holding one value; ``double_data`` is used when non-empty, else ``data``. ``diff`` fields are
skipped (Caffe never writes them into snapshots).
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import DecodeError

from slim import proto as pb
from slim.errors import NetError, ParseError, ResourceError, WeightsError
from slim.io.atomic import atomic_write
from slim.io.limits import check_allocation, format_bytes, memory_limit
from slim.io.upgrade import upgrade_net

__all__ = [
    "CaffeModel", "LayerBlobs", "StreamedBlob", "read_caffemodel", "write_caffemodel", "read_solverstate",
    "write_solverstate",
    "read_blobproto", "write_blobproto",
]

# Caffe's ReadProtoFromBinaryFile raises protobuf's total-bytes limit to INT_MAX, and OpenCV does the same.
CAFFE_SIZE_LIMIT = 2**31 - 1
# Caffe's kMaxBlobAxes: Blob::Reshape refuses more axes.
MAX_BLOB_AXES = 32

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Field numbers of the messages walked here.
_NET_LAYERS, _NET_LAYER = 2, 100      # NetParameter: V1 layers, V2 layer
_V2_BLOBS = 7                         # LayerParameter.blobs
_V1_V0LAYER, _V1_BLOBS = 1, 6         # V1LayerParameter.layer (a V0 layer), .blobs
_V0_BLOBS = 50                        # V0LayerParameter.blobs
_STATE_HISTORY = 3                    # SolverState.history
_BLOB_DATA, _BLOB_DIFF, _BLOB_SHAPE, _BLOB_DOUBLE_DATA, _BLOB_DOUBLE_DIFF = 5, 6, 7, 8, 9
_SHAPE_DIM = 1                        # BlobShape.dim

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class LayerBlobs:
    """The stored blobs of one layer of a .caffemodel.

    Attributes:
        name: the layer name, by which weights are matched.
        type: the V2 type string after upgrade ("Convolution"); for a file read with ``upgrade=False``, a V1 layer
            reports its enum name ("CONVOLUTION") and a V0 layer its type string ("conv").
        blobs: float32 arrays (float64 where the file stores ``double_data``) in the stored shape. Unless read with
            ``copy=True`` they are read-only views into a memory mapping of the file: copy one (``np.array(b)``)
            before modifying it.
        legacy_shape: per blob, whether its shape came from the legacy num/channels/height/width fields (4-D).
    """

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)
    legacy_shape: list[bool] = field(default_factory=list)

    def __repr__(self) -> str:
        shapes = ", ".join(_shape_text(b.shape) + ("" if b.dtype == np.float32 else f" {b.dtype}") for b in self.blobs)
        return f"LayerBlobs({self.name!r} {self.type}: [{shapes}])"


@dataclass
class CaffeModel:
    """A .caffemodel split into its structure and its blobs.

    Attributes:
        path: the file read.
        net: the whole NetParameter, upgraded to V2 (unless read with ``upgrade=False``), with every ``blobs``
            field empty.
        layers: one entry per layer of ``net`` in file order, including layers without blobs.
    """

    path: str
    net: pb.NetParameter
    layers: list[LayerBlobs] = field(default_factory=list)

    def blobs_by_name(self) -> dict[str, LayerBlobs]:
        """Index the layers by name, resolving duplicate names the way Caffe's loader does.

        Caffe's ``Net::CopyTrainedLayersFrom`` copies every stored layer into the first net layer of the same
        name, so among stored layers sharing a name the last one wins. A duplicate without blobs (typically a
        TRAIN/TEST pair of data layers) never hides one that has blobs: Caffe would fail its blob-count check
        there, and OpenCV takes the first same-named layer that has blobs.

        Returns:
            layer name -> its LayerBlobs.
        """
        index: dict[str, LayerBlobs] = {}
        for layer in self.layers:
            if layer.blobs or layer.name not in index or not index[layer.name].blobs:
                index[layer.name] = layer
        return index

    def __repr__(self) -> str:
        with_blobs = sum(1 for layer in self.layers if layer.blobs)
        values = sum(b.size for layer in self.layers for b in layer.blobs)
        return (f"CaffeModel({self.path!r}, net {self.net.name!r}: {len(self.layers)} layers, {with_blobs} with "
                f"blobs, {values:,} values)")


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


# ----------------------------------------------------------------------------------------------------------------
# Wire-format reading


@dataclass
class _RawBlob:
    """A BlobProto as found on the wire, before its count is checked."""

    offset: int
    legacy: list = field(default_factory=lambda: [None] * 4)  # num, channels, height, width when present
    dims: list | None = None
    data: list = field(default_factory=list)         # float32 pieces in wire order: _Span or ndarray
    double_data: list = field(default_factory=list)  # float64 pieces


class _Span(NamedTuple):
    """Packed values in the file, not yet read: ``size`` values from byte ``offset``."""

    offset: int
    size: int


class _Wire:
    """Walks protobuf wire-format fields over a buffer and reports damage with the file name and byte offset."""

    def __init__(self, buf, path: str, kind: str, file=None):
        self.buf = buf
        self.path = path
        self.kind = kind
        self.size = len(buf)
        self.file = file  # an unbuffered file to read blob data from; None: views into ``buf``

    def corrupt(self, offset: int, problem: str) -> ParseError:
        hint = self.hint()
        advice = (f"{hint}; give the path of a binary {self.kind}" if hint else
                  "The file is truncated or corrupt; re-download it or export it again (an interrupted copy or write "
                  "leaves such a file)")
        return ParseError(f"{self.path} is not a readable {self.kind}: at byte {offset} {problem}. {advice}.")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf, start, result, shift = self.buf, pos, 0, 0
        while True:
            if pos >= end:
                raise self.corrupt(start, self._past_end("a varint", end))
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift >= 70:
                raise self.corrupt(start, "a varint runs over 10 bytes")

    def field(self, pos: int, end: int) -> tuple[int, int, int, int]:
        """Decode the field starting at ``pos``.

        Returns:
            (number, wire type, a, b): for a varint, a is its value; otherwise [a, b) is the payload. b is always
            the offset of the next field.
        """
        key, after_key = self.varint(pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise self.corrupt(pos, "a field has number 0, which protobuf never writes")
        if wire == _VARINT:
            value, after = self.varint(after_key, end)
            return number, wire, value, after
        if wire == _LEN:
            length, start = self.varint(after_key, end)
            size = length
        elif wire == _I64:
            start, size = after_key, 8
        elif wire == _I32:
            start, size = after_key, 4
        else:
            raise self.corrupt(pos, f"field {number} has wire type {wire}, which no Caffe message uses")
        if start + size > end:
            raise self.corrupt(pos, self._past_end(f"field {number} of {size} bytes", end, start + size))
        return number, wire, start, start + size

    def _past_end(self, what: str, end: int, needed: int | None = None) -> str:
        where = "the file" if end == self.size else "its enclosing message"
        need = f" (needs up to byte {needed}, {where} ends at byte {end})" if needed is not None else ""
        return f"{what} runs past the end of {where}{need}"

    def fixed_run(self, pos: int, end: int, tag: int, size: int, dtype: str) -> tuple[np.ndarray, int]:
        """Read consecutive unpacked fixed-size fields that share the one-byte ``tag``, starting at ``pos``.

        Unpacked repeated floats (tag byte, 4 bytes, tag byte, 4 bytes, ...) are legal on the wire; they are
        read as one strided view instead of field by field. The first field is known to be complete.

        Returns:
            (values copied into a contiguous array, offset after the run).
        """
        stride = size + 1
        count_max = (end - pos) // stride
        tags = np.frombuffer(self.buf, np.uint8, count=count_max * stride, offset=pos)[::stride]
        count, window = 0, 1024  # growing windows keep a short run from scanning the rest of the blob
        while count < count_max:
            chunk = tags[count:count + window]
            other = np.flatnonzero(chunk != tag)
            if other.size:
                count += int(other[0])
                break
            count += chunk.size
            window *= 2
        values = np.ndarray((count,), dtype, buffer=self.buf, offset=pos + 1, strides=(stride,))
        return np.array(values), pos + count * stride

    def values(self, piece, dtype: str) -> np.ndarray:
        """The values of one data piece: a view into the mapping, or an owned array read from the file."""
        if isinstance(piece, np.ndarray):
            return piece
        if self.file is None:
            return np.frombuffer(self.buf, dtype, count=piece.size, offset=piece.offset)
        out = np.empty(piece.size, dtype)
        view, done = memoryview(out.view(np.uint8)), 0
        self.file.seek(piece.offset)
        while done < len(view):  # a plain read into the array's memory: one copy, from the page cache
            got = self.file.readinto(view[done:])
            if not got:
                raise self.corrupt(piece.offset + done, "the file ended while being read (did it change?)")
            done += got
        return out

    def blob(self, start: int, end: int) -> _RawBlob:
        """Decode the BlobProto in [start, end); float payloads stay views into the buffer."""
        blob = _RawBlob(offset=start)
        pos = start
        while pos < end:
            number, wire, a, b = self.field(pos, end)
            if 1 <= number <= 4:
                self.expect(pos, number, wire, (_VARINT,), "BlobProto legacy dimension")
                blob.legacy[number - 1] = _signed(a)
            elif number in (_BLOB_DATA, _BLOB_DIFF, _BLOB_DOUBLE_DATA, _BLOB_DOUBLE_DIFF):
                double = number in (_BLOB_DOUBLE_DATA, _BLOB_DOUBLE_DIFF)
                size, dtype = (8, "<f8") if double else (4, "<f4")
                self.expect(pos, number, wire, (_LEN, _I64 if double else _I32), "BlobProto float data")
                if wire == _LEN:
                    if (b - a) % size:
                        raise self.corrupt(pos, f"packed field {number} holds {b - a} bytes, not a multiple of {size}")
                    values = _Span(a, (b - a) // size)
                elif a - pos == 1:  # one-byte tag: read the whole run of unpacked values at once
                    values, b = self.fixed_run(pos, end, self.buf[pos], size, dtype)
                else:
                    values = _Span(a, 1)
                if number == _BLOB_DATA:
                    blob.data.append(values)
                elif number == _BLOB_DOUBLE_DATA:
                    blob.double_data.append(values)
            elif number == _BLOB_SHAPE:
                self.expect(pos, number, wire, (_LEN,), "BlobProto.shape")
                # A repeated occurrence of a message field is merged into the first: the dims concatenate.
                blob.dims = (blob.dims or []) + self.shape(a, b)
            else:
                pass  # a field this codec does not know (e.g. a fork's raw_data): skipped, as protobuf would keep it
            pos = b
        return blob

    def shape(self, start: int, end: int) -> list[int]:
        dims, pos = [], start
        while pos < end:
            number, wire, a, b = self.field(pos, end)
            if number == _SHAPE_DIM:
                self.expect(pos, number, wire, (_VARINT, _LEN), "BlobShape.dim")
                if wire == _VARINT:
                    dims.append(_signed(a))
                else:
                    p = a
                    while p < b:
                        value, p = self.varint(p, b)
                        dims.append(_signed(value))
            pos = b
        return dims

    def expect(self, pos: int, number: int, wire: int, allowed: tuple, what: str) -> None:
        if wire not in allowed:
            expected = " or ".join(map(str, allowed))
            raise self.corrupt(pos, f"field {number} ({what}) has wire type {wire}, expected {expected}")

    def top_level(self, message_descriptor, pos: int, number: int, wire: int) -> None:
        """Check a top-level field against the message it should belong to, to reject files of another kind."""
        fd = message_descriptor.fields_by_number.get(number)
        if fd is None:
            raise self.corrupt(pos, f"field {number} is not a field of {message_descriptor.full_name}")
        allowed = {_wire_type(fd)}
        if _is_repeated(fd) and _wire_type(fd) != _LEN:
            allowed.add(_LEN)  # packed
        if wire not in allowed:
            raise self.corrupt(pos, f"field {number} ({message_descriptor.full_name}.{fd.name}) has wire type "
                                    f"{wire}, expected {' or '.join(map(str, sorted(allowed)))}")

    def hint(self) -> str:
        """Recognise files of another format by their first bytes."""
        head = bytes(self.buf[:64])
        if head.startswith(_HDF5_SIGNATURE):
            return ("This is an HDF5 file (Caffe's snapshot_format: HDF5), which slim does not read; snapshot with "
                    "snapshot_format: BINARYPROTO")
        # A binary NetParameter usually starts with "\n" (field 1, name), so text must not.
        if len(head) >= 8 and head[0] != 0x0A and all(32 <= c < 127 or c in b"\t\r\n" for c in head):
            return "The file looks like text (a prototxt?), not binary protobuf"
        return self.other_kind()

    def other_kind(self) -> str:
        """Recognise a caffemodel read as a solverstate and a solverstate read as a caffemodel (the two files a
        snapshot writes side by side), by walking the top-level fields; "" when the file is neither."""
        if getattr(self, "_probing", False):
            return ""          # field() failed inside this walk and asks corrupt() for a hint: none
        fields = {}
        pos = 0
        self._probing = True
        try:
            for _ in range(100000):
                if pos >= self.size:
                    break
                number, wire, a, b = self.field(pos, self.size)
                fields.setdefault(number, (wire, a, b))
                pos = b
            else:
                return ""
        except ParseError:
            return ""
        finally:
            self._probing = False

        def fits(descriptor) -> bool:
            for number, (wire, _, _) in fields.items():
                fd = descriptor.fields_by_number.get(number)
                if fd is None or wire not in ({_wire_type(fd), _LEN} if _is_repeated(fd) else {_wire_type(fd)}):
                    return False
            return True

        def text(number: int) -> str:
            wire, a, b = fields.get(number, (None, 0, 0))
            return bytes(self.buf[a:b]).decode("utf-8", "replace") if wire == _LEN else ""

        if self.kind != "solverstate" and _STATE_HISTORY in fields and fits(pb.SolverState.DESCRIPTOR):
            it = fields[1][1] if 1 in fields and fields[1][0] == 0 else "?"
            learned = text(2)
            return (f"This is a .solverstate (a solver snapshot at iteration {it}), not a {self.kind}: resume from it "
                    f"with --snapshot" + (f", or fine-tune from the weights it names, {learned}, with --weights"
                                          if learned else ""))
        if self.kind != "caffemodel" and (_NET_LAYER in fields or _NET_LAYERS in fields) \
                and fits(pb.NetParameter.DESCRIPTOR):
            name = text(1)
            return (f"This is a .caffemodel (the weights of net {name or '(unnamed)'}), not a {self.kind}: pass it as "
                    f"--weights; --snapshot resumes from the .solverstate written beside it")
        return ""


def _signed(value: int) -> int:
    """Protobuf writes a negative int32/int64 as its 64-bit two's complement varint."""
    return value - (1 << 64) if value >= 1 << 63 else value


_SCALAR_WIRE = {
    _descriptor.FieldDescriptor.TYPE_DOUBLE: _I64, _descriptor.FieldDescriptor.TYPE_FIXED64: _I64,
    _descriptor.FieldDescriptor.TYPE_SFIXED64: _I64, _descriptor.FieldDescriptor.TYPE_FLOAT: _I32,
    _descriptor.FieldDescriptor.TYPE_FIXED32: _I32, _descriptor.FieldDescriptor.TYPE_SFIXED32: _I32,
    _descriptor.FieldDescriptor.TYPE_STRING: _LEN, _descriptor.FieldDescriptor.TYPE_BYTES: _LEN,
    _descriptor.FieldDescriptor.TYPE_MESSAGE: _LEN,
}


def _wire_type(fd) -> int:
    return _SCALAR_WIRE.get(fd.type, _VARINT)


def _is_repeated(fd) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 5.28 (``label`` is gone in 7.x)
        return fd.is_repeated
    return fd.label == _descriptor.FieldDescriptor.LABEL_REPEATED


@contextlib.contextmanager
def _reading(path, kind: str, copy: bool) -> Iterator[_Wire]:
    """Map ``path`` read-only for walking; with ``copy``, also keep it open to read blob data into owned arrays.

    Errors name the file and say what to do.
    """
    text = os.fspath(path)
    try:
        f = open(text, "rb", buffering=0)
    except FileNotFoundError:
        raise ParseError(f"The {kind} {text} does not exist; check the path.") from None
    except IsADirectoryError:
        raise ParseError(f"The {kind} path {text} is a directory; give the path of the file.") from None
    except OSError as exc:
        raise ParseError(f"The {kind} {text} cannot be read: {exc.strerror or exc}.") from None
    except ValueError as exc:  # a NUL byte in the path
        raise ParseError(f"The {kind} path {text!r} cannot be opened ({exc}); give a path without NUL bytes.") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ParseError(f"{text} is empty (0 bytes), so it holds no {kind}; re-download it or export it again.")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, OverflowError) as exc:
            # Mapping reserves address space for the whole file: a (sparse) file larger than ulimit -v fails here.
            raise ResourceError(
                f"The {kind} {text} ({format_bytes(size)}) cannot be mapped into memory: "
                f"{getattr(exc, 'strerror', None) or exc}. This process may use at most {format_bytes(memory_limit())} "
                f"(physical memory, ulimit -v); check that this is the file meant, or raise the limit.") from None
        yield _Wire(buf, text, kind, file=f if copy else None)
    if copy:
        # Without copy the mapping outlives this function while views into it live, and is unmapped when the
        # last one goes; with copy nothing refers to it any more.
        with contextlib.suppress(BufferError):
            buf.close()


def _finish_blob(w: _Wire, raw: _RawBlob, where: str) -> tuple[np.ndarray, bool]:
    """Apply Caffe's BlobProto rules: shape (legacy 4-D, shape, or a 0-axis scalar) and value count.

    Everything is checked on the declared sizes before any value is read or any memory allocated.
    """
    legacy = any(d is not None for d in raw.legacy)
    dims = [d or 0 for d in raw.legacy] if legacy else list(raw.dims or [])
    if len(dims) > MAX_BLOB_AXES:
        raise w.corrupt(raw.offset, f"{where} has a shape of {len(dims)} axes; Caffe's blobs have at most "
                                    f"{MAX_BLOB_AXES} (kMaxBlobAxes)")
    if any(d < 0 for d in dims):
        raise w.corrupt(raw.offset, f"{where} has a negative dimension in shape {_shape_text(dims)}")
    pieces, dtype = (raw.double_data, "<f8") if sum(p.size for p in raw.double_data) else (raw.data, "<f4")
    stored = sum(p.size for p in pieces)
    count = math.prod(dims)  # Python integers: no overflow; 1 for a 0-axis blob
    if stored != count:
        raise ParseError(
            f"{w.path}: {where} (byte {raw.offset}) declares shape {_shape_text(dims)}, that is {count} values, but "
            f"stores {stored}. The file is corrupt or its writer is broken; export the weights again.")
    if w.file is not None or len(pieces) > 1:  # an owned array is made: bounded before it is allocated
        check_allocation(count * np.dtype(dtype).itemsize, f"{w.path}: {where} (shape {_shape_text(dims)}) needs",
                         "Check that this is the file meant; a blob this large cannot be loaded on this machine.")
    values = [w.values(p, dtype) for p in pieces]
    values = values[0] if len(values) == 1 else (np.concatenate(values) if values else np.empty(0, dtype))
    return values.reshape(dims), legacy


# ----------------------------------------------------------------------------------------------------------------
# .caffemodel


@dataclass
class _RawLayer:
    field_number: int       # _NET_LAYER (V2) or _NET_LAYERS (V1/V0)
    index: int              # position within that repeated field
    blobs: list             # _RawBlob
    name: str = ""
    type: str = ""


def _strip_layer(w: _Wire, start: int, end: int, blobs_field: int, raw_blobs: list) -> bytes:
    """Return the layer message in [start, end) without its blob fields, which are appended to ``raw_blobs``."""
    kept, pos = [], start
    v0_blobs: list = []
    while pos < end:
        number, wire, a, b = w.field(pos, end)
        if number == blobs_field:
            w.expect(pos, number, wire, (_LEN,), "blobs")
            raw_blobs.append(w.blob(a, b))
        elif blobs_field == _V1_BLOBS and number == _V1_V0LAYER and wire == _LEN:
            inner = _strip_layer(w, a, b, _V0_BLOBS, v0_blobs)
            kept.append(_key(_V1_V0LAYER) + _varint(len(inner)) + inner)
        else:
            kept.append(w.buf[pos:b])
        pos = b
    if v0_blobs:
        # Caffe's V0 -> V1 upgrade rebuilds the layer from its nested V0 layer, blobs included.
        raw_blobs[:] = v0_blobs
    return b"".join(kept)


def read_caffemodel(path, *, upgrade: bool = True, copy: bool = False) -> CaffeModel:
    """Read a .caffemodel: its structure through protobuf, its blobs as zero-copy views into the file.

    Args:
        path: the .caffemodel (a binary NetParameter), any size, including over 2 GB.
        upgrade: run Caffe's upgrades (V0/V1 layers, input headers, ...) through ``slim.io.upgrade.upgrade_net``,
            as Caffe does for every weight file; blobs follow their layers by name and order.
        copy: read every blob into an owned, writable, aligned array (one plain read per blob) instead of
            returning views. Faster when all the data will be used anyway (loading a net), and no mapping stays
            open.

    Returns:
        The CaffeModel. Without ``copy``, its arrays are read-only views into a memory mapping of the file, which
        stays mapped while any of them lives: only the pages touched are read; replacing the file through
        ``write_caffemodel`` (a rename) is safe meanwhile, truncating it in place is not.

    Raises:
        ParseError: the file is missing, empty, truncated, corrupt, of another kind, or a blob's value count does
            not match its shape.
    """
    with _reading(path, "caffemodel", copy) as w:
        return _read_caffemodel(w, upgrade)


def _read_caffemodel(w: _Wire, upgrade: bool) -> CaffeModel:
    buf, path = w.buf, w.path
    chunks: list[tuple[int, bytes]] = []
    raw_layers: list[_RawLayer] = []
    counts = {_NET_LAYER: 0, _NET_LAYERS: 0}
    pos = 0
    while pos < w.size:
        number, wire, a, b = w.field(pos, w.size)
        w.top_level(pb.NetParameter.DESCRIPTOR, pos, number, wire)
        if number in counts:
            raw = _RawLayer(number, counts[number], [])
            counts[number] += 1
            content = _strip_layer(w, a, b, _V2_BLOBS if number == _NET_LAYER else _V1_BLOBS, raw.blobs)
            raw_layers.append(raw)
            chunks.append((pos, _key(number) + _varint(len(content)) + content))
        else:
            chunks.append((pos, buf[pos:b]))
        pos = b

    net = _parse_structure(w, pb.NetParameter, chunks)
    for raw in raw_layers:
        raw.name, raw.type = _layer_identity(net, raw)
    layers = [_finish_layer(w, raw.name, raw.type, raw.blobs) for raw in raw_layers]
    if upgrade:
        upgrade_net(net, source=path)
        layers = _pair_upgraded(path, net, layers)
    return CaffeModel(path=path, net=net, layers=layers)


def _parse_structure(w: _Wire, message_class, chunks: list[tuple[int, bytes]]):
    """Parse the blob-free remainder with protobuf; on failure, find the top-level field at fault."""
    try:
        message = message_class.FromString(b"".join(c for _, c in chunks))
    except DecodeError:
        for offset, chunk in chunks:
            try:
                message_class.FromString(chunk)
            except DecodeError as exc:
                raise w.corrupt(offset, f"the top-level field here does not parse as part of "
                                        f"{message_class.DESCRIPTOR.full_name} ({exc})") from None
        raise w.corrupt(0, f"the fields do not parse together as {message_class.DESCRIPTOR.full_name}") from None
    _check_text(w, message, message_class.DESCRIPTOR.name)
    return message


def _check_text(w: _Wire, message, where: str) -> None:
    """Refuse string fields that are not UTF-8: proto2 parsing does not check them and hands back bytes, which
    would travel on as layer names or paths. Only messages that can hold a string are visited; the schema has no
    recursive messages, so the recursion is shallow."""
    for fd, value in message.ListFields():
        kind, repeated = _text_role(fd)
        if kind is None:
            continue
        for i, item in enumerate(value if repeated else [value]):
            if kind == "string":
                if isinstance(item, bytes):
                    raise ParseError(f"{w.path} is not a readable {w.kind}: its text field {where}.{fd.name} holds "
                                     f"{item[:40]!r}, which is not UTF-8 text. The file is corrupt; re-download it "
                                     f"or export it again.")
            else:
                _check_text(w, item, f"{where}.{fd.name}" + (f"[{i}]" if repeated else ""))


@functools.lru_cache(maxsize=None)
def _text_role(fd) -> tuple[Optional[str], bool]:
    """("string" | "message" that can hold one | None, repeated) for a field descriptor."""
    if fd.type == _descriptor.FieldDescriptor.TYPE_STRING:
        return "string", _is_repeated(fd)
    if fd.type == _descriptor.FieldDescriptor.TYPE_MESSAGE and _holds_text(fd.message_type):
        return "message", _is_repeated(fd)
    return None, False


@functools.lru_cache(maxsize=None)
def _holds_text(descriptor, _seen: frozenset = frozenset()) -> bool:
    """Whether a message of this type can hold a string field, directly or in a nested message."""
    if descriptor.full_name in _seen:
        return False
    seen = _seen | {descriptor.full_name}
    return any(fd.type == _descriptor.FieldDescriptor.TYPE_STRING or
               (fd.type == _descriptor.FieldDescriptor.TYPE_MESSAGE and _holds_text(fd.message_type, seen))
               for fd in descriptor.fields)


def _layer_identity(net, raw: _RawLayer) -> tuple[str, str]:
    if raw.field_number == _NET_LAYER:
        layer = net.layer[raw.index]
        return layer.name, layer.type
    layer = net.layers[raw.index]
    if layer.HasField("layer"):  # V0: the nested layer carries name and type string
        return layer.layer.name, layer.layer.type
    return layer.name, pb.V1LayerParameter.LayerType.Name(layer.type) if layer.HasField("type") else ""


def _finish_layer(w: _Wire, name: str, type_: str, raw_blobs: list) -> LayerBlobs:
    layer = LayerBlobs(name=name, type=type_)
    for i, raw in enumerate(raw_blobs):
        array, legacy = _finish_blob(w, raw, f"blob {i} of layer '{name}'")
        layer.blobs.append(array)
        layer.legacy_shape.append(legacy)
    return layer


def _pair_upgraded(path: str, net, found: list[LayerBlobs]) -> list[LayerBlobs]:
    """Give each upgraded V2 layer the blobs its source layer had.

    The upgrade keeps layers in order and keeps their names; it may insert layers without blobs (the Input layer
    made from an input header, at the front) and fold V0 "padding" layers (no blobs) into the next layer. So each
    upgraded layer takes the next stored layer of its name, skipping only stored layers without blobs.
    """
    result, j = [], 0
    for layer in net.layer:
        k = j
        while k < len(found) and found[k].name != layer.name and not found[k].blobs:
            k += 1
        if k < len(found) and found[k].name == layer.name:
            result.append(LayerBlobs(layer.name, layer.type, found[k].blobs, found[k].legacy_shape))
            j = k + 1
        else:
            result.append(LayerBlobs(layer.name, layer.type))
    lost = [f.name for f in found[j:] if f.blobs]
    if lost:
        raise ParseError(
            f"Upgrading {path} to a V2 net lost the layers {lost}, which carry blobs (the upgrade renamed, reordered "
            f"or dropped them). Read it with upgrade=False and report the file.")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Wire-format writing


class StreamedBlob:
    """A float32 blob that ``write_caffemodel`` writes piece by piece, never holding it whole.

    For a blob computed from others (a pruned weight cut from the original): the values are produced in blocks
    into a small reused buffer and written as they come, so a large blob costs no fresh memory (on some machines
    first-touching hundreds of MB of new pages takes longer than writing them).

    Args:
        shape: the blob's shape.
        pieces: called once per write; yields float32 arrays whose values, in order, are the blob's values in C
            order. A piece may be a buffer that is reused once the next piece is asked for.
    """

    dtype = np.dtype("<f4")

    def __init__(self, shape: Sequence[int], pieces: Callable[[], Iterable[np.ndarray]]):
        self.shape = tuple(int(d) for d in shape)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self._pieces = pieces

    def __repr__(self) -> str:
        return f"StreamedBlob({_shape_text(self.shape)})"

    def write_to(self, f) -> None:
        """Write the values; raises WeightsError when the pieces do not add up to the shape."""
        written = 0
        for piece in self._pieces():
            piece = np.asarray(piece)
            if piece.dtype != self.dtype or not piece.flags.c_contiguous:
                piece = np.ascontiguousarray(piece, dtype=self.dtype)
            f.write(piece.reshape(-1).view(np.uint8))
            written += piece.nbytes
        if written != self.nbytes:
            raise WeightsError(f"A streamed blob of shape {_shape_text(self.shape)} produced {written:,} bytes, not "
                               f"{self.nbytes:,}; the file was not written.")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int = _LEN) -> bytes:
    return _varint(number << 3 | wire)


def _is_tensor(value) -> bool:
    """Whether ``value`` is a torch tensor, found without importing torch (this module must not need it)."""
    return type(value).__module__.split(".")[0] == "torch"


def _as_array(value, where: str, keep_double: bool) -> np.ndarray:
    """A blob value as a C-contiguous little-endian float32 array (float64 with ``keep_double``); a StreamedBlob
    stays one."""
    if isinstance(value, StreamedBlob):
        return value
    if _is_tensor(value):
        value = value.detach().cpu()
        if str(value.dtype) not in ("torch.float32", "torch.float64"):
            value = value.float()  # bfloat16 and friends have no numpy dtype
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise WeightsError(f"{where} has dtype {array.dtype}; Caffe blobs hold real numbers. Convert it to float32.")
    dtype = "<f8" if keep_double and array.dtype == np.float64 else "<f4"
    return np.asarray(array, dtype=dtype, order="C")  # not ascontiguousarray: it turns 0-axis arrays into 1-axis


def _blob_parts(array: np.ndarray) -> list:
    """The content of a BlobProto holding ``array``, as bytes and array parts in field-number order.

    A 0-axis array gets no ``shape`` field at all: Caffe reads that as count 1, while an empty ``shape {}``
    crashes OpenCV's importer.
    """
    if array.ndim:
        dims = b"".join(_varint(int(d)) for d in array.shape)
        shape = _key(_SHAPE_DIM) + _varint(len(dims)) + dims
        shape_field = _key(_BLOB_SHAPE) + _varint(len(shape)) + shape
    else:
        shape_field = b""
    data_field = [_key(_BLOB_DOUBLE_DATA if array.dtype == np.float64 else _BLOB_DATA) + _varint(array.nbytes),
                  array] if array.size else []  # protobuf omits an empty packed field
    # Field-number order: data (5), shape (7), double_data (8).
    parts = [shape_field] + data_field if array.dtype == np.float64 else data_field + [shape_field]
    return [p for p in parts if _nbytes(p)]


def _nbytes(part) -> int:
    return part.nbytes if isinstance(part, (np.ndarray, StreamedBlob)) else len(part)


def _field_parts(number: int, content: list) -> list:
    """Wrap parts as one length-delimited field."""
    return [_key(number) + _varint(sum(_nbytes(p) for p in content))] + content


def _split_before(data: bytes, number: int) -> int:
    """Offset of the first field numbered above ``number`` in serialised ``data`` (protobuf writes fields in
    number order, so splicing blobs there reproduces its byte-exact output)."""
    w = _Wire(data, "<serialised message>", "message")
    pos = 0
    while pos < len(data):
        field_number, _, _, b = w.field(pos, len(data))
        if field_number > number:
            return pos
        pos = b
    return len(data)


def _write_parts(f, parts: list) -> None:
    """Write parts in order; small byte strings are gathered, arrays go straight from their memory."""
    pending: list[bytes] = []
    for part in parts:
        if isinstance(part, (np.ndarray, StreamedBlob)):
            if pending:
                f.write(b"".join(pending))
                pending = []
            if isinstance(part, StreamedBlob):
                part.write_to(f)
            else:
                f.write(part.reshape(-1).view(np.uint8))
        else:
            pending.append(part)
    if pending:
        f.write(b"".join(pending))


def _write_file(path, parts: list, kind: str) -> None:
    total = sum(_nbytes(p) for p in parts)
    if total > CAFFE_SIZE_LIMIT:
        warnings.warn(
            f"{os.fspath(path)} is {total:,} bytes, over 2 GB: BVLC Caffe and OpenCV cannot read a {kind} over "
            f"{CAFFE_SIZE_LIMIT:,} bytes (protobuf's INT_MAX limit); slim reads it back.", stacklevel=3)
    with atomic_write(path) as f:
        _write_parts(f, parts)


def write_caffemodel(path, net: pb.NetParameter, blobs: Mapping[str, Sequence[Any]], *,
                     keep_double: bool = False) -> None:
    """Write ``net`` with ``blobs`` as a .caffemodel that Caffe, OpenCV and protobuf read.

    Each layer is serialised by protobuf without blobs, and the blob fields (``data`` packed float32, then
    ``shape``) are spliced in at their field-number position, so the bytes equal protobuf's own serialisation.
    The write is streamed (arrays are written from their memory, length prefixes computed from sizes) and atomic.

    Args:
        path: the file to write.
        net: a V2 NetParameter; any blobs already in it are ignored.
        blobs: layer name -> that layer's blobs (numpy arrays, torch tensors, nested lists or StreamedBlobs), in
            Caffe's blob order. Layers missing here are written without blobs. Every layer of a duplicated name
            gets the blobs.
        keep_double: store float64 arrays as ``double_data``. By default every blob is stored as float32
            ``data``, because Caffe nets are float and OpenCV reads only ``data``.

    Raises:
        NetError: ``net`` still has V1 ``layers``.
        WeightsError: a name in ``blobs`` is not a layer of ``net``, or a value is not a list of real arrays.

    Warns:
        UserWarning: the file exceeds 2 GB, which Caffe and OpenCV cannot read.
    """
    if len(net.layers):
        raise NetError(f"write_caffemodel({os.fspath(path)!r}) got a net with V1 'layers'; upgrade it to V2 with "
                       f"slim.io.upgrade_net first.")
    names = {layer.name for layer in net.layer}
    unknown = [name for name in blobs if name not in names]
    if unknown:
        raise WeightsError(
            f"Blobs for {unknown} cannot be written to {os.fspath(path)}: net '{net.name}' has no layer so named "
            f"(its layers: {sorted(names)[:20]}{' ...' if len(names) > 20 else ''}). Fix the names in the blobs.")
    arrays: dict[str, list[np.ndarray]] = {}
    for name, values in blobs.items():
        if isinstance(values, np.ndarray) or _is_tensor(values):
            raise WeightsError(f"The blobs of layer '{name}' must be a list of arrays, got a single array; wrap it "
                               f"in a list ([weight] or [weight, bias]).")
        arrays[name] = [_as_array(v, f"Blob {i} of layer '{name}'", keep_double) for i, v in enumerate(values)]

    head = pb.NetParameter()
    head.CopyFrom(net)
    head.ClearField("layer")
    parts: list = [head.SerializeToString()]
    for layer in net.layer:
        if len(layer.blobs):
            layer = _copy_without(layer, "blobs")
        data = layer.SerializeToString()
        split = _split_before(data, _V2_BLOBS)
        content = [data[:split]]
        for array in arrays.get(layer.name, ()):
            content += _field_parts(_V2_BLOBS, _blob_parts(array))
        content.append(data[split:])
        parts += _field_parts(_NET_LAYER, content)
    _write_file(path, parts, "caffemodel")


def _copy_without(message, field_name: str):
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField(field_name)
    return copy


# ----------------------------------------------------------------------------------------------------------------
# .solverstate and .binaryproto


def read_solverstate(path, *, copy: bool = False) -> tuple[pb.SolverState, list[np.ndarray]]:
    """Read a .solverstate: the SolverState (slim's ``slim_state`` included) and its history blobs.

    Args:
        path: a binary SolverState file.
        copy: read the history into owned, writable arrays instead of views (see ``read_caffemodel``).

    Returns:
        (state with ``history`` cleared, history arrays in file order). Without ``copy``, the arrays are read-only
        views into a memory mapping of the file.

    Raises:
        ParseError: missing, empty, truncated or corrupt file, or a history blob whose count mismatches its shape.
    """
    with _reading(path, "solverstate", copy) as w:
        return _read_solverstate(w)


def _read_solverstate(w: _Wire) -> tuple[pb.SolverState, list[np.ndarray]]:
    buf, chunks, raw_history, pos = w.buf, [], [], 0
    while pos < w.size:
        number, wire, a, b = w.field(pos, w.size)
        w.top_level(pb.SolverState.DESCRIPTOR, pos, number, wire)
        if number == _STATE_HISTORY:
            raw_history.append(w.blob(a, b))
        else:
            chunks.append((pos, buf[pos:b]))
        pos = b
    state = _parse_structure(w, pb.SolverState, chunks)
    history = [_finish_blob(w, raw, f"history blob {i}")[0] for i, raw in enumerate(raw_history)]
    return state, history


def write_solverstate(path, state: pb.SolverState, history: Sequence[Any], *, keep_double: bool = False) -> None:
    """Write a .solverstate: ``state``'s fields (history replaced by ``history``), streamed and atomic.

    Args:
        path: the file to write.
        state: a SolverState; its own ``history`` is ignored.
        history: the update-history blobs, one per learnable param in Caffe's order (two for AdaDelta/Adam).
        keep_double: store float64 arrays as ``double_data`` instead of float32 ``data``.
    """
    if isinstance(history, np.ndarray) or _is_tensor(history):
        raise WeightsError(f"The history for {os.fspath(path)} must be a list of arrays, got a single array.")
    arrays = [_as_array(v, f"History blob {i}", keep_double) for i, v in enumerate(history)]
    data = (_copy_without(state, "history") if len(state.history) else state).SerializeToString()
    split = _split_before(data, _STATE_HISTORY)
    parts: list = [data[:split]]
    for array in arrays:
        parts += _field_parts(_STATE_HISTORY, _blob_parts(array))
    parts.append(data[split:])
    _write_file(path, parts, "solverstate")


def read_blobproto(path) -> np.ndarray:
    """Read a .binaryproto (one BlobProto, e.g. a mean file) as an array.

    A legacy mean file stores num/channels/height/width and is returned 4-D (1xCxHxW), as Caffe reads it.

    Returns:
        A writable float32 (float64 for ``double_data``) array owned by the caller; the file is closed.

    Raises:
        ParseError: missing, empty, truncated or corrupt file, or a value count that mismatches the shape.
    """
    with _reading(path, "binaryproto", copy=True) as w:
        return _finish_blob(w, w.blob(0, w.size), "the blob")[0]


def write_blobproto(path, array, *, keep_double: bool = False) -> None:
    """Write one array as a .binaryproto (``data`` packed float32 plus ``shape``), atomically.

    Args:
        path: the file to write.
        array: a numpy array or torch tensor; a 0-axis array is written without ``shape`` (Caffe reads count 1).
        keep_double: store a float64 array as ``double_data`` instead of float32 ``data``.
    """
    _write_file(path, _blob_parts(_as_array(array, "The blob", keep_double)), "binaryproto")
