"""`ServeConfig`: every setting of `saelora serve`, with its help, in one place. It generates the command line
(adapters/options.py: flag names as they always were), gives both engines their defaults, and reaches the
server's `/v1/models` (the context limit it implies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from saelora.adapters.config import DEFAULT_MODEL
from saelora.adapters.errors import ConfigError
from saelora.adapters.options import opt

EngineName = Literal["torch", "vllm"]
ENGINES: tuple[str, ...] = get_args(EngineName)


@dataclass
class ServeConfig:
    """What `saelora serve` runs; the engines read their settings from it (and take its defaults)."""

    model: str = opt(DEFAULT_MODEL, f"base model spec (the embedded {DEFAULT_MODEL}; also gemma3-270m)")
    sae: list[str] = opt(factory=list, help="sae-lens folder to splice (default: the demo SAE from `make demo` "
                         "when present)", split=False)
    no_sae: bool = opt(False, "serve the plain model: no SAE, not even the demo's", flag=True)
    policy: str | None = opt(None, "position-policy override for every SAE, e.g. keep_first=0,keep_ids= (default: "
                             "each SAE's recorded policy, else the paper's: BOS/EOS and a BOS-less position 0 stay "
                             "original)")
    adapter: list[str] = opt(factory=list, help="NAME=PATH of an adapter bundle to load at start",
                             split=False)
    adapter_root: str | None = opt(None, "folder from which adapters may be loaded at runtime "
                                   "(POST /v1/load_lora_adapter); runtime loading is off without it")
    max_adapters: int = opt(32, "adapters loaded at once; a load beyond it gets 409 (unload one first)")
    host: str = opt("127.0.0.1", "bind address")
    port: int = opt(8000, "port")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on every route but /health (also "
                              "$SAELORA_API_KEY or --api-key-file: a flag shows in `ps`, the others do not)")
    api_key_file: str | None = opt(None, "read the API key from this file (its first line)")
    admin_api_key: str | None = opt(None, "key for adapter load/unload and steering-preset changes, also accepted "
                                    "wherever the API key is (also $SAELORA_ADMIN_API_KEY or --admin-api-key-file; "
                                    "with an API key alone they are refused)")
    admin_api_key_file: str | None = opt(None, "read the admin API key from this file (its first line)")
    allow_origin: list[str] = opt(factory=list, help="an origin whose web pages may call this server (CORS), e.g. "
                                  "where a static copy of the /ui page is hosted ('null' for a page opened as a "
                                  "file); none by default", split=False)
    allow_unauthenticated: bool = opt(False, "serve a non-loopback --host without an API key (refused otherwise)",
                                      flag=True)
    presets: str | None = opt(None, "folder of steering presets (one JSON file each, PUT /v1/steering/presets/NAME "
                              "writes there; default: kept in memory only)")
    served_model_name: str | None = opt(None, "model id clients use (default: the model spec)")
    max_batch: int = opt(8, "rows decoded together (vLLM: max_num_seqs)")
    max_queue: int = opt(64, "waiting requests before 429")
    request_timeout: float | None = opt(None, "seconds a generation may run from admission to its last token; past "
                                        "it the request gets 504 (streamed: an error event) and its row is dropped")
    max_num_batched_tokens: int = opt(2048, "prompt tokens prefilled in one step, vLLM's option (its API server's "
                                      "CPU default), on both engines: vLLM chunks a longer prompt; the torch engine "
                                      "queues new rows past it (padded tokens count) and prefills a longer prompt "
                                      "alone")
    max_model_len: int | None = opt(None, "context window: prompt + max_tokens (default: the model's)")
    shutdown_grace: float = opt(30.0, "seconds in-flight requests get to finish after SIGTERM; new requests get "
                                "503 meanwhile")
    device: str | None = opt(None, "cpu or cuda (default: cuda if available)")
    engine: EngineName = opt("torch", "torch: the embedded transformers engine; vllm: vLLM with the SAE splice and "
                             "native multi-LoRA (needs saelora[vllm]; llama/mistral/qwen2/qwen3/gemma/gemma2/gemma3)")
    pack_weights: bool = opt(True, "torch engine on CPU: run linear layers (and TopK SAE encoders) on prepacked "
                             "oneDNN copies (~2x faster per decode step, one more copy of the weights in memory); "
                             "--no-pack-weights: F.linear / sae-lens on their own weights")
    kv_cache_gb: float = opt(2.0, "vLLM engine: KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE)")
    max_loras: int = opt(4, "vLLM engine: adapters resident at once; 0 turns LoRA off")
    max_lora_rank: int = opt(64, "vLLM engine: largest adapter rank accepted")
    tensor_parallel_size: int = opt(1, "vLLM engine: GPUs (or CPU core groups) the model is split over, as vLLM's "
                                    "option; the splice runs on the replicated residual stream and latents come "
                                    "back once (docs/scaling.md)", aliases=("-tp",))
    enforce_eager: bool = opt(False, "vLLM engine: run the model eagerly, as vLLM's flag (no torch.compile, no CUDA "
                              "graphs); by default vLLM compiles around the splice op (on CPU, not while LoRA is on: "
                              "vLLM's own rule)")
    prefix_caching: bool = opt(True, "vLLM engine: prefix caching, with a cache_salt policy that keeps latents and "
                               "edits correct (docs/vllm.md); --no-prefix-caching turns it off")

    def __post_init__(self) -> None:
        """The bounds of the work options (a bad value is a clear error at start, never a server that refuses
        everything)."""
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_adapters < 0:
            raise ConfigError(f"--max-adapters must be >= 0, got {self.max_adapters}")
