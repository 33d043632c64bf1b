"""`ftkit merge`, as a script: `python recipes/merge.py --help`."""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
