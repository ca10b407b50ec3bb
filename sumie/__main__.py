"""``python -m sumie`` runs the CLI."""

import sys

from sumie.cli.main import main

sys.exit(main())
