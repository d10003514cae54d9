"""Layers that combine, split or reshape blobs: Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Silence."""

from slim import proto as pb
from slim.layers._lazy import torch
from slim.layers.base import ChannelRole, Layer, canonical_axis, count, register

__all__ = ["Eltwise", "Concat", "Slice", "Split", "Flatten", "Reshape", "Crop", "Silence"]


@register
class Eltwise(Layer):
    """SUM (with optional coeff, one per bottom), PROD or MAX of bottoms of identical shape (no broadcasting). MAX's
    gradient follows Caffe's mask (see ``forward``)."""

    type = "Eltwise"
    num_bottoms = (2, None)

    def setup(self):
        ep = self.param.eltwise_param
        shape = self.bottom_shapes[0]
        for i, s in enumerate(self.bottom_shapes[1:], 1):
            if s != shape:
                raise ValueError(f"bottom {i} ({self.param.bottom[i]!r}) has shape {s}, bottom 0 "
                                 f"({self.param.bottom[0]!r}) has {shape}; Eltwise needs identical shapes")
        # Caffe checks the coeff count for every operation, then refuses coeff for PROD only (MAX ignores it).
        if ep.coeff and len(ep.coeff) != len(self.bottom_shapes):
            raise ValueError(f"coeff has {len(ep.coeff)} values for {len(self.bottom_shapes)} bottoms; give one per "
                             f"bottom")
        if ep.coeff and ep.operation == pb.EltwiseParameter.PROD:
            raise ValueError("coeff is only allowed for operation SUM (MAX ignores it); remove it from this PROD layer")
        self.coeff = tuple(ep.coeff) or (1.0,) * len(self.bottom_shapes)  # a tuple: torch.compile traces it
        self.top_shapes = [shape]

    def channel_role(self) -> ChannelRole:
        # SUM, PROD and MAX all map zeros to zero; PROD maps a zero in any one bottom to zero.
        prod = self.param.eltwise_param.operation == pb.EltwiseParameter.PROD
        return ChannelRole("ties", pointwise=True, product=prod)

    def forward(self, blobs, bottoms):
        ep = self.param.eltwise_param
        if ep.operation == pb.EltwiseParameter.SUM:
            coeff = self.coeff
            y = bottoms[0] if coeff[0] == 1 else bottoms[0] * coeff[0]
            for c, x in zip(coeff[1:], bottoms[1:]):
                y = y + x if c == 1 else y + c * x
            return [y]
        if ep.operation == pb.EltwiseParameter.PROD:
            y = bottoms[0]
            for x in bottoms[1:]:
                y = y * x
            return [y]
        # MAX as Caffe's forward builds its mask, so the gradient goes wholly to one bottom: bottom 1 unless bottom 0 is
        # strictly greater (a 0/1 tie goes to bottom 1), then bottom k >= 2 only where it is strictly greater than
        # the running max (a later tie stays with the earlier bottom). torch.maximum would split a tie's gradient.
        y = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
        for x in bottoms[2:]:
            y = torch.where(x > y, x, y)
        return [y]

    def macs(self):
        return count(self.bottom_shapes[0]) * (len(self.bottom_shapes) - 1)


@register
class Concat(Layer):
    """Concatenation along ``axis`` (or the deprecated ``concat_dim``; both set is an error)."""

    type = "Concat"
    num_bottoms = (1, None)

    def setup(self):
        cp = self.param.concat_param
        if cp.HasField("axis") and cp.HasField("concat_dim"):
            raise ValueError("give either axis or concat_dim, not both")
        shape = self.bottom_shapes[0]
        axis = cp.concat_dim if cp.HasField("concat_dim") else cp.axis
        self.axis = canonical_axis(axis, len(shape), "concat_param")
        total = 0
        for i, s in enumerate(self.bottom_shapes):
            if len(s) != len(shape) or any(a != b for j, (a, b) in enumerate(zip(s, shape)) if j != self.axis):
                raise ValueError(f"bottom {i} ({self.param.bottom[i]!r}) has shape {s}, which does not match bottom 0 "
                                 f"{shape} outside axis {self.axis}")
            total += s[self.axis]
        self.top_shapes = [shape[:self.axis] + (total,) + shape[self.axis + 1:]]

    def channel_role(self) -> ChannelRole:
        if self.axis == 1:
            return ChannelRole("concat")
        # Joined along another axis, the bottoms' channels line up: they share indices.
        return ChannelRole("ties", keeps_constants=False)

    def forward(self, blobs, bottoms):
        return [bottoms[0] if len(bottoms) == 1 else torch.cat(bottoms, self.axis)]

    def macs(self):
        return 0  # copies bottoms side by side: data movement, no arithmetic


