"""The lean mitmproxy master that `ccf` runs (`master`), and its hook dispatcher (`dispatch`)."""
