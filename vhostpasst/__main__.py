"""`python -m vhostpasst`: the passt personality (the name "__main__" picks no mode)."""

import sys

from vhostpasst.main import main

sys.exit(main(close_inherited=True))
