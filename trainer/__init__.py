"""saelora.trainer."""
