"""``python -m ftkit``: the ``ftkit`` command (also what ``accelerate launch -m ftkit`` runs)."""

import sys

from ftkit.cli import main

sys.exit(main())
