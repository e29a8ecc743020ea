"""How `ccf` starts the lean master (lean/master.py): the interpreter, its flags, the script.

Kept apart from the master itself, which imports the whole proxy, so that the command
line and the supervisor can name it without loading it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# -O: mitmproxy type-checks every message's fields, and the event of every layer call,
# only `if __debug__`; a serving proxy need not pay that (7-8% of a request's CPU).
# -P: no current directory on sys.path, so a stray attr.py there cannot shadow a module.
PYTHON_FLAGS = ("-O", "-P")
SCRIPT = (Path(__file__).parent / "lean" / "master.py").resolve()


def command(specs: list[str]) -> list[str]:
    """How to start the lean master with `--set` specs."""
    return [sys.executable, *PYTHON_FLAGS, str(SCRIPT), *(a for s in specs for a in ("--set", s))]
