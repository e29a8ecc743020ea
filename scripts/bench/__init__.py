"""The benchmark: claude-code-fallback against a direct connection, mitmproxy alone and
claude-code-router, Claude on the clouds as backups, and the fleet on Redis.

What it measures and why, and what it found: docs/performance.md. Run it from the
repository root with the project's venv: `python scripts/bench.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository's `addon`, as `ccf` starts it


class BenchError(RuntimeError):
    """A measurement could not be taken (a process died, a response was wrong)."""
