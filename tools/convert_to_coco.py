#!/usr/bin/env python
"""Convert one split of a challenge-layout data set folder to a single-class COCO JSON.

A shim: the command is d2ct.data.cli.convert_to_coco.main; the same command:
`d2ct-convert-to-coco` or `python -m d2ct.data.cli.convert_to_coco`.
"""
import sys

from d2ct.data.cli.convert_to_coco import main

if __name__ == "__main__":
    sys.exit(main())
