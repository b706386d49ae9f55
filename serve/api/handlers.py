"""OpenAI-compatible handlers: HTTP models (clients/protocol.py) <-> engine requests and events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import random
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Response
from pydantic import BaseModel

from saelora.adapters.splice import RowSpec
from saelora.clients import protocol as P

from ..core.engine import (Engine, EngineError, Event, Finished, GenerationRequest, PromptFeatures, PromptLogprobs,
                           Sampling, TokenEvent, TokenFeaturesOut, TokenScore)
from .errors import error_event
from .names import ModelName, resolve
from .scores import Reply, completion_logprobs, prompt_logprobs
from .steering import Steering
from .wire import choice_features, token_features

DEFAULT_CHAT_MAX_TOKENS = 256
JSON = "application/json"


class Handlers:
    def __init__(self, engine: Engine, served_name: str, on_finish: Callable[[int, int], None] | None = None,
                 steering: Steering | None = None) -> None:
        self.engine, self.name = engine, served_name
        self.steering = steering or Steering(engine)
        self.on_finish = on_finish or (lambda prompt, generated: None)  # token accounting (metrics)
        # Tokenising and building latent JSON run off the event loop, on one thread: a fast tokenizer must not
        # encode in two threads at once, and a response with per-token latents can be megabytes.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelora-tok")

    async def _off_loop(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, arg)

    async def _json(self, build: Callable[[], BaseModel]) -> Response:
        """The response `build()` makes, built and serialised off the event loop."""
        return Response(await self._off_loop(lambda _: build().model_dump_json(), None), media_type=JSON)

    # ---- request conversion ---------------------------------------------------------------------------
    def model_name(self, model: str | None) -> ModelName:
        """The request's `model`: the base, an adapter, or a name that carries the splice (serve/api/names.py)."""
        return resolve(model, self.name, [a["name"] for a in self.engine.adapters()],
                       self.steering.presets.items, bool(self.engine.saes()))

    def splice_request(self, sae: P.SAEOptions | None) -> RowSpec:
        """The engine's row spec (serve/api/steering.py: presets, units, vectors); none asked: the serving default
        (every SAE in `error_term` without edits, i.e. the base model's stream)."""
        return RowSpec() if sae is None else self.steering.splice_request(sae)

    def sampling(self, r: P.CompletionRequest | P.ChatCompletionRequest, max_tokens: int,
                 logprobs: int | None, prompt_logprobs: int | None = None) -> Sampling:
        try:
            stop = r.stop_list()
        except ValueError as e:
            raise EngineError("invalid", str(e), "stop") from e
        return Sampling(max_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k or -1,
                        seed=r.seed, stop=stop, logprobs=logprobs, ignore_eos=r.ignore_eos,
                        prompt_logprobs=prompt_logprobs)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[P.ChatMessage]) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise EngineError("invalid", "this model's tokenizer has no chat template; use /v1/completions", "messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # BatchEncoding in transformers 5

    def _requests(self, ids: list[int], n: int, sampling: Sampling, splice: RowSpec,
                  adapter: str | None, compare: bool = False) -> list[GenerationRequest]:
        """n choices (seeds seed, seed+1, ...); with `compare`, n unsteered ones follow (no edits, same seeds: a
        seed is drawn here when the request has none, so both halves sample alike)."""
        seed = sampling.seed if sampling.seed is not None or not compare else random.randrange(P.MAX_SEED - P.MAX_N)
        out = []
        for s_splice in [splice, dataclasses.replace(splice, edits=[])] if compare else [splice]:
            for i in range(n):
                s = dataclasses.replace(sampling, seed=None if seed is None else seed + i)
                out.append(GenerationRequest(ids, s, s_splice, adapter))
        return out

    # ---- running n choices ------------------------------------------------------------------------------
    async def _merged(self, reqs: list[GenerationRequest]) -> AsyncIterator[tuple[int, Event]]:
        """Events of all choices, interleaved as they come: (choice index, event)."""
        q: asyncio.Queue = asyncio.Queue()
        gens = [self.engine.generate(r) for r in reqs]

        async def pump(i: int, gen: AsyncIterator[Event]) -> None:
            try:
                async for ev in gen:
                    await q.put((i, ev))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await q.put((i, e))
        # Start the first generation eagerly so validation errors surface before any response is sent.
        first = await gens[0].__anext__()
        await q.put((0, first))
        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)
                 if i > 0 or not isinstance(first, Finished)]
        finished = 0
        try:
            while finished < len(reqs):
                i, ev = await q.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, Finished):
                    finished += 1
                    self.on_finish(ev.prompt_tokens, ev.completion_tokens)
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()
            # A generator cannot be closed while a task still runs it: wait for the cancelled tasks first.
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens:
                await g.aclose()

    # ---- completions --------------------------------------------------------------------------------------
    async def _completion_inputs(self, r: P.CompletionRequest) -> tuple[list[GenerationRequest], Reply]:
        name = self.model_name(r.model)
        sae = name.options(r.sae)
        p = r.prompt_text_or_ids()
        ids = await self._off_loop(self.tokenize, p) if isinstance(p, str) else list(p)  # off the event loop
        sampling = self.sampling(r, 16 if r.max_tokens is None else r.max_tokens, r.logprobs, r.prompt_scores_k())
        return (self._requests(ids, r.n, sampling, self.splice_request(sae), name.adapter,
                               compare=bool(sae and sae.compare)), Reply.of(r, ids, self.engine.tokenizer, sae))

    async def completion(self, r: P.CompletionRequest) -> Response | AsyncIterator[str]:
        reqs, reply = await self._completion_inputs(r)
        if r.stream:
            return await self._stream(reqs, r.n, chat=False, model=r.model or self.name, reply=reply)
        choices = await self._collect(reqs, reply)
        tok = self.engine.tokenizer

        def build() -> P.CompletionResponse:
            out = [P.CompletionChoice(index=i, text=(reply.text or "") + c.text, finish_reason=c.finish,
                                      logprobs=completion_logprobs(tok, c.tokens + ([c.eos] if c.eos else []),
                                                                   reply, c.scores)
                                      if r.logprobs is not None else None,
                                      prompt_logprobs=prompt_logprobs(tok, reply.ids, c.scores)
                                      if reply.prompt_logprobs and c.scores is not None else None,
                                      features=c.features(reqs[i].splice), unsteered=_unsteered(choices, reqs, r.n, i))
                   for i, c in enumerate(choices[:r.n])]
            return P.CompletionResponse(model=r.model or self.name, choices=out, usage=_usage(reqs, choices))
        return await self._json(build)

    async def _collect(self, reqs: list[GenerationRequest], reply: Reply) -> list[_Collected]:
        choices = [_Collected(self.engine.tokenizer, reply.compact) for _ in reqs]
        async for i, ev in self._merged(reqs):
            choices[i].add(ev)
        return choices

    async def chat(self, r: P.ChatCompletionRequest) -> Response | AsyncIterator[str]:
        name = self.model_name(r.model)
        sae = name.options(r.sae)
        ids = await self._off_loop(self.chat_ids, r.messages)
        budget = r.token_budget(min(DEFAULT_CHAT_MAX_TOKENS, max(1, self.engine.max_model_len - len(ids))))
        lp = (r.top_logprobs or 0) if r.logprobs else None
        reqs = self._requests(ids, r.n, self.sampling(r, budget, lp), self.splice_request(sae), name.adapter,
                              compare=bool(sae and sae.compare))
        reply = Reply.of(r, ids, self.engine.tokenizer, sae)
        if r.stream:
            return await self._stream(reqs, r.n, chat=True, model=r.model or self.name, reply=reply)
        choices = await self._collect(reqs, reply)

        def build() -> P.ChatCompletionResponse:
            out = [P.ChatChoice(index=i, message=P.ChatMessageOut(content=c.text), finish_reason=c.finish,
                                logprobs=c.chat_logprobs() if r.logprobs else None,
                                features=c.features(reqs[i].splice), unsteered=_unsteered(choices, reqs, r.n, i))
                   for i, c in enumerate(choices[:r.n])]
            return P.ChatCompletionResponse(model=r.model or self.name, choices=out, usage=_usage(reqs, choices))
        return await self._json(build)

    async def _stream(self, reqs: list[GenerationRequest], n: int, chat: bool, model: str,
                      reply: Reply | None = None) -> AsyncIterator[str]:
        """SSE lines. The first event is awaited before returning, so bad input still gets a 4xx status."""
        merged = self._merged(reqs)
        first = await merged.__anext__()
        return _sse(first, merged, _Stream(n, chat, model, self.engine.tokenizer, reply), self._off_loop)

    # ---- encode only ----------------------------------------------------------------------------------------
    async def features(self, r: P.FeaturesRequest) -> Response:
        name = self.model_name(r.model)
        if name.spliced:
            raise EngineError("invalid", f"/v1/features reads latents without a splice: name the model or adapter "
                              f"(`{name.name}` carries one)", "model")
        ids = await self._off_loop(self.tokenize, r.input) if r.input is not None else \
            await self._off_loop(self.chat_ids, r.messages or [])
        if not self.engine.saes():
            raise EngineError("invalid", "this server has no SAE loaded", "saes")
        toks = await self.engine.encode(ids, r.top_k, r.saes, name.adapter)
        return await self._json(lambda: P.FeaturesResponse(
            model=r.model or self.name, tokens=[token_features(t, self.engine.tokenizer) for t in toks],
            usage=P.Usage(prompt_tokens=len(ids), completion_tokens=0, total_tokens=len(ids))))


