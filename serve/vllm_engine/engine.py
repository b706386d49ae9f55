"""`VllmEngine`: the server's engine interface over vLLM (`saelora serve --engine vllm`).

One thread owns a vLLM `LLMEngine` (in-process by default: `VLLM_ENABLE_V1_MULTIPROCESSING=0`) and calls
`step()`; vLLM does the batching (continuous batching, paged KV cache, chunked prefill, multi-LoRA). Each
request carries its splice settings in `SamplingParams.extra_args` (see tracker.py); after each step the
engine drains the captured latents and releases token events once their latents are in.

Semantics match the torch engine (the reference):
- sampling stops at the tokenizer's EOS, at `max_tokens` or at a stop string, all decided here (vLLM runs
  with `ignore_eos` and no stop strings, the model's generation_config ignored), text comes from the same
  `Detokenizer`;
- a token's latents are those at its own position, computed when it is fed back, so with latents on vLLM
  is asked for one token more than `max_tokens` and the extra token is dropped;
- prefix caching stays on, with a policy that keeps it correct (`cache_salt`): requests that do not change
  the stream share the base cache; requests that do are salted by their splice settings (and by prompt
  length when an edit targets prompt/generated positions); requests that want prompt latents get a salt of
  their own, so every prompt position is computed and captured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from saelora.adapters.errors import ConfigError
from saelora.adapters.models import LoadedModel
from saelora.adapters.saes import LoadedSAE
from saelora.adapters.edits import SERVE_MODE
from saelora.adapters.splice import RowSpec
from saelora.adapters.lora_targets import LLAMA_MODULES

from ..config import ServeConfig
from ..core.engine import EngineError, Event, GenerationRequest, PromptFeatures, TokenFeaturesOut, TokenScore
from ..core.rows import RowState
from ..core.threaded import Emit, ThreadedEngine
from . import ARCHITECTURES, compat, spliced_architecture
from .splice_op import SPLITTING_OPS

log = logging.getLogger(__name__)

# The modules saelora's trainer puts LoRA on (HF names in the llama/mistral/qwen/gemma families). vLLM wraps only
# these: with no list it also wraps lm_head, and every base request then pays a LoRA pass over the vocabulary.
LORA_TARGETS = LLAMA_MODULES  # vLLM builds LoRA layers for these on the llama-style families


def configure_cpu_env(kv_cache_gb: float, tensor_parallel_size: int = 1) -> None:
    """Defaults for vLLM on CPU, set before vLLM is imported: in-process, every core bound, no reserved core;
    with tensor parallelism the cores are split into one group per rank ("0,1|2,3", vLLM's CPU syntax)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    tp = tensor_parallel_size
    if len(cores) < tp:
        raise ConfigError(f"--tensor-parallel-size {tp} on CPU needs at least {tp} cores; this process has "
                          f"{len(cores)}")
    per = len(cores) // tp
    groups = [",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tp)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(groups))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class _Row(RowState):
    def __init__(self, rid: str, req: GenerationRequest, emit: Emit, engine: "VllmEngine",
                 prompt_only: bool = False) -> None:
        super().__init__(req, emit, engine.tokenizer, engine.eos, engine.sae_names, prompt_only)
        self.rid, self.prompt_only = rid, prompt_only
        self.last_pos = self.prompt_len - 1  # position of the last token vLLM returned (the extra one included)
        self.in_vllm = False  # added to vLLM and not finished there
        self.cached_tokens = 0  # prompt tokens vLLM took from its prefix cache
        self.scored = 0  # prompt positions whose logprobs vLLM has returned (the first one's None included)


class VllmEngine(ThreadedEngine):
    reserve_tokens = 1  # with latents on, vLLM is asked for one token more than max_tokens

    def __init__(self, lm: LoadedModel, saes: list[LoadedSAE], config: ServeConfig | None = None) -> None:
        self.opts = config or ServeConfig(engine="vllm")  # its vLLM settings and the shared ones
        arch = (getattr(lm.model.config, "architectures", None) or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ConfigError(f"the vLLM engine supports {', '.join(ARCHITECTURES)}; {lm.spec} is {arch}")
        if self.opts.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be at least 1, got {self.opts.tensor_parallel_size}")
        super().__init__(lm, saes, self.opts.max_batch, self.opts.max_queue, self.opts.max_model_len,
                         self.opts.adapter_root, self.opts.max_adapters, self.opts.request_timeout)
        self.arch = arch
        self.rows: dict[str, _Row] = {}
        self.lora_ids: dict[str, int] = {}
        self.startup_adapters: list[tuple[str, Any]] = []
        self.llm: Any = None
        self._next_id = 0
        self._lora_seq = 0  # LoRA ids handed to vLLM so far
        self.cached_tokens = 0  # total over finished requests
        self._inproc = True

    # ---- engine interface -----------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        running = min(len(self.rows), self.opts.max_batch)  # vLLM decodes at most max_batch; the rest wait in it
        return {"running": running, "queued": max(0, self.in_flight - running),
                "adapters": len(self.registry.entries), "prefix_cached_tokens": self.cached_tokens}

    def _new_rid(self) -> str:
        self._next_id += 1
        return f"saelora-{self._next_id}"

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        req = self._check(req)
        rid = self._new_rid()
        async for ev in self._stream(lambda emit: _Row(rid, req, emit, self)):
            yield ev

    async def encode(self, prompt_ids: list[int], top_k: int, saes: list[str] | None,
                     adapter: str | None) -> list[TokenFeaturesOut]:
        from ..core.engine import Sampling

        self._check_encode(prompt_ids, saes)
        spec = RowSpec(modes={n: "off" for n in self.sae_names}, prompt_len=len(prompt_ids), top_k=top_k,
                       include_prompt=True, report=saes)
        req = GenerationRequest(list(prompt_ids), Sampling(max_tokens=1, temperature=0.0), spec, adapter)
        rid, tokens = self._new_rid(), []
        async for ev in self._stream(lambda emit: _Row(rid, req, emit, self, prompt_only=True)):
            if isinstance(ev, PromptFeatures):
                tokens = ev.tokens
        return tokens

    def load_adapter_now(self, name: str, path: str) -> None:
        """Start-up loading (trusted paths from the command line); added to vLLM once it is built."""
        bundle = self._validate_adapter(name, Path(path).resolve())
        self.startup_adapters.append((name, bundle))
        self.registry.add(name, bundle)

    def _load(self, name: str, path: Path) -> None:
        self._add_lora(name, self._validate_adapter(name, path))

    def _validate_adapter(self, name: str, path: Path) -> Any:
        if self.opts.max_loras <= 0:
            raise EngineError("invalid", "this server runs without LoRA (--max-loras 0)", "lora_path")
        bundle = self.registry.validate(name, path)
        targets = bundle.lora_config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        other = sorted(set(targets) - set(LORA_TARGETS))
        if other:
            raise EngineError("invalid", f"the vLLM engine serves LoRA on {', '.join(LORA_TARGETS)}; this adapter "
                              f"also targets {other}", "lora_path")
        rank = int(bundle.lora_config.get("r", 0))
        if rank > self.opts.max_lora_rank:
            raise EngineError("invalid", f"adapter rank {rank} exceeds --max-lora-rank {self.opts.max_lora_rank}",
                              "lora_path")
        return bundle

    # ---- engine thread: set-up and adapters -----------------------------------------------------------
    def _setup(self) -> None:
        tp = self.opts.tensor_parallel_size
        configure_cpu_env(self.opts.kv_cache_gb, tp if self._on_cpu() else 1)  # the CPU settings; inert on GPUs
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        from .tracker import SliceTracker

        compat.install()  # checks vLLM's internals first: refuses to start if they changed
        # The splice's captures live where the model runs: in this process only with an in-process engine core
        # and a single worker; otherwise they are drained over RPC (from rank 0: every rank holds the same).
        self._inproc = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and tp == 1
        saes = [{"name": s.name, "path": s.source, "layer": s.hook.layer, "kind": s.hook.kind,
                 "policy": s.policy.to_json(), "center": s.center, "folded_scale": s.folded_scale}
                for s in self.sae_list]
        lora = self.opts.max_loras > 0
        args = EngineArgs(
            model=self.lm.path, tokenizer=self.lm.path, dtype=str(self.lm.model.dtype).removeprefix("torch."),
            enforce_eager=self.opts.enforce_eager, compilation_config=self._compilation(),
            max_model_len=self._max_len + 1, max_num_seqs=self.opts.max_batch, seed=0,
            max_num_batched_tokens=self.opts.max_num_batched_tokens,
            disable_log_stats=True,
            enable_prefix_caching=self.opts.prefix_caching, generation_config="vllm", tensor_parallel_size=tp,
            hf_overrides={"architectures": [spliced_architecture(self.arch)], "saelora_saes": saes},
            logits_processors=[SliceTracker],
            worker_extension_cls="saelora.serve.vllm_engine.tracker.SaeloraWorkerExtension",
            enable_lora=lora, max_loras=max(1, self.opts.max_loras), max_lora_rank=self.opts.max_lora_rank,
            lora_target_modules=list(LORA_TARGETS) if lora else None,
            kv_cache_memory_bytes=None if self._on_cpu() else int(self.opts.kv_cache_gb * 2**30))
        self.llm = LLMEngine.from_engine_args(args)
        for name, bundle in self.startup_adapters:
            self._add_lora(name, bundle, register=False)
        mode = self.llm.vllm_config.compilation_config.mode
        log.info("vLLM engine ready: %s (%s) with %d SAE(s), in-process=%s, compilation %s", self.lm.spec, self.arch,
                 len(saes), self._inproc, getattr(mode, "name", mode))

    def _teardown(self) -> None:
        # With VLLM_ENABLE_V1_MULTIPROCESSING=1 the engine core is a child process; it is stopped here, not left
        # to a finalizer that may never run (tests/serve/test_shutdown.py checks no child outlives the server).
        core = getattr(getattr(self, "llm", None), "engine_core", None)
        if core is not None:
            core.shutdown(timeout=5)

    def _compilation(self) -> dict[str, Any]:
        """On GPUs the splice op splits vLLM's piecewise graphs, as attention does (splice_op.py); on CPU vLLM
        compiles the whole model in one trace, the op an opaque call inside it, and ignores splitting ops."""
        if self.opts.enforce_eager or self._on_cpu():
            return {}  # vLLM's defaults
        from vllm.config import CompilationConfig

        return {"splitting_ops": [*CompilationConfig._attention_ops, *SPLITTING_OPS]}

    def _on_cpu(self) -> bool:
        return str(self.lm.info.get("device") or self.lm.model.device).startswith("cpu")

    def _add_lora(self, name: str, bundle: Any, register: bool = True) -> None:
        from vllm.lora.request import LoRARequest

        # Never reuse an id: vLLM keys its prefix cache by LoRA id, so a reload (new content) must get a new one.
        self._lora_seq += 1
        lora_id = self._lora_seq
        if not self.llm.add_lora(LoRARequest(name, lora_id, str(bundle.path))):
            raise EngineError("invalid", f"vLLM could not load adapter {name!r}", "lora_path")
        self.lora_ids[name] = lora_id
        if register:
            self.registry.add(name, bundle)
        log.info("adapter %s loaded from %s (LoRA id %d)", name, bundle.path, lora_id)

    def _detach(self, name: str) -> None:
        self.llm.remove_lora(self.lora_ids.pop(name))
        log.info("adapter %s unloaded", name)

    # ---- engine thread: requests -------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self.rows)

    def _admit(self) -> None:
        while (row := self._next_incoming()) is not None:
            try:
                self._add_request(row)
            except Exception as e:  # noqa: BLE001
                log.exception("adding a request to vLLM failed")
                self._fail(row, e)

    def _add_request(self, row: _Row) -> None:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        from .tracker import encode_settings

        req, s = row.req, row.req.sampling
        extra = self.reserve_tokens if row.waits and not row.prompt_only else 0  # the last token's latents
        params = SamplingParams(  # vLLM samples at least one token: a max_tokens 0 row ignores it (the row core)
            n=1, max_tokens=max(1, s.max_tokens) + extra, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k if s.top_k and s.top_k > 0 else 0, seed=s.seed, logprobs=s.logprobs, ignore_eos=True,
            prompt_logprobs=s.prompt_logprobs,
            detokenize=False, output_kind=RequestOutputKind.DELTA, extra_args=encode_settings(row.rid, row.spec))
        prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_ids)}
        salt = self._cache_salt(row)
        if salt:
            prompt["cache_salt"] = salt
        lora = None
        if req.adapter is not None:
            lora = LoRARequest(req.adapter, self.lora_ids[req.adapter], str(self.registry.entries[req.adapter]
                                                                              .bundle.path))
        self.llm.add_request(row.rid, prompt, params, lora_request=lora)
        row.in_vllm = True
        self.rows[row.rid] = row

    def _cache_salt(self, row: _Row) -> str | None:
        """None: may share the base model's prefix cache. See the module docstring for the policy."""
        sp = row.spec
        if row.prompt_due:
            return "prompt-latents-" + row.rid  # every prompt position must be computed (and captured)
        modes = {name: sp.modes.get(name, SERVE_MODE) for name in self.sae_names}
        if not any(sp.changes_stream(name, SERVE_MODE) for name in self.sae_names):
            return None  # the stream is the base model's
        by_len = any(e.positions in ("prompt", "generated") for e in sp.edits)
        key = json.dumps([modes, [e.to_json() for e in sp.edits], row.prompt_len if by_len else None],
                         sort_keys=True)
        return "splice-" + hashlib.sha256(key.encode()).hexdigest()[:24]

    def _step(self) -> None:
        for row in [r for r in self.rows.values() if r.cancelled]:
            self._close(row)
        if not self.rows:
            return
        outputs = self.llm.step()
        self._collect_latents()
        for out in outputs:
            row = self.rows.get(out.request_id)
            if row is None:
                continue
            if out.prompt_logprobs:  # a delta: the positions scored since the last step (chunked prefill)
                k = row.req.sampling.prompt_logprobs or 0
                row.add_prompt_scores(row.scored, [_score(row.req.prompt_ids[row.scored + j], d, k)
                                                   for j, d in enumerate(out.prompt_logprobs)])
                row.scored += len(out.prompt_logprobs)
            for comp in out.outputs[:1]:
                for j, tok in enumerate(comp.token_ids):
                    row.last_pos += 1
                    row.read_through(row.last_pos - 1)  # every position before a returned token has been read
                    self._on_token(row, tok, comp.logprobs[j] if comp.logprobs else None)
            row.cached_tokens = max(row.cached_tokens, out.num_cached_tokens or 0)
            if out.finished:
                row.in_vllm = False
        for row in list(self.rows.values()):
            self._release(row)

    def _collect_latents(self) -> None:
        if self._inproc:
            from .tracker import pop_captures

            caps, stops = pop_captures()
        else:
            caps, stops = self.llm.collective_rpc("saelora_pop_captures")[0]
        for rid, hits in stops.items():
            if rid in self.rows:
                for pos in hits:
                    self.rows[rid].add_stop(pos)
        for rid, per_sae in caps.items():
            row = self.rows.get(rid)
            if row is not None:
                for name, per_pos in per_sae.items():
                    for pos, (indices, values) in per_pos.items():
                        row.add_latents(name, pos, indices, values)

    def _on_token(self, row: _Row, tok: int, logprobs: Any) -> None:
        if row.prompt_only:
            row.generated, row.reason = 1, "length"
            return
        s = row.req.sampling
        lp, top = _logprobs(tok, logprobs, s.logprobs) if s.logprobs is not None else (None, None)
        row.take(tok, lp, top)

    def _release(self, row: _Row) -> None:
        """Emit what is ready (the row core); close the row in vLLM once it has finished."""
        if row.flush(final=not row.in_vllm):  # final: nothing more will be computed for this row
            self._close(row)

    def _close(self, row: _Row) -> None:
        if row.in_vllm:
            self.llm.abort_request([row.rid])
            row.in_vllm = False
        if self.rows.pop(row.rid, None) is not None:
            self.cached_tokens += row.cached_tokens
        row.release()

    def _fail(self, row: _Row, error: Exception) -> None:
        self._close(row)
        row.fail(error)

    def _fail_running(self, error: Exception) -> None:
        for row in list(self.rows.values()):
            try:
                self._fail(row, error)
            except Exception:  # noqa: BLE001 - vLLM itself may be broken; the row is failed anyway
                self.rows.pop(row.rid, None)


def _score(tok: int, logprobs: dict[int, Any] | None, k: int) -> TokenScore | None:
    """vLLM's {token: Logprob(logprob, rank)} at a prompt position (None at the first) -> the prompt token's
    logprob and rank, and the top k by rank (vLLM adds the prompt token to its top k)."""
    if logprobs is None:
        return None
    own = logprobs[tok]
    ranked = sorted((v.rank, t, v.logprob) for t, v in logprobs.items() if v.rank is not None and v.rank <= k)
    return float(own.logprob), int(own.rank), [(int(t), float(v)) for _, t, v in ranked[:k]]


def _logprobs(tok: int, logprobs: dict[int, Any], k: int) -> tuple[float | None, list[tuple[int, float]]]:
    """vLLM's {token: Logprob(logprob, rank)} of one position -> the sampled token's logprob and the top k."""
    lp = logprobs.get(tok)
    ranked = sorted(((v.rank, t, v.logprob) for t, v in logprobs.items() if v.rank is not None and v.rank <= k))
    return (float(lp.logprob) if lp is not None else None), [(int(t), float(v)) for _, t, v in ranked[:k]]
