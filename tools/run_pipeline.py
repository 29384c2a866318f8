#!/usr/bin/env python
"""Run the whole d2ct method in one command, resumably.

A shim: the command is d2ct.pipeline.cli.main; the same command:
`d2ct-pipeline` or `python -m d2ct.pipeline.cli`.
"""
import sys

from d2ct.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
