#!/usr/bin/env python
"""Train the U-Net peer (MONAI) and write its submission CSV: a yardstick, not a stage of the method.

A shim: the command is d2ct.peer.cli.main; the same command:
`d2ct-train-unet` or `python -m d2ct.peer.cli`.
"""
import sys

from d2ct.peer.cli import main

if __name__ == "__main__":
    sys.exit(main())
