"""saelora.adapters (folder adapters/): the shared core both the trainer and the server import.

It owns the model loading and embedded models (models.py), SAEs via sae-lens and their conventions (saes.py),
the position policy (policy.py), hook points (hooks.py), the steering vocabulary (edits.py), the splice as a
pure function (splice.py) and the hooks that install it in a transformers model (splice_hooks.py), adapter
bundles (bundle.py), activations (activations.py) and the corpus (corpus.py). It imports neither
saelora.trainer, saelora.serve nor saelora.clients.
"""
