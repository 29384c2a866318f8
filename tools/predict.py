#!/usr/bin/env python
"""Predict label maps with a trained model: a submission CSV or a NIfTI label volume.

A shim: the command is d2ct.engine.predict.main; the same command:
`d2ct-predict` or `python -m d2ct.engine.predict`.
"""
import sys

from d2ct.engine.predict import main

if __name__ == "__main__":
    sys.exit(main())
