"""`python -m allocator.cli ...`: the `allocator` command."""

from . import main

raise SystemExit(main())
