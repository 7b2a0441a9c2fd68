"""``python -m adamerge.reproduce ARGS``: the same as ``adamerge reproduce ARGS``."""

import sys

from adamerge.console import entry

entry(["reproduce", *sys.argv[1:]])
