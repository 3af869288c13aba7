"""Kept for commands written before ``dgss-convert-weights`` existed: ``python scripts/convert_weights.py ...`` runs
``dgss-convert-weights ...`` (dgss/convert_weights.py)."""

import sys

from dgss.convert_weights import main

if __name__ == "__main__":
    sys.exit(main())
