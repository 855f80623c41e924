"""``python -m fp_collect``: the same as the ``fp-collect`` command."""

from __future__ import annotations

import sys

from fp_collect.cli import main

if __name__ == "__main__":
    sys.exit(main())