class _Collected:
    """One choice's events gathered for a non-streaming response."""

    def __init__(self, tokenizer: Any, compact: bool = False) -> None:
        self.tok, self.text, self.finish, self.compact = tokenizer, "", None, compact
        self.tokens: list[TokenEvent] = []
        self.prompt: list[TokenFeaturesOut] | None = None
        self.scores: list[TokenScore | None] | None = None  # the prompt's logprobs, when asked
        self.eos: TokenEvent | None = None  # the EOS token that ended the choice (listed in its logprobs)
        self.prompt_tokens = self.completion_tokens = 0

    def add(self, ev: Event) -> None:
        if isinstance(ev, PromptFeatures):
            self.prompt = ev.tokens
        elif isinstance(ev, PromptLogprobs):
            self.scores = ev.scores
        elif isinstance(ev, TokenEvent):
            self.tokens.append(ev)
            self.text += ev.text
        elif isinstance(ev, Finished):
            self.text += ev.text
            self.finish = ev.finish_reason
            self.eos = ev.eos
            self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens

    def features(self, splice: RowSpec) -> P.ChoiceFeatures | None:
        if not splice.top_k:
            return None
        gen = [TokenFeaturesOut(t.position, t.token_id, t.features or {}) for t in self.tokens]
        return choice_features(self.prompt, gen, self.tok, self.compact)

    def chat_logprobs(self) -> P.ChatLogprobs:
        return P.ChatLogprobs(content=[_chat_lp(t, self.tok) for t in self.tokens])


