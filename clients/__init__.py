"""saelora.clients."""
