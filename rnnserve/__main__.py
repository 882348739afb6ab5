"""``python -m rnnserve`` is the ``rnnserve`` command."""

from rnnserve.cli import main

raise SystemExit(main())