def _chat_lp(t: TokenEvent, tok: Any) -> P.ChatTokenLogprob:
    s = tok.decode([t.token_id])
    return P.ChatTokenLogprob(token=s, logprob=t.logprob or 0.0, bytes=list(s.encode()),
                              top_logprobs=[P.TopLogprob(token=tok.decode([i]), logprob=v,
                                                         bytes=list(tok.decode([i]).encode()))
                                            for i, v in (t.top_logprobs or [])])


def _unsteered(choices: list[_Collected], reqs: list[GenerationRequest], n: int, i: int) -> P.Unsteered | None:
    """Choice i's unsteered twin (`compare`): request n + i, when there is one."""
    if len(choices) <= n:
        return None
    c = choices[n + i]
    return P.Unsteered(text=c.text, finish_reason=c.finish, features=c.features(reqs[n + i].splice))


def _usage(reqs: list[GenerationRequest], choices: list[_Collected]) -> P.Usage:
    completion = sum(c.completion_tokens for c in choices)
    prompt = len(reqs[0].prompt_ids)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


@dataclasses.dataclass(frozen=True)
class _Stream:
    """One streamed reply's constants: n choices (requests n and up are the unsteered twins, `compare`), the
    route (chat or completions), and what the request asked to see (`reply`)."""

    n: int
    chat: bool
    model: str
    tok: Any
    reply: Reply | None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    cid: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])

    def envelope(self, choice: BaseModel) -> dict[str, Any]:
        """A chunk around one choice: the one place the chunk's envelope is written."""
        if self.chat:
            return P.ChatCompletionChunk(id=f"chatcmpl-{self.cid}", created=self.created, model=self.model,
                                         choices=[choice]).model_dump(exclude_none=True)
        return {"id": f"cmpl-{self.cid}", "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice.model_dump(exclude_none=True)]}

    def chunk(self, i: int, ev: Event) -> dict[str, Any] | None:
        """The SSE chunk of event `ev` of request i (None: the event shows nothing); a twin's text, finish reason
        and latents go in the `unsteered` object of choice i - n."""
        reply, tok = self.reply, self.tok
        if isinstance(ev, PromptLogprobs):  # the echoed prompt: a choice's first chunk (twins echo nothing)
            if i >= self.n or reply is None:
                return None
            return self.envelope(P.CompletionChoice(
                index=i, text=reply.text or "",
                logprobs=completion_logprobs(tok, [], reply, ev.scores) if reply.logprobs else None,
                prompt_logprobs=prompt_logprobs(tok, reply.ids, ev.scores) if reply.prompt_logprobs else None))
        text = ev.text if isinstance(ev, (TokenEvent, Finished)) else ""
        finish = ev.finish_reason if isinstance(ev, Finished) else None
        feats, compact = None, reply is not None and reply.compact
        if isinstance(ev, PromptFeatures):
            feats = choice_features(ev.tokens, [], tok, compact)
        elif isinstance(ev, TokenEvent) and ev.features is not None:
            feats = choice_features(None, [TokenFeaturesOut(ev.position, ev.token_id, ev.features)], tok, compact)
        if i >= self.n:
            twin = P.Unsteered(text=text, finish_reason=finish, features=feats)
            return self.envelope(P.ChatChunkChoice(index=i - self.n, delta=P.ChatDelta(content=""), unsteered=twin)
                                 if self.chat else P.CompletionChoice(index=i - self.n, text="", unsteered=twin))
        if self.chat:
            lp = P.ChatLogprobs(content=[_chat_lp(ev, tok)]) \
                if isinstance(ev, TokenEvent) and ev.logprob is not None else None
            return self.envelope(P.ChatChunkChoice(index=i, delta=P.ChatDelta(content=text), finish_reason=finish,
                                                   logprobs=lp, features=feats))
        scored = ev.eos if isinstance(ev, Finished) else ev  # the EOS that ended the choice: listed, never shown
        lp = completion_logprobs(tok, [scored], offset=None) \
            if isinstance(scored, TokenEvent) and scored.logprob is not None else None
        return self.envelope(P.CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=lp,
                                                features=feats))


async def _sse(first: tuple[int, Event], rest: AsyncIterator[tuple[int, Event]], stream: _Stream,
               off_loop: Callable[..., Awaitable[Any]]) -> AsyncIterator[str]:
    async def line(i: int, ev: Event) -> str:  # the prompt's latents and scores (large events) encoded off the loop
        def encode(_: Any) -> str:
            chunk = stream.chunk(i, ev)
            return "" if chunk is None else f"data: {json.dumps(chunk)}\n\n"
        return await off_loop(encode, None) if isinstance(ev, (PromptFeatures, PromptLogprobs)) else encode(None)

    if stream.chat:
        for i in range(stream.n):
            head = stream.envelope(P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content="")))
            yield f"data: {json.dumps(head)}\n\n"
    try:
        yield await line(*first)
        async for i, ev in rest:
            yield await line(i, ev)
    except Exception as e:  # noqa: BLE001 - a failure mid-stream becomes an error event
        yield f"data: {json.dumps(error_event(e))}\n\n"
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
