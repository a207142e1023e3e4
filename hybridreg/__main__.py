"""The ``hybridreg`` command's entry point (``python -m hybridreg``, the ``hybridreg`` script,
``torchrun -m hybridreg train ...``).

It imports the CLI (and with it torch, about a second) inside its own error boundary, so that a
Ctrl-C while the program starts ends in one line and exit code 130, as it does later
(:func:`hybridreg.cli.main`).
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Import :mod:`hybridreg.cli` and run :func:`hybridreg.cli.main` on ``argv`` (default
    ``sys.argv[1:]``); its exit code, or 130 for a Ctrl-C during the import."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("hybridreg: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
