"""claude-code-fallback as a mitmproxy script: `mitmdump -s addon/fallback.py --mode reverse:URL@8765`."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__ or __package__.startswith("__mitmproxy_script__"):
    # `mitmdump -s` runs this file as a loose script; import its package instead
    # ("addon" in a checkout, "claude_code_fallback" when installed) so that the
    # addon's modules are ordinary, importable modules either way.
    _here = Path(__file__).resolve().parent
    if str(_here.parent) not in sys.path:
        sys.path.insert(0, str(_here.parent))
    __package__ = _here.name

from .proxy import Fallback

addons = [Fallback()]
