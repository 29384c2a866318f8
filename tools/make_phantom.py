#!/usr/bin/env python
"""Write the procedural abdominal CT phantom in the challenge layout.

A shim: the command is d2ct.data.cli.make_phantom.main; the same command:
`d2ct-make-phantom` or `python -m d2ct.data.cli.make_phantom`.
"""
import sys

from d2ct.data.cli.make_phantom import main

if __name__ == "__main__":
    sys.exit(main())
