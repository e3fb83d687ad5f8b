"""python -m fastvlm: the fastvlm command line (fastvlm/cli.py)."""
import sys

from .cli import main

sys.exit(main())
