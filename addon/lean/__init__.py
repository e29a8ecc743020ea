"""The lean mitmproxy master that `ccf` runs (`master`), its hook dispatcher (`dispatch`), and
its part in a restart (`succession`)."""
