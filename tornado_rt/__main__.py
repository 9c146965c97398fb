"""``python -m tornado_rt serve``: the same as the ``tornado-rt`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
