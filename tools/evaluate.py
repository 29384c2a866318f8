#!/usr/bin/env python
"""Score a prediction CSV against a truth CSV: ARI, Dice, COCO mask AP.

A shim: the command is d2ct.evaluation.cli.main; the same command:
`d2ct-evaluate` or `python -m d2ct.evaluation.cli`.
"""
import sys

from d2ct.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
