"""`ccf`: the command line (`commands`), `ccf usage`'s tables (`usage`), and what the commands
ask of running proxies (`restart`)."""

from .commands import main, run_foreground

__all__ = ["main", "run_foreground"]
