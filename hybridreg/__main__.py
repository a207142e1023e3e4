"""``python -m hybridreg`` (also what ``torchrun -m hybridreg train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
