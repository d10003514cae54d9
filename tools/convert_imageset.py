#!/usr/bin/env python
"""Caffe-style script: ``python tools/convert_imageset.py [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME``.

A thin wrapper over ``slim convert_imageset`` (slim/data/imageset.py): a list of ``path label`` lines into the LMDB
of Datum records Caffe's Data layers read, with Caffe's flags (-gray, -shuffle, -resize_height, -resize_width,
-check_size, -encoded, -encode_type, -backend).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert_imageset", *sys.argv[1:]]))
