"""Runs the benchmark, the package scripts/bench/ beside this file: from the repository
root, `python scripts/bench.py --help`. What it measures and why: docs/performance.md."""

import sys

# This file's directory is first on sys.path, and there a package takes precedence over a
# module of the same name: `bench` is scripts/bench/, not this file.
from bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
