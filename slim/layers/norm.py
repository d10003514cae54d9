"""Normalisation and per-channel affine layers: BatchNorm, Scale, Bias, LRN."""

import copy

from slim import proto as pb
from slim.layers._lazy import F, torch
from slim.layers.base import ChannelRole, Layer, canonical_axis, count, register
from slim.layers.fillers import constant_filler, fill

__all__ = ["BatchNorm", "Scale", "Bias", "LRN"]


@register
class BatchNorm(Layer):
    """Caffe's BatchNorm: normalisation only (the affine part is a following Scale layer).

    Blobs: [running sum of means S_mu (C,), running sum of unbiased variances S_var (C,), scale factor s (1,)].
    TRAIN with use_global_stats false: normalise with the batch mean and biased variance, then update
    ``s = maf*s + 1``, ``S_mu = maf*S_mu + mu_B``, ``S_var = maf*S_var + m/(m-1) * var_B`` (m = count / C).
    Otherwise normalise with mean = S_mu / s and var = S_var / s (both 0 when s == 0). ``use_global_stats`` is
    presence-checked: unset means true in TEST and false in TRAIN. The three blobs always have lr_mult 0.
    """

    type = "BatchNorm"

    def setup(self):
        bp = self.param.batch_norm_param
        shape = self.bottom_shapes[0]
        self.channels = shape[1] if len(shape) > 1 else 1
        self.use_global_stats = bp.use_global_stats if bp.HasField("use_global_stats") else self.phase == pb.TEST
        self.eps = bp.eps
        self.maf = bp.moving_average_fraction
        self.top_shapes = [shape]
        self.blob_shapes = [(self.channels,), (self.channels,), (1,)]

    def forced_lr_mult(self, index):
        return 0.0

    def for_mode(self, training):
        # Unset use_global_stats follows the phase, so it follows torch's mode; a written one stays (Caffe's rule).
        if self.param.batch_norm_param.HasField("use_global_stats") or self.use_global_stats != training:
            return self
        twin = copy.copy(self)
        twin.use_global_stats = not training
        return twin

    def init_blobs(self, generator):
        return [torch.zeros(s) for s in self.blob_shapes]

    def global_stats(self, blobs):
        """(mean, var) from the running sums: S / s, or zeros when s == 0."""
        s = blobs[2]
        factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        return blobs[0] * factor, blobs[1] * factor

    def channel_role(self) -> ChannelRole:
        if len(self.bottom_shapes[0]) < 2:
            return ChannelRole("barrier")
        # A zero input stays zero once the channel's running mean is zeroed; with batch statistics (TRAIN) the
        # output depends on the whole batch, so it is not evaluated one value per channel.
        return ChannelRole("passthrough", channel_blobs=((0, 0), (1, 0)), masked=(0,),
                           pointwise=self.use_global_stats)

    def forward(self, blobs, bottoms, weight=None, bias=None):
        """Normalise; ``weight``/``bias`` fuse a following Scale layer into the same op."""
        x = bottoms[0]
        if x.dim() == 1:
            x = x.unsqueeze(1)
        if self.use_global_stats:
            mean, var = self.global_stats(blobs)
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        elif x.numel() // self.channels <= 1:
            # One value per channel: torch's batch_norm refuses it; Caffe normalises it to 0 (the mean is the value,
            # the variance 0, and its correction factor m/(m-1) is replaced by 1), with zero gradient to x.
            view = (1, self.channels) + (1,) * (x.dim() - 2)
            y = (x - x.reshape(view)) / (self.eps ** 0.5)
            if weight is not None:
                y = y * weight.reshape(view)
            if bias is not None:
                y = y + bias.reshape(view)
            mean_b = x.detach().reshape(self.channels).to(torch.float32)
            var_b = torch.zeros_like(mean_b)
        else:
            # With momentum 1, batch_norm writes the batch mean and the UNBIASED batch variance into the given
            # buffers while normalising with the biased one, which is exactly what Caffe's update needs.
            mean_b = torch.zeros(self.channels, device=x.device, dtype=torch.float32)
            var_b = torch.ones(self.channels, device=x.device, dtype=torch.float32)
            y = F.batch_norm(x, mean_b, var_b, weight, bias, True, 1.0, self.eps)
        if not self.use_global_stats:
            with torch.no_grad():
                blobs[2].mul_(self.maf).add_(1.0)
                blobs[0].mul_(self.maf).add_(mean_b)
                blobs[1].mul_(self.maf).add_(var_b)
        return [y.reshape(bottoms[0].shape)]

    def macs(self):
        return count(self.bottom_shapes[0])


