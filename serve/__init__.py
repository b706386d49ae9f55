"""saelora.serve (folder serve/): the OpenAI-style HTTP server with per-token SAE latents, latent edits and
adapter hot-swapping, in layers:

    api/           the HTTP edge: FastAPI app and routes, handlers, the OpenAI error envelope, metrics
    core/          what both engines share: the engine interface, the threaded loop, the row state,
                   the adapter registry, sampling
    torch_engine/  the embedded engine (transformers + PEFT + the splice hooks)
    vllm_engine/   the same interface on vLLM
    cli.py         `saelora serve`

It imports saelora.adapters (and the wire protocol from saelora.clients), never saelora.trainer.
"""
