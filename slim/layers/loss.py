"""Softmax, the loss layers and Accuracy, with Caffe's normalisation and tie rules.

Loss tops are 0-axis scalars, as in Caffe. Labels arrive as float blobs and are cast to integers.
"""

from slim import proto as pb
from slim.layers._lazy import F, torch
from slim.layers.base import Layer, canonical_axis, count, register

__all__ = ["Softmax", "SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "SigmoidCrossEntropyLoss"]

FLT_MIN = 1.1754943508222875e-38


def _norm_mode(lp, default_mode: int) -> int:
    """The normalisation mode of a LossParameter: ``normalization`` wins when set; else the deprecated ``normalize``
    (true: VALID, false: BATCH_SIZE); else the layer's default mode. Read in setup: forward reads no protobuf
    fields (torch.compile cannot trace them)."""
    if lp.HasField("normalization"):
        return lp.normalization
    if lp.HasField("normalize"):
        return pb.LossParameter.VALID if lp.normalize else pb.LossParameter.BATCH_SIZE
    return default_mode


def _normalizer(mode: int, outer: int, inner: int, valid):
    """Caffe's LossLayer::GetNormalizer for ``mode`` (VALID, FULL, BATCH_SIZE or NONE), never below 1."""
    if mode == pb.LossParameter.FULL:
        return max(1.0, float(outer * inner))
    if mode == pb.LossParameter.VALID:
        return torch.clamp(valid.to(torch.float32), min=1.0) if torch.is_tensor(valid) else max(1.0, float(valid))
    if mode == pb.LossParameter.BATCH_SIZE:
        return max(1.0, float(outer))
    return 1.0


@register
class Softmax(Layer):
    """Softmax over ``axis`` (default 1, Caffe's; not the last axis)."""

    type = "Softmax"

    def setup(self):
        shape = self.bottom_shapes[0]
        self.axis = canonical_axis(self.param.softmax_param.axis, len(shape), "softmax_param")
        self.top_shapes = [shape]

    def forward(self, blobs, bottoms):
        return [torch.softmax(bottoms[0], self.axis)]

    def macs(self):
        return count(self.bottom_shapes[0]) * 3


def _label_stays(index: int) -> bool:
    """Caffe's LossLayer::AllowForceBackward: even under force_backward the label (bottom 1) gets no gradient."""
    return index != 1


class _ClassifierLoss(Layer):
    num_bottoms = (2, 2)

    def allow_force_backward(self, index: int) -> bool:
        return _label_stays(index)

    def _split_axes(self, axis_field):
        scores, labels = self.bottom_shapes
        self.axis = canonical_axis(axis_field, len(scores), "axis")
        self.outer = count(scores, 0, self.axis)
        self.inner = count(scores, self.axis + 1)
        if count(labels) != self.outer * self.inner:
            raise ValueError(f"the label blob {self.param.bottom[1]!r} has {count(labels)} entries, the scores "
                             f"{scores} need outer x inner = {self.outer * self.inner} (one label per prediction)")

    def _flat(self, scores, labels):
        """Scores as (outer, classes, inner) and integer labels as (outer, inner)."""
        c = scores.shape[self.axis]
        s = scores.reshape(self.outer, c, self.inner)
        return s, labels.reshape(self.outer, self.inner).long()


@register
class SoftmaxWithLoss(_ClassifierLoss):
    """-sum log(max(p_label, FLT_MIN)) / normalizer, softmax over softmax_param.axis; ignore_label (presence-checked)
    skips entries. Normalisation default VALID. An optional second top holds the probabilities. The gradient is
    Caffe's (prob - onehot) / normalizer, also where the forward's clamp at FLT_MIN is active."""

    type = "SoftmaxWithLoss"
    num_tops = (1, 2)
    is_loss = True

    def setup(self):
        lp = self.param.loss_param
        self._split_axes(self.param.softmax_param.axis)
        self.top_shapes = [()] + ([self.bottom_shapes[0]] if len(self.param.top) == 2 else [])
        self.ignore = lp.ignore_label if lp.HasField("ignore_label") else None
        self.norm_mode = _norm_mode(lp, pb.LossParameter.VALID)

    def forward(self, blobs, bottoms):
        scores, labels = self._flat(bottoms[0], bottoms[1])
        ignore = self.ignore
        if ignore is None and not torch.compiler.is_compiling():
            self._check_labels(labels, scores.shape[1])  # reads values: compiled, Net.check_labels runs it eagerly
        per = F.cross_entropy(scores, labels, reduction="none", ignore_index=-100 if ignore is None else ignore)
        # Caffe clamps p at FLT_MIN before the log in the forward only, which bounds each term by -log(FLT_MIN) =
        # 87.3; its backward is prob - onehot, never clamped. So the value is clamped and the gradient is not.
        per = per - (per - per.clamp(max=87.33654475055310898657)).detach()
        valid = (labels != ignore).sum() if ignore is not None else self.outer * self.inner
        loss = per.sum() / _normalizer(self.norm_mode, self.outer, self.inner, valid)
        tops = [loss]
        if len(self.top_shapes) == 2:
            tops.append(torch.softmax(bottoms[0], self.axis))
        return tops

    def macs(self):
        # Softmax's 3 per score (exp, sum, divide) plus one log-and-accumulate per prediction.
        return count(self.bottom_shapes[0]) * 3 + self.outer * self.inner

    def check_labels(self, labels) -> None:
        """The forward's label check on its own (NetError for labels outside [0, classes) without ignore_label)."""
        if self.ignore is None:
            self._check_labels(labels.reshape(-1), self.bottom_shapes[0][self.axis])

    def _check_labels(self, labels, classes):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            from slim.errors import NetError
            raise NetError(f"layer {self.name!r} (SoftmaxWithLoss): labels must lie in [0, {classes}), found "
                           f"{int(labels.min())}..{int(labels.max())}. Check the data's labels, num_output of the last "
                           f"layer, or set loss_param.ignore_label.")


@register
class Accuracy(_ClassifierLoss):
    """Top-k accuracy. A prediction is correct iff fewer than top_k OTHER classes score >= the true class, so ties
    count against it. An optional second top gives the per-class accuracy.

    A sample with a NaN score is wrong. (Caffe counts it right: NaN compares false, so no class beats the true one,
    and a net that outputs only NaN scored accuracy 1 next to a NaN loss.)"""

    type = "Accuracy"
    num_tops = (1, 2)

    def setup(self):
        ap = self.param.accuracy_param
        self._split_axes(ap.axis)
        classes = self.bottom_shapes[0][self.axis]
        if ap.top_k > classes:
            raise ValueError(f"top_k {ap.top_k} exceeds the {classes} classes")
        self.top_shapes = [()] + ([(classes,)] if len(self.param.top) == 2 else [])
        self.top_k = ap.top_k
        self.ignore = ap.ignore_label if ap.HasField("ignore_label") else None

    def forward(self, blobs, bottoms):
        with torch.no_grad():
            scores, labels = self._flat(bottoms[0], bottoms[1])
            c = scores.shape[1]
            keep = labels != self.ignore if self.ignore is not None else torch.ones_like(labels, dtype=bool)
            safe = torch.where(keep, labels, torch.zeros_like(labels)).clamp(0, c - 1)
            true_score = scores.gather(1, safe.unsqueeze(1))
            better = (scores >= true_score).sum(1) - 1  # minus the true class itself
            correct = (better < self.top_k) & keep & ~torch.isnan(scores).any(1)
            n = keep.sum()
            acc = torch.where(n > 0, correct.sum().to(torch.float32) / n.clamp(min=1), torch.zeros((), device=n.device))
            tops = [acc.to(bottoms[0].dtype)]
            if len(self.top_shapes) == 2:
                per_class_n = torch.zeros(c, device=scores.device).index_add_(0, safe[keep], torch.ones_like(
                    safe[keep], dtype=torch.float32))
                per_class_c = torch.zeros(c, device=scores.device).index_add_(0, safe[correct], torch.ones_like(
                    safe[correct], dtype=torch.float32))
                tops.append(torch.where(per_class_n > 0, per_class_c / per_class_n.clamp(min=1), torch.zeros_like(
                    per_class_n)))
        return tops

    def macs(self):
        return count(self.bottom_shapes[0])  # one comparison per score against the true class's score


@register
class EuclideanLoss(Layer):
    """sum((a - b)^2) / (2 N), N = the first axis of bottom 0."""

    type = "EuclideanLoss"
    num_bottoms = (2, 2)
    is_loss = True

    def setup(self):
        a, b = self.bottom_shapes
        if count(a) != count(b) or (a and b and a[0] != b[0]):
            raise ValueError(f"bottoms must have the same count and batch size, found {a} and {b}")
        self.top_shapes = [()]

    def forward(self, blobs, bottoms):
        a, b = bottoms
        d = a - b.reshape(a.shape)
        return [(d * d).sum() / (2.0 * a.shape[0])]

    def macs(self):
        return count(self.bottom_shapes[0]) * 2  # a subtraction and a square-accumulate per element


@register
class SigmoidCrossEntropyLoss(Layer):
    """-sum(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))), computed stably; ignore_label (presence-checked)
    skips entries. Normalisation default BATCH_SIZE (Caffe keeps it for backward compatibility)."""

    type = "SigmoidCrossEntropyLoss"
    num_bottoms = (2, 2)
    is_loss = True

    def allow_force_backward(self, index: int) -> bool:
        return _label_stays(index)

    def setup(self):
        a, b = self.bottom_shapes
        if count(a) != count(b):
            raise ValueError(f"scores {a} and targets {b} must have the same number of entries")
        self.top_shapes = [()]
        lp = self.param.loss_param
        self.ignore = lp.ignore_label if lp.HasField("ignore_label") else None
        self.norm_mode = _norm_mode(lp, pb.LossParameter.BATCH_SIZE)

    def forward(self, blobs, bottoms):
        x, t = bottoms[0], bottoms[1].reshape(bottoms[0].shape)
        per = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        if self.ignore is not None:
            keep = t != self.ignore
            per = per * keep
            valid = keep.sum()
        else:
            valid = x.numel()
        outer = x.shape[0] if x.dim() else 1
        return [per.sum() / _normalizer(self.norm_mode, outer, x.numel() // max(outer, 1), valid)]

    def macs(self):
        # The stable form max(x, 0) - x t + log(1 + exp(-|x|)): about 4 operations per element.
        return count(self.bottom_shapes[0]) * 4
