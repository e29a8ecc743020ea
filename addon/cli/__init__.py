"""`ccf`: the command line (`commands`)."""

from .commands import main, run_foreground

__all__ = ["main", "run_foreground"]
