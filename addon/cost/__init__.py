"""What requests cost: prices (`prices`), and who spent what, kept and capped."""
