"""saelora.adapters."""
