"""``python -m sumie`` runs the CLI."""

import sys

from sumie.serve.cli import main

sys.exit(main())
