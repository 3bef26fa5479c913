"""`python -m allocator` is the `allocator` command."""

import sys

from .cli import main

sys.exit(main())
