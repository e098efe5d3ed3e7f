"""`python -m app serve ...` is `weir serve ...` without the console script."""

import sys

from app.cli import main

sys.exit(main())
