"""`ftkit evaluate`, as a script: `python recipes/evaluate.py --help`."""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