@register
class Slice(Layer):
    """Split a blob along ``axis`` at ``slice_point`` (tops - 1 increasing points), or evenly when none are given."""

    type = "Slice"
    num_tops = (1, None)

    def setup(self):
        sp = self.param.slice_param
        if sp.HasField("axis") and sp.HasField("slice_dim"):
            raise ValueError("give either axis or slice_dim, not both")
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(sp.slice_dim if sp.HasField("slice_dim") else sp.axis, len(shape), "slice_param")
        n = shape[self.axis]
        tops = len(self.param.top)
        if sp.slice_point:
            points = list(sp.slice_point)
            if len(points) != tops - 1:
                raise ValueError(f"{len(points)} slice points for {tops} tops; give tops - 1 points")
            if any(b <= a for a, b in zip([0] + points, points + [n])):
                raise ValueError(f"slice points {points} must increase strictly within (0, {n})")
            sizes = [b - a for a, b in zip([0] + points, points + [n])]
        else:
            if n % tops:
                raise ValueError(f"axis {self.axis} of size {n} cannot be split evenly into {tops} tops; give "
                                 f"slice_point")
            sizes = [n // tops] * tops
        self.sizes = sizes
        self.top_shapes = [shape[:self.axis] + (s,) + shape[self.axis + 1:] for s in sizes]

    def channel_role(self) -> ChannelRole:
        return ChannelRole("slice") if self.axis == 1 else ChannelRole("passthrough")

    def forward(self, blobs, bottoms):
        return list(torch.split(bottoms[0], self.sizes, self.axis))

    def macs(self):
        return 0  # copies parts of the bottom: data movement, no arithmetic


@register
class Split(Layer):
    """Copy the bottom to every top (gradients are summed)."""

    type = "Split"
    num_tops = (1, None)

    def setup(self):
        self.top_shapes = [self.bottom_shapes[0]] * len(self.param.top)

    def channel_role(self) -> ChannelRole:
        return ChannelRole("passthrough")

    def forward(self, blobs, bottoms):
        return [bottoms[0]] * len(self.top_shapes)

    def macs(self):
        return 0  # Caffe's Split shares the bottom's data with every top: no arithmetic


@register
class Flatten(Layer):
    """Merge axes ``axis`` through ``end_axis`` into one."""

    type = "Flatten"
    in_place_ok = False

    def setup(self):
        fp = self.param.flatten_param
        shape = self.bottom_shapes[0]
        start = canonical_axis(fp.axis, len(shape), "flatten_param")
        end = canonical_axis(fp.end_axis, len(shape), "flatten_param end_axis")
        if end < start:
            raise ValueError(f"end_axis {fp.end_axis} comes before axis {fp.axis}")
        self.start, self.end = start, end
        self.top_shapes = [shape[:start] + (count(shape, start, end + 1),) + shape[end + 1:]]

    def channel_role(self) -> ChannelRole:
        if self.start == 1:  # C-order: channel c becomes the run of count(shape[2:end+1]) values at c * that
            return ChannelRole("flatten", repeat=count(self.bottom_shapes[0], 2, self.end + 1))
        return ChannelRole("passthrough") if self.start >= 2 else ChannelRole("barrier")

    def forward(self, blobs, bottoms):
        return [torch.flatten(bottoms[0], self.start, self.end)]

    def macs(self):
        return 0  # Caffe shares the bottom's data under a new shape: no arithmetic


@register
class Reshape(Layer):
    """Replace axes [axis, axis + num_axes) by ``shape``: 0 copies the bottom's dimension, -1 is inferred."""

    type = "Reshape"

    def setup(self):
        rp = self.param.reshape_param
        shape = self.bottom_shapes[0]
        nd = len(shape)
        start = rp.axis + nd + 1 if rp.axis < 0 else rp.axis
        if not 0 <= start <= nd:
            raise ValueError(f"axis {rp.axis} is out of range for a {nd}-D bottom")
        if rp.num_axes < -1:
            raise ValueError(f"num_axes must be >= -1, found {rp.num_axes}")
        end = nd if rp.num_axes == -1 else start + rp.num_axes
        if end > nd:
            raise ValueError(f"axis {rp.axis} + num_axes {rp.num_axes} exceeds the {nd} bottom axes")
        dims = list(rp.shape.dim)
        if dims.count(-1) > 1:
            raise ValueError("at most one dimension may be -1")
        new = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= nd:
                    raise ValueError(f"dim {i} is 0 (copy) but the bottom has no axis {start + i}")
                new.append(shape[start + i])
            elif d < -1:
                raise ValueError(f"dimension {d} is invalid; use positive sizes, 0 (copy) or -1 (infer)")
            else:
                new.append(d)
        out = list(shape[:start]) + new + list(shape[end:])
        if -1 in out:
            known = count([d for d in out if d != -1])
            total = count(shape)
            if known == 0 or total % known:
                raise ValueError(f"cannot infer the -1 dimension: {total} elements do not divide into {out}")
            out[out.index(-1)] = total // known
        if count(out) != count(shape):
            raise ValueError(f"the new shape {tuple(out)} has {count(out)} elements, the bottom {shape} has "
                             f"{count(shape)}")
        self.top_shapes = [tuple(out)]

    def channel_role(self) -> ChannelRole:
        bottom, top = self.bottom_shapes[0], self.top_shapes[0]
        if len(bottom) < 2 or len(top) < 2 or top[0] != bottom[0]:
            return ChannelRole("barrier")
        rp = self.param.reshape_param
        start = rp.axis + len(bottom) + 1 if rp.axis < 0 else rp.axis
        dims = list(rp.shape.dim)
        if start <= 1 < start + len(dims):
            if dims[1 - start] not in (0, -1):
                return ChannelRole("barrier")  # a written channel count would be wrong once channels are removed
        elif start < 2:
            return ChannelRole("barrier")
        inner_bottom, inner_top = count(bottom, 2), count(top, 2)
        if top[1] == bottom[1]:
            return ChannelRole("passthrough")
        # Merging the channel axis with the axes after it (C-order): each bottom channel becomes a run of top ones.
        if inner_top and inner_bottom % inner_top == 0 and top[1] == bottom[1] * (inner_bottom // inner_top):
            return ChannelRole("flatten", repeat=inner_bottom // inner_top)
        return ChannelRole("barrier")

    def forward(self, blobs, bottoms):
        x = bottoms[0]
        return [x.reshape((x.shape[0],) + self.top_shapes[0][1:] if self.top_shapes[0][:1] == self.bottom_shapes[0][:1]
                          else self.top_shapes[0])]

    def macs(self):
        return 0  # Caffe shares the bottom's data under a new shape: no arithmetic


@register
class Crop(Layer):
    """Crop bottom[0] to the shape of bottom[1] from ``axis`` on, at ``offset`` (one value for all axes, or one per
    cropped axis; default 0)."""

    type = "Crop"
    num_bottoms = (2, 2)

    def setup(self):
        cp = self.param.crop_param
        a, b = self.bottom_shapes
        if len(a) != len(b):
            raise ValueError(f"bottoms have {len(a)} and {len(b)} axes; they must have the same number")
        axis = canonical_axis(cp.axis, len(a), "crop_param")
        n = len(a) - axis
        offsets = list(cp.offset)
        if len(offsets) not in (0, 1, n):
            raise ValueError(f"give 0, 1 or {n} offsets, found {len(offsets)}")
        offsets = [offsets[0]] * n if len(offsets) == 1 else (offsets or [0] * n)
        for i, off in enumerate(offsets):
            if off + b[axis + i] > a[axis + i]:
                raise ValueError(f"crop of size {b[axis + i]} at offset {off} exceeds axis {axis + i} of size "
                                 f"{a[axis + i]}")
        self.axis, self.offsets = axis, offsets
        self.top_shapes = [a[:axis] + b[axis:]]

    def channel_role(self) -> ChannelRole:
        # Cropping spatial axes keeps bottom 0's channels; bottom 1 only lends its spatial shape.
        return ChannelRole("passthrough") if self.axis >= 2 else ChannelRole("barrier")

    def forward(self, blobs, bottoms):
        x = bottoms[0]
        index = [slice(None)] * self.axis + [slice(o, o + s) for o, s in zip(self.offsets, self.top_shapes[0][self.axis:])]
        return [x[tuple(index)]]

    def macs(self):
        return 0  # copies a window of the bottom: data movement, no arithmetic


@register
class Silence(Layer):
    """Consume bottoms and produce nothing (keeps unused blobs from becoming net outputs)."""

    type = "Silence"
    num_bottoms = (1, None)
    num_tops = (0, 0)

    def setup(self):
        self.top_shapes = []

    def channel_role(self) -> ChannelRole:
        return ChannelRole("sink")

    def forward(self, blobs, bottoms):
        return []

    def macs(self):
        return 0  # consumes its bottoms and computes nothing
