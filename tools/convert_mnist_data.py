#!/usr/bin/env python
"""Caffe-style script: ``python tools/convert_mnist_data.py IMAGES LABELS OUTPUT [--backend lmdb]``.

A thin wrapper over ``slim convert_mnist_data`` (slim/data/lmdb_writer.py): MNIST-format IDX files into the LMDB
of Datum records Caffe's examples/mnist nets read.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert_mnist_data", *sys.argv[1:]]))
