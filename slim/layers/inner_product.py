"""InnerProduct: a fully connected layer over all axes from ``axis`` on (Caffe flattens them implicitly, C-order)."""

from slim.layers._lazy import F
from slim.layers.base import ChannelRole, Layer, canonical_axis, count, register
from slim.layers.fillers import fill_weight_and_bias

__all__ = ["InnerProduct"]


@register
class InnerProduct(Layer):
    """y = x W^T + b with K = count(axis:), weight (N, K), or (K, N) with ``transpose``; bias (N,)."""

    type = "InnerProduct"
    cost_kind = "fc"

    def setup(self):
        ip = self.param.inner_product_param
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(ip.axis, len(shape), "inner_product_param")
        self.k = count(shape, self.axis)
        self.n = ip.num_output
        if self.n <= 0:
            raise ValueError("num_output must be positive")
        self.top_shapes = [tuple(shape[:self.axis]) + (self.n,)]
        self.blob_shapes = [(self.k, self.n) if ip.transpose else (self.n, self.k)]
        if ip.bias_term:
            self.blob_shapes.append((self.n,))

    def channel_role(self) -> ChannelRole:
        ip = self.param.inner_product_param
        if self.axis == 1:  # columns are the bottom's C x H x W, flattened in C order
            out_axis, in_axis = (1, 0) if ip.transpose else (0, 1)
            outputs = ((0, out_axis),) + (((1, 0),) if ip.bias_term else ())
            return ChannelRole("produces", channel_blobs=outputs, input_blobs=((0, in_axis),), absorbs_constants=True)
        if self.axis >= 2:  # applied to each channel separately: the channels pass through
            return ChannelRole("passthrough", zero_preserving=not ip.bias_term, keeps_constants=False)
        return ChannelRole("barrier")

    def init_blobs(self, generator):
        return fill_weight_and_bias(self.param.inner_product_param, self.blob_shapes, generator, f"layer {self.name!r}")

    def forward(self, blobs, bottoms):
        x = bottoms[0]
        x = x.reshape(*x.shape[:self.axis], self.k)
        w = blobs[0].t() if self.param.inner_product_param.transpose else blobs[0]
        return [F.linear(x, w, blobs[1] if len(blobs) > 1 else None)]

    def macs(self):
        return count(self.bottom_shapes[0], 0, self.axis) * self.k * self.n
