"""What bbpt needs from the standard library of a newer Python than the oldest it supports (3.10).

``tomllib`` is the standard library's from Python 3.11 and the ``tomli`` package (the same
parser, under its old name; a dependency on 3.10 only) before it; ``chdir`` is
``contextlib.chdir`` from 3.11.
"""
from __future__ import annotations

import contextlib
import os
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by scripts/check_python.sh 3.10
    import tomli as tomllib

__all__ = ["chdir", "tomllib"]


if sys.version_info >= (3, 11):
    chdir = contextlib.chdir
else:  # pragma: no cover
    @contextlib.contextmanager
    def chdir(path):
        """Work in ``path`` for the block, then go back (the working directory is process-wide)."""
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)
