"""pycaffe's ``caffe.Classifier``: a TEST net that predicts class probabilities for images of any size."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from slim.caffe import io as caffe_io
from slim.caffe.net import TEST, Net

__all__ = ["Classifier"]


class Classifier(Net):
    """A deploy net with a Transformer for its first input.

    Args:
        model_file: the deploy prototxt.
        pretrained_file: its .caffemodel.
        image_dims: the size (H, W) images are resized to before cropping (default: the input's size).
        mean: the mean to subtract (see ``Transformer.set_mean``).
        input_scale, raw_scale: see ``Transformer``.
        channel_swap: e.g. (2, 1, 0) to feed RGB images to a BGR net.
    """

    def __init__(self, model_file, pretrained_file, image_dims: Optional[Sequence[int]] = None, mean=None,
                 input_scale: Optional[float] = None, raw_scale: Optional[float] = None,
                 channel_swap: Optional[Sequence[int]] = None) -> None:
        super().__init__(model_file, TEST, weights=pretrained_file)
        name = self.inputs[0]
        self.transformer = caffe_io.Transformer({name: self.blobs[name].shape})
        self.transformer.set_transpose(name, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(name, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(name, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(name, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(name, channel_swap)
        self.crop_dims = np.array(self.blobs[name].shape[2:])
        self.image_dims = np.array(image_dims if image_dims is not None else self.crop_dims)

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class scores (the first output) for H x W x K images.

        Args:
            inputs: images, H x W x K float (as ``caffe.io.load_image`` gives).
            oversample: average the ten crops of ``caffe.io.oversample`` (corners, centre and mirrors); else the
                centre crop only.

        Returns:
            N x classes.
        """
        h, w = (int(d) for d in self.image_dims)
        resized = np.zeros((len(inputs), h, w, inputs[0].shape[2]), dtype=np.float32)
        for i, im in enumerate(inputs):
            resized[i] = caffe_io.resize_image(im, (h, w))
        if oversample:
            crops = caffe_io.oversample(resized, self.crop_dims)
        else:
            ch, cw = (int(d) for d in self.crop_dims)
            top, left = int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0)
            crops = resized[:, top:top + ch, left:left + cw, :]
        name = self.inputs[0]
        batch = np.asarray([self.transformer.preprocess(name, c) for c in crops], dtype=np.float32)
        out = self.forward_all(**{name: batch})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(axis=1)
        return predictions
