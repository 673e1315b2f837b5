"""`python -m safecode_guard.cli`: the `safecode-guard` command."""

import sys

from .main import main

sys.exit(main())
