"""`python -m weaveipam`: the same as the `weaveipam` command."""

from .cli import main

raise SystemExit(main())
