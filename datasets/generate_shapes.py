#!/usr/bin/env python
"""Write the built-in rcdet shapes dataset in PASCAL VOC2007 layout (see rcdet/data/shapes.py)."""

from rcdet.data.shapes import main

if __name__ == "__main__":
    main()
