#!/usr/bin/env python
"""Hold out whole patients of a labelled data set as a labelled test split.

A shim: the command is d2ct.data.cli.make_holdout.main; the same command:
`d2ct-make-holdout` or `python -m d2ct.data.cli.make_holdout`.
"""
import sys

from d2ct.data.cli.make_holdout import main

if __name__ == "__main__":
    sys.exit(main())
