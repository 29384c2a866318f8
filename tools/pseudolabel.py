#!/usr/bin/env python
"""Pseudo-label the unlabelled pool with the trained radiologists.

A shim: the command is d2ct.pseudolabel.cli.main; the same command:
`d2ct-pseudolabel` or `python -m d2ct.pseudolabel.cli`.
"""
import sys

from d2ct.pseudolabel.cli import main

if __name__ == "__main__":
    sys.exit(main())
