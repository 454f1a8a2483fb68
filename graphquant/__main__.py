"""``python -m graphquant`` runs the command line (see :mod:`graphquant.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
