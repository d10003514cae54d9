#!/usr/bin/env python
"""Caffe-style script: ``python tools/compute_image_mean.py INPUT_DB [OUTPUT_FILE] [-backend lmdb]``.

A thin wrapper over ``slim compute_image_mean`` (slim/data/mean.py): the mean image of an LMDB of Datum records as
the .binaryproto that transform_param.mean_file reads, and each channel's mean.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compute_image_mean", *sys.argv[1:]]))