class _AffineBase(Layer):
    """Shared shape logic of Scale and Bias: a parameter of shape bottom.shape[axis:axis+num_axes]."""

    num_bottoms = (1, 2)

    def _param_shape(self, axis_field, num_axes_field):
        shape = self.bottom_shapes[0]
        if len(self.bottom_shapes) == 2:
            other = self.bottom_shapes[1]
            axis = canonical_axis(axis_field, len(shape), self.type) if other else 0
            if tuple(shape[axis:axis + len(other)]) != tuple(other):
                raise ValueError(f"bottom[1] shape {other} must match bottom[0] shape {shape} from axis {axis}")
            return axis, tuple(other)
        if num_axes_field < -1:
            raise ValueError(f"num_axes must be -1 or non-negative, found {num_axes_field}")
        axis = canonical_axis(axis_field, len(shape), self.type) if len(shape) else 0
        end = len(shape) if num_axes_field == -1 else axis + num_axes_field
        if end > len(shape):
            raise ValueError(f"axis {axis} + num_axes {num_axes_field} exceeds the {len(shape)} bottom axes")
        return axis, tuple(shape[axis:end])

    def _affine_role(self, beta: bool, factor) -> ChannelRole:
        """Scale's and Bias's role with one bottom: the parameter spans shape[axis:axis+k]."""
        k = len(self.pshape)
        if self.axis == 1 and k >= 1:  # per channel (k == 1) or per channel and position (C, H, W)
            blobs = tuple((i, 0) for i in range(len(self.blob_shapes)))
            return ChannelRole("passthrough", channel_blobs=blobs, factor=factor, pointwise=k == 1,
                               keeps_constants=k == 1)
        if k == 0 or self.axis >= 2:  # one value for all channels (or per position): channels pass through
            return ChannelRole("passthrough", pointwise=k == 0, zero_preserving=not beta, keeps_constants=k == 0)
        return ChannelRole("barrier")  # a parameter over the batch axis

    def _broadcast(self, t, ndim):
        """View a parameter of shape shape[axis:axis+k] so it broadcasts against an ndim-D bottom. Its own shape,
        not the one set up: a second bottom aligned from axis 0 carries the batch size of each call."""
        k = len(self.pshape)
        return t.reshape((1,) * self.axis + tuple(t.shape) + (1,) * (ndim - self.axis - k))


@register
class Scale(_AffineBase):
    """y = x * gamma (+ beta). One bottom: gamma is blob 0 (filler default constant 1) and beta blob 1 when
    bias_term; two bottoms: gamma is bottom[1]. After a BatchNorm this is the channel scaling factor that network
    slimming penalises."""

    type = "Scale"

    def setup(self):
        sp = self.param.scale_param
        self.axis, self.pshape = self._param_shape(sp.axis, sp.num_axes)
        self.top_shapes = [self.bottom_shapes[0]]
        self.blob_shapes = [] if len(self.bottom_shapes) == 2 else [self.pshape]
        if sp.bias_term:
            self.blob_shapes.append(self.pshape)

    def init_blobs(self, generator):
        sp = self.param.scale_param
        where = f"layer {self.name!r}"
        blobs = []
        if len(self.bottom_shapes) == 1:
            blobs.append(fill(sp.filler if sp.HasField("filler") else constant_filler(1.0), self.pshape, generator,
                              where))
        if sp.bias_term:
            blobs.append(fill(sp.bias_filler, self.pshape, generator, where))
        return blobs

    def channel_role(self) -> ChannelRole:
        if len(self.bottom_shapes) == 2:
            # Scale(x, y) with y aligned from axis 0, e.g. squeeze-and-excitation's N x C x 1 x 1 weights: x and y
            # share channels.
            if self.axis == 0 and len(self.pshape) >= 2 and not self.blob_shapes:
                return ChannelRole("ties", pointwise=True, product=True)
            return ChannelRole("barrier")
        # gamma is network slimming's channel scaling factor; zeroing gamma and beta silences the channel.
        return self._affine_role(self.param.scale_param.bias_term, factor=0)

    def forward(self, blobs, bottoms):
        x = bottoms[0]
        if len(bottoms) == 2:
            gamma, beta = bottoms[1], (blobs[0] if blobs else None)
        else:
            gamma, beta = blobs[0], (blobs[1] if len(blobs) > 1 else None)
        y = x * self._broadcast(gamma, x.dim())
        if beta is not None:
            y = y + self._broadcast(beta, x.dim())
        return [y]

    def macs(self):
        return count(self.bottom_shapes[0])


