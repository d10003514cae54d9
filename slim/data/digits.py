"""The built-in dataset: the UCI ML hand-written digits (1,797 8x8 grey images, 10 classes).

The data is the copy distributed with scikit-learn (``sklearn.datasets.load_digits()``), by E. Alpaydin and
C. Kaynak, under CC BY 4.0; see digits_LICENSE.txt beside this file. It is stored in digits.npz (uint8 arrays, read
with ``allow_pickle=False``); slim does not depend on scikit-learn. It was made by installing scikit-learn into a
separate virtual environment and saving ``load_digits().images`` as uint8 with the split below.

Pixels are integers 0..16 (counts of "on" pixels in 4x4 blocks), so a net usually sets
``transform_param { scale: 0.0625 }``. The split is fixed and stratified: 1,437 training and 360 test images; each
class contributes round(count * 360 / 1797) test images (largest remainder), taken at evenly spaced positions of
that class's samples in scikit-learn's order. ``train_index`` / ``test_index`` in the file record those positions.
"""

from pathlib import Path

import numpy as np

from slim.data.source import ArraySamples

__all__ = ["DIGITS_PATH", "DIGITS_SHAPE", "DIGITS_CLASSES", "load_digits"]

DIGITS_PATH = Path(__file__).with_name("digits.npz")
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


def load_digits(train: bool = True) -> ArraySamples:
    """The training (1,437 images) or test (360 images) split of the built-in digits.

    Returns:
        ArraySamples with uint8 images (N, 1, 8, 8), values 0..16, and int64 labels 0..9.
    """
    split = "train" if train else "test"
    with np.load(DIGITS_PATH, allow_pickle=False) as f:
        images = f[f"{split}_images"]
        labels = f[f"{split}_labels"]
    return ArraySamples(np.ascontiguousarray(images[:, None]), labels.astype(np.int64))
