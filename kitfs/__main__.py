"""``python -m kitfs`` runs the command line."""

from kitfs.cli import main

raise SystemExit(main())
