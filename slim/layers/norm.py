"""Normalisation and per-channel affine layers: BatchNorm, Scale, Bias, LRN."""

from slim import proto as pb
from slim.layers._lazy import F, torch
from slim.layers.base import Layer, canonical_axis, count, register
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

    def init_blobs(self, generator):
        return [torch.zeros(s) for s in self.blob_shapes]

    def global_stats(self, blobs):
        """(mean, var) from the running sums: S / s, or zeros when s == 0."""
        s = blobs[2]
        factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        return blobs[0] * factor, blobs[1] * factor

    def forward(self, blobs, bottoms, weight=None, bias=None):
        """Normalise; ``weight``/``bias`` fuse a following Scale layer into the same op."""
        x = bottoms[0]
        if x.dim() == 1:
            x = x.unsqueeze(1)
        if self.use_global_stats:
            mean, var = self.global_stats(blobs)
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        else:
            # With momentum 1, batch_norm writes the batch mean and the UNBIASED batch variance into the given
            # buffers while normalising with the biased one, which is exactly what Caffe's update needs.
            mean_b = torch.zeros(self.channels, device=x.device, dtype=torch.float32)
            var_b = torch.ones(self.channels, device=x.device, dtype=torch.float32)
            y = F.batch_norm(x, mean_b, var_b, weight, bias, True, 1.0, self.eps)
            with torch.no_grad():
                m = x.numel() // self.channels
                if m <= 1:
                    var_b = torch.zeros_like(var_b)  # Caffe's correction factor is 1 for m == 1: variance 0
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

    def _broadcast(self, t, ndim):
        """View a parameter of shape shape[axis:axis+k] so it broadcasts against an ndim-D bottom."""
        k = len(self.pshape)
        return t.reshape((1,) * self.axis + tuple(self.pshape) + (1,) * (ndim - self.axis - k))


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
