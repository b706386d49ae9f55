"""saelora.serve.core: what both engines share. The engine interface and its records (engine.py), the threaded
engine loop (threaded.py), one request in flight (rows.py), the adapter registry (registry.py) and sampling /
detokenisation (sampling.py)."""
