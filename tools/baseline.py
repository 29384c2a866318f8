#!/usr/bin/env python
"""The organisers' classical watershed baseline (submission CSV or preset comparison).

A shim: the command is d2ct.baseline.cli.main; the same command:
`d2ct-baseline` or `python -m d2ct.baseline.cli`.
"""
import sys

from d2ct.baseline.cli import main

if __name__ == "__main__":
    sys.exit(main())
