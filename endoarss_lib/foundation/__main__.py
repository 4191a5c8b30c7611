"""``python -m endoarss_lib.foundation``: the pretraining command line (:mod:`endoarss_lib.foundation.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
