"""`python -m claude_code_fallback.cli`: `ccf`."""

import sys

from .commands import main

sys.exit(main())
