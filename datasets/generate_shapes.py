#!/usr/bin/env python
"""Write the built-in rcdet shapes dataset in PASCAL VOC2007 layout (see rcdet/data/shapes.py)."""

import sys

from rcdet.data.shapes import main
from rcdet.engine import exit_on_user_error

if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
