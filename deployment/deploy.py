#!/usr/bin/env python3
"""Operator entry point: `python deployment/deploy.py [--hosts PATH] [--dry-run] [-v] ENV COMMAND [ARGS]`.

Thin on purpose: the logic lives in the `deployment` package (cli.py parses, operations.py
acts). Also installed as the `deploy` console script.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package from the repository root, and do not let this
    # directory's modules (ssh.py, errors.py, ...) shadow top-level imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from deployment.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
