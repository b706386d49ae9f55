"""The embedded torch engine: transformers + the splice + the engine's own LoRA layers (lora.py), with step-level
continuous batching.

One background thread owns the model. Between steps it runs commands (adapter load/unload, encode-only
requests) and admits queued requests (their prompts are prefilled together, left-padded); then one
batched decode step advances every running row, each with its own adapter (`__base__`
for none), splice mode, edits and sampling settings. The rows' KV caches are one batched, left-padded cache
kept across steps (kv.py): it is rebuilt from per-row caches only when rows join, and rows that leave are
selected out; rows with the same prompt and splice settings (a request's n choices) share one prefill.

A generated token's latents are those at the token's own position, known one step after it is sampled;
so with features on, a token's event is released one step later, and a finished row takes one more
(feature-only) step. When every row of a step is such a finished row, the step runs only up to the deepest SAE.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from saelora.adapters.activations import run_to_hook
from saelora.adapters.bundle import lora_weights
from saelora.adapters.hooks import unwrap
from saelora.adapters.models import LoadedModel
from saelora.adapters.saes import LoadedSAE
from saelora.adapters.edits import SERVE_MODE
from saelora.adapters.splice import RowSpec
from saelora.adapters.splice_hooks import Splice

from . import kv
from ..config import ServeConfig
from .lora import ServedLoRA
from ..core.packed import pack_linears, pack_sae_encoder
from ..core.engine import EngineError, Event, GenerationRequest, RowFailure, TokenFeaturesOut
from ..core.registry import BASE
from ..core.rows import RowState
from ..core.sampling import logprobs_of, prompt_scores, sample
from ..core.threaded import ThreadedEngine

log = logging.getLogger(__name__)


class _Row(RowState):
    def __init__(self, req: GenerationRequest, emit: Callable[[Any], None], engine: "TorchEngine") -> None:
        super().__init__(req, emit, engine.tokenizer, engine.eos, engine.sae_names)
        self.ids = list(req.prompt_ids)  # every token fed, or to be fed next
        self.kv: kv.RowKV | None = None  # its own cache while outside the engine's batched one
        self.cached = 0  # tokens in its KV cache
        seed = req.sampling.seed
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None


def _prefill_groups(rows: list[_Row]) -> tuple[list[_Row], list[int]]:
    """One representative per group of rows with the same prefill (the one asking the most latents), and each
    row's group."""
    index: dict[Any, int] = {}
    reps: list[_Row] = []
    group = []
    for r in rows:
        key = (tuple(r.ids), r.req.adapter, tuple(sorted(r.spec.modes.items())), tuple(r.spec.edits))
        if key not in index:
            index[key] = len(reps)
            reps.append(r)
        elif r.spec.top_k > reps[index[key]].spec.top_k:
            reps[index[key]] = r
        group.append(index[key])
    return reps, group


