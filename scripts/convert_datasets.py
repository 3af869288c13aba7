"""Kept for commands written before ``dgss-convert`` existed: ``python scripts/convert_datasets.py ...`` runs
``dgss-convert ...`` (dgss/convert.py)."""

import sys

from dgss.convert import main

if __name__ == "__main__":
    sys.exit(main())
