"""``python -m fastmoe_adv``: the command-line interface (see ``fastmoe_adv.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