class TorchEngine(ThreadedEngine):
    steers_from_text = True  # the model is in this process (DiffMean vectors, auto-steer)

    def __init__(self, lm: LoadedModel, saes: list[LoadedSAE], max_batch: int = ServeConfig.max_batch,
                 max_queue: int = ServeConfig.max_queue, max_model_len: int | None = ServeConfig.max_model_len,
                 adapter_root: str | None = ServeConfig.adapter_root,
                 pack_weights: bool = ServeConfig.pack_weights, max_adapters: int = ServeConfig.max_adapters,
                 max_num_batched_tokens: int = ServeConfig.max_num_batched_tokens,
                 request_timeout: float | None = ServeConfig.request_timeout) -> None:
        """Settings and their defaults are `ServeConfig`'s (serve/config.py)."""
        super().__init__(lm, saes, max_batch, max_queue, max_model_len, adapter_root, max_adapters, request_timeout)
        self.max_prefill_tokens = max_num_batched_tokens
        self.model = lm.model
        self.splice = Splice(lm.model, saes, mode=SERVE_MODE).install()
        # where a step that only reads latents can stop (None: no SAE, so no such step)
        self._deepest = max((s.hook for s in saes), key=lambda p: p.depth) if saes else None
        eos = lm.tokenizer.eos_token_id
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (eos or 0)
        self.active: list[_Row] = []
        self.lora = ServedLoRA(lm.model)  # adapters beside the base layers, per-row in one op pair (lora.py)
        self._batch: tuple[list[_Row], Any] | None = None  # the rows of the batched KV cache kept across steps
        # prefill computes the vocabulary logits of each row's last position only (not T × V of them)
        self._keep_last = "logits_to_keep" in inspect.signature(unwrap(lm.model).forward).parameters
        self.pack_weights = pack_weights

    def _setup(self) -> None:
        if self.pack_weights:  # on the engine thread: the reorder is a parallel op (adapters/threads.py)
            pack_linears(self.lm.model)
            for s in self.splice.saes.values():
                pack_sae_encoder(s.sae)

    def stats(self) -> dict[str, float]:
        return {"running": len(self.active), "queued": max(0, self.in_flight - len(self.active)),
                "adapters": len(self.registry.entries)}

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        req = self._check(req)
        async for ev in self._stream(lambda emit: _Row(req, emit, self)):
            yield ev

    async def steering_vector(self, sae: str, positive: list[str], negative: list[str]) -> list[float]:
        """DiffMean, on the engine thread between steps (the base model: no adapter, no splice change)."""
        from saelora.adapters.steering import diffmean, read_texts

        def run() -> list[float]:
            s = self.splice.saes[sae]
            try:
                return diffmean(read_texts(self.lm.model, self.tokenizer, s, positive),
                                read_texts(self.lm.model, self.tokenizer, s, negative)).tolist()
            except ValueError as e:  # a side with no position the SAE is spliced at: depends on this server's
                raise EngineError("not_found", f"{e}: no token of one text set sits at a position SAE {sae!r} "
                                  "is spliced at (a row's first token stays original)", "positive") from e
        return await self._call(run)

    async def auto_steer(self, sae: str, positive: list[str], negative: list[str], prompts: list[str] | None,
                         max_fluency_gap: float) -> Any:
        """Auto-steer as one command on the engine thread, with the engine's own splice (its hooks are the only
        ones on the model): running requests wait for it (bounded: adapters/autosteer.py)."""
        from saelora.adapters.autosteer import auto_steer

        def run() -> Any:
            try:
                return auto_steer(self.lm, self.splice, self.splice.saes[sae], positive, negative, prompts,
                                  max_fluency_gap=max_fluency_gap)
            except ValueError as e:  # texts too short to read or to score against
                raise EngineError("invalid", str(e), "positive") from e
        return await self._call(run)

    async def encode(self, prompt_ids: list[int], top_k: int, saes: list[str] | None,
                     adapter: str | None) -> list[TokenFeaturesOut]:
        self._check_encode(prompt_ids, saes)
        self.registry.acquire(adapter)
        try:
            return await self._call(lambda: self._encode(prompt_ids, top_k, set(saes or self.splice.saes), adapter))
        finally:
            self.registry.release(adapter)

    def load_adapter_now(self, name: str, path: str) -> None:
        """Start-up loading (trusted paths from the command line), before the engine thread runs."""
        self._load(name, Path(path).resolve())

    # ---- engine thread ------------------------------------------------------------------------------
    def _load(self, name: str, path: Path) -> None:
        bundle = self.registry.validate(name, path)  # also: the name is free (nothing else runs meanwhile)
        try:
            weights = lora_weights(bundle, self.model)
        except (ValueError, TypeError, KeyError) as e:  # a config value PEFT refuses, a tensor name that misleads
            raise EngineError("invalid", f"adapter {name!r} cannot be read: {type(e).__name__}: {e}",
                              "lora_path") from e
        try:
            self.lora.attach(name, weights)
        except ValueError as e:  # nothing was attached
            raise EngineError("invalid", f"adapter {name!r} cannot be attached: {e}", "lora_path") from e
        self.registry.add(name, bundle)
        log.info("adapter %s loaded from %s", name, bundle.path)

    def _detach(self, name: str) -> None:
        self.lora.detach(name)
        log.info("adapter %s unloaded", name)

    def _busy(self) -> bool:
        return bool(self.active)

    def _step(self) -> None:
        self._decode_step()

    def _fail_running(self, error: Exception) -> None:
        for row in self.active:
            self._fail(row, error)
        self.active, self._batch = [], None

    def _admit(self) -> None:
        new: list[_Row] = []
        while len(self.active) + len(new) < self.max_batch:
            row = self._next_incoming()
            if row is None:
                break
            padded = (len(new) + 1) * max(len(r.ids) for r in [*new, row])  # left-padded: what the step computes
            if new and padded > self.max_prefill_tokens:
                self._put_back(row)  # the next step's first row
                break
            new.append(row)
        if new:
            try:
                self._prefill(new)
            except Exception as e:  # noqa: BLE001
                log.exception("prefill failed")
                for row in new:
                    self._fail(row, e)
                return
            self.active += [r for r in new if not r.done]

    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 latents_only: bool = False, all_logits: bool = False):
        """The batch's forward: (model output, captures, stops). `latents_only`: the rows need no logits, only
        their latents (finished rows' last tokens), so the layers after the deepest SAE do not run (output None;
        the cache is left part-extended: these rows are done with it). `all_logits`: every position's logits
        (a row scores its prompt), else only the last column's."""
        kwargs: dict[str, Any] = dict(attention_mask=mask, position_ids=pos.clamp(min=0), past_key_values=cache,
                                      use_cache=True)
        if self._keep_last and ids.shape[1] > 1 and not all_logits:
            kwargs["logits_to_keep"] = 1  # rows are left-padded: the last column is every row's last token
        top_k = max(r.req.splice.top_k for r in rows)
        with torch.no_grad(), self.splice.batch(rows=[r.spec for r in rows], positions=pos, top_k=top_k), \
                self.lora.rows([r.req.adapter or BASE for r in rows]):
            if latents_only:
                run_to_hook(self.model, self._deepest, ids, **kwargs)
                out = None
            else:
                out = self.model(input_ids=ids, **kwargs)
        return out, self.splice.pop_captures(), self.splice.pop_stops()

    def _prefill(self, rows: list[_Row]) -> None:
        """Prefill new rows together. Rows whose prompt, adapter, modes and edits are the same (the n choices of
        one request, above all) share one prefill: the same KV cache, logits and latents; each samples alone."""
        from transformers import DynamicCache

        reps, group = _prefill_groups(rows)
        ids, mask, pos = kv.left_pad([r.ids for r in reps], self.pad_id)  # (g, T) each
        scoring = any(r.scores is not None for r in rows)
        # stops watch generated tokens only
        out, caps, _ = self._forward(reps, ids, mask, pos, DynamicCache(), all_logits=scoring)
        kvs = kv.split(out.past_key_values, [len(r.ids) for r in reps])
        scored: dict[tuple[int, int], list] = {}  # (group, top k) -> the prompt's scores
        for row, i in zip(rows, group, strict=True):
            row.kv, row.cached = kvs[i], len(row.ids)  # shared tensors: only ever read (stacking copies them)
            if row.prompt_due:
                for j in range(ids.shape[1]):
                    if pos[i, j] >= 0:
                        self._feed_latents(row, caps, i, j, int(pos[i, j]))
            if row.scores is not None:  # left-padded: the prompt is the last prompt_len columns
                k, first = row.req.sampling.prompt_logprobs or 0, ids.shape[1] - row.prompt_len
                if (i, k) not in scored:  # a group's rows (n choices) share one prefill: score it once
                    scored[i, k] = prompt_scores(out.logits[i, first:-1], ids[i, first + 1:], k)
                row.add_prompt_scores(1, scored[i, k])
            row.read_through(row.prompt_len - 1)
            if not row.flush():  # a row that only scores its prompt (max_tokens 0) has finished here
                self._next_token(row, out.logits[i, -1])

    def _decode_step(self) -> None:
        for row in [r for r in self.active if r.cancelled]:
            self._drop(row)
        rows = self.active
        if not rows:
            self._batch = None
            return
        lengths = [r.cached for r in rows]
        cache = self._batch_cache(rows)
        s_max = cache.get_seq_length()
        ids = torch.tensor([[r.ids[-1]] for r in rows])  # (B, 1)
        mask = torch.tensor([[0] * (s_max - n) + [1] * (n + 1) for n in lengths])  # (B, S_max + 1)
        pos = torch.tensor([[n] for n in lengths])  # (B, 1)
        # every row only waits for its last token's latents
        flushing = self._deepest is not None and all(r.reason for r in rows)
        out, caps, stops = self._forward(rows, ids, mask, pos, cache, latents_only=flushing)
        self._batch = None if flushing else (list(rows), out.past_key_values)
        for i, (row, fed) in enumerate(zip(rows, lengths, strict=True)):  # the token fed sits at position `fed`
            row.cached += 1
            if row.top_k:
                self._feed_latents(row, caps, i, 0, fed)
            if stops is not None and bool(stops[i, 0]):
                row.add_stop(fed)  # stop_when: the token just read set off a watched latent
            row.read_through(fed)
            if not row.flush() and row.reason is None:
                self._next_token(row, out.logits[i, -1])
        self.active = [r for r in self.active if not r.done]

    def _batch_cache(self, rows: list[_Row]) -> Any:
        """The batched KV cache of `rows`, left-padded to the longest. It is kept from step to step: rows that
        leave are selected out (and columns that are padding in every remaining row trimmed); only when rows
        join are the caches split and stacked again. A step without joins copies no cache outside the model."""
        kept, cache = self._batch if self._batch is not None else ([], None)
        if cache is not None and kept == rows:
            return cache
        if cache is not None and set(map(id, rows)) <= set(map(id, kept)):
            where = {id(r): i for i, r in enumerate(kept)}
            cache.batch_select_indices(torch.tensor([where[id(r)] for r in rows], dtype=torch.long))
            kv.trim_left(cache, max(r.cached for r in rows))
            return cache
        if cache is not None and any(r in rows for r in kept):  # rows join: the batched ones get their caches back
            still = [r for r in kept if r in rows]
            where = {id(r): i for i, r in enumerate(kept)}
            cache.batch_select_indices(torch.tensor([where[id(r)] for r in still], dtype=torch.long))
            for r, r_kv in zip(still, kv.split(cache, [r.cached for r in still]), strict=True):
                r.kv = r_kv
        stacked, _ = kv.stack([r.kv for r in rows])
        for r in rows:
            r.kv = None  # lives in the batched cache now
        return stacked

    def _next_token(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token. A failure here (non-finite logits, a sampling error) ends this row
        with an error event; the other rows of the batch carry on."""
        try:
            self._sample_into(row, logits)
        except Exception as e:  # noqa: BLE001 - isolated to the row
            self._fail(row, e)

    def _sample_into(self, row: _Row, logits: torch.Tensor) -> None:
        s = row.req.sampling
        if not bool(torch.isfinite(logits).all()):
            raise RowFailure("the model produced non-finite logits for this request")
        tok = sample(logits, s, row.gen)
        lp, top = logprobs_of(logits, tok, s.logprobs) if s.logprobs is not None else (None, None)
        row.take(tok, lp, top)
        if not row.flush():
            row.ids.append(tok)  # fed next step (a finished row's last token too, for its latents)

    @staticmethod
    def _feed_latents(row: _Row, caps: dict[str, list[Any]], i: int, j: int, position: int) -> None:
        """Give `row` the top-k latents of batch row i, column j (its token at `position`)."""
        for name, per in caps.items():
            if per:
                row.add_latents(name, position, per[-1].indices[i, j].tolist(), per[-1].values[i, j].tolist())

    def _drop(self, row: _Row) -> None:
        row.end()
        self.active = [r for r in self.active if r is not row]

    def _fail(self, row: _Row, error: Exception) -> None:
        row.fail(error)

    def _encode(self, prompt_ids: list[int], top_k: int, report: set[str],
                adapter: str | None) -> list[TokenFeaturesOut]:
        names = [n for n in self.splice.saes if n in report]
        deepest = max((self.splice.saes[n].hook for n in names), key=lambda p: p.depth)
        ids = torch.tensor([prompt_ids])
        row = RowSpec(modes={n: "off" for n in self.splice.saes})
        positions = torch.arange(len(prompt_ids))[None]
        with torch.no_grad(), self.lora.rows([adapter or BASE]), \
                self.splice.batch(rows=[row], positions=positions, top_k=top_k):
            run_to_hook(self.model, deepest, ids)
        caps = self.splice.pop_captures()
        return [TokenFeaturesOut(j, prompt_ids[j], {name: (per[-1].indices[0, j, :top_k].tolist(),
                                                            per[-1].values[0, j, :top_k].tolist())
                                                     for name, per in caps.items() if name in report and per})
                for j in range(len(prompt_ids))]
