"""claude-code-fallback: a mitmproxy addon that fails over between Anthropic-compatible endpoints."""

__version__ = "2.0.0"
