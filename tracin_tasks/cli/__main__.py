"""``python -m tracin_tasks.cli``."""

from tracin_tasks.cli import main

raise SystemExit(main())