@register
class Bias(_AffineBase):
    """y = x + beta; beta is blob 0 (filler default constant 0), or bottom[1] with two bottoms."""

    type = "Bias"

    def setup(self):
        bp = self.param.bias_param
        self.axis, self.pshape = self._param_shape(bp.axis, bp.num_axes)
        self.top_shapes = [self.bottom_shapes[0]]
        self.blob_shapes = [] if len(self.bottom_shapes) == 2 else [self.pshape]

    def init_blobs(self, generator):
        if len(self.bottom_shapes) == 2:
            return []
        return [fill(self.param.bias_param.filler, self.pshape, generator, f"layer {self.name!r}")]

    def channel_role(self) -> ChannelRole:
        if len(self.bottom_shapes) == 2:
            if self.axis == 0 and len(self.pshape) >= 2:
                return ChannelRole("ties", pointwise=True)
            return ChannelRole("barrier")
        return self._affine_role(True, factor=None)

    def forward(self, blobs, bottoms):
        beta = bottoms[1] if len(bottoms) == 2 else blobs[0]
        return [bottoms[0] + self._broadcast(beta, bottoms[0].dim())]

    def macs(self):
        return count(self.bottom_shapes[0])


@register
class LRN(Layer):
    """Local response normalisation.

    ACROSS_CHANNELS: y = x * (k + alpha/size * sum over a window of ``size`` channels of x^2)^-beta, zero-padded.
    WITHIN_CHANNEL: y = x * (1 + alpha * avg_{size x size}(x^2))^-beta, the average counting padding (Caffe builds
    it from AVE pooling with pad (size-1)/2 and a Power layer; ``k`` is not used).
    """

    type = "LRN"

    def setup(self):
        lp = self.param.lrn_param
        if lp.local_size % 2 == 0:
            raise ValueError(f"local_size must be odd, found {lp.local_size}")
        shape = self.bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"LRN needs a 4-D bottom, found {shape}")
        self.top_shapes = [shape]

    def channel_role(self) -> ChannelRole:
        if self.param.lrn_param.norm_region == pb.LRNParameter.ACROSS_CHANNELS:
            return ChannelRole("barrier")  # each output mixes neighbouring channels
        # WITHIN_CHANNEL averages x^2 over a zero-padded window: 0 stays 0, a constant does not stay constant.
        return ChannelRole("passthrough", keeps_constants=False)

    def forward(self, blobs, bottoms):
        lp = self.param.lrn_param
        x = bottoms[0]
        n = lp.local_size
        if lp.norm_region == pb.LRNParameter.ACROSS_CHANNELS:
            return [F.local_response_norm(x, n, lp.alpha, lp.beta, lp.k)]
        avg = F.avg_pool2d(x * x, n, 1, (n - 1) // 2, count_include_pad=True)
        return [x * (1.0 + lp.alpha * avg).pow(-lp.beta)]

    def macs(self):
        return count(self.bottom_shapes[0]) * (self.param.lrn_param.local_size + 2)
