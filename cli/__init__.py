"""saelora: LoRA adapters that make a language model work well with its sparse autoencoder.

The repository's top-level folders are the subpackages of `saelora` (pyproject's package-dir):

    cli/       -> saelora            the `saelora` command, the demo, the shipped SAEs (data/saes/)
    adapters/  -> saelora.adapters   the shared core: models, SAEs, position policy, the splice, bundles, corpus
    trainer/   -> saelora.trainer    LoRA around frozen SAEs, SAE training, eval (library + commands)
    serve/     -> saelora.serve      the OpenAI-style server and its torch / vLLM engines
    clients/   -> saelora.clients    typed clients (httpx + pydantic, no torch)

No top-level folder is named `saelora`, so running from the repository root never shadows the installed
package. `trainer` and `serve` import `adapters`, never each other.
"""

__version__ = "0.1.0"
