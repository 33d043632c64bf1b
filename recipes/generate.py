"""`ftkit generate`, as a script: `python recipes/generate.py --help`."""

import sys

from ftkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
