"""`python -m arccompress`: the `arccompress` command."""

import sys

from .cli import main

sys.exit(main())
