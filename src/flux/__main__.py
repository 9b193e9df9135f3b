"""``python -m flux`` runs fluxd (``python -m flux.fluxctl`` runs fluxctl)."""

import sys

from flux.daemon import main

sys.exit(main())
