#!/usr/bin/env python
"""Train (or evaluate) a d2ct Mask R-CNN: a radiologist or the final model.

A shim: the command is d2ct.engine.train_net.main; the same command:
`d2ct-train` or `python -m d2ct.engine.train_net`.
"""
import sys

from d2ct.engine.train_net import main

if __name__ == "__main__":
    sys.exit(main())
