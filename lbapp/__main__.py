"""`python -m lbapp`: the launcher (lbapp/cli.py), the same as the `lbapp` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":  # a worker of --workers N imports this module too (spawn): no second launch
    sys.exit(main())
