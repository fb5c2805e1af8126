"""``python -m resumer`` is the ``resumer`` command."""

from resumer.cli import main

raise SystemExit(main())
