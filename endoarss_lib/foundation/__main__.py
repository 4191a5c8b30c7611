"""``python -m endoarss_lib.foundation``: the pretraining command line."""
import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
