"""``python -m fxsculpt ...`` is the same program as ``python cli.py ...``."""

import sys

from fxsculpt.cli import main

sys.exit(main())
