"""``python -m pgtenant`` runs the pgtenant command line."""

from .cli import main

raise SystemExit(main())
