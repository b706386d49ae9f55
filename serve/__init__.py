"""saelora.serve."""
