"""saelora.trainer (folder trainer/): LoRA around frozen SAEs, SAE training, evaluation and baselines.

Library modules (loop, objective, lora, evaluate, train_sae, features, setup) are separate from the command
entry points (cli.py, run_eval.py); it imports saelora.adapters, never saelora.serve.
"""
