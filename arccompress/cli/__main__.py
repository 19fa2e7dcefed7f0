"""`python -m arccompress.cli`: the `arccompress` command."""

import sys

from . import main

sys.exit(main())
