#!/usr/bin/env python
"""Import a CT volume (NIfTI or DICOM) and its labels into the challenge layout.

A shim: the command is d2ct.data.cli.import_volume.main; the same command:
`d2ct-import-volume` or `python -m d2ct.data.cli.import_volume`.
"""
import sys

from d2ct.data.cli.import_volume import main

if __name__ == "__main__":
    sys.exit(main())
