"""The part both engines share: one background thread owns the model.

Between steps the thread runs commands (adapter load/unload, encode-only work) and admits queued
requests; then the engine advances every running request by one step. The event loop side streams each
request's events from an asyncio queue that the thread fills (`_stream`), and awaits commands (`_call`).
Request validation (`_check`: the one check of a request, on admission; nothing checks it again per step), the
adapter registry, EOS ids, the context limit, SAE/adapter listings, adapter loading and unloading are shared too;
the row core (rows.py) holds what a request in flight follows.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from saelora.adapters.models import LoadedModel, stop_token_ids
from saelora.adapters.saes import LoadedSAE

from .engine import Engine, EngineError, Event, Finished, GenerationRequest, LogitPairs, check_request
from .registry import AdapterRegistry, safe_adapter_path
from .rows import context_limit

log = logging.getLogger(__name__)
COMMAND_SLACK = 8  # engine commands beyond the admitted ones: adapter loads and unloads
FAILING_STEPS, FAILING_WINDOW_S = 3, 60.0  # that many consecutive failed steps, the last this recent: not healthy

Emit = Callable[[Any], None]


class ThreadedEngine(Engine):
    #: tokens an engine asks the model for beyond max_tokens (the vLLM engine: one, for the last token's latents)
    reserve_tokens = 0

    def __init__(self, lm: LoadedModel, saes: list[LoadedSAE], max_batch: int, max_queue: int,
                 max_model_len: int | None = None, adapter_root: str | None = None, max_adapters: int = 32,
                 request_timeout: float | None = None) -> None:
        self.lm, self.model_id = lm, lm.spec
        self.max_batch, self.max_queue = max_batch, max_queue
        self.adapter_root = adapter_root  # folder runtime adapter loads are confined to (None: no runtime loads)
        self.request_timeout = request_timeout  # seconds from admission to a generation's last event (None: none)
        self.in_flight = 0  # requests accepted and not yet finished (running or waiting), event-loop side
        self.failed_steps, self.last_failure = 0, 0.0  # consecutive failed engine steps, and when the last was
        self.sae_list, self.sae_map = saes, {s.name: s for s in saes}
        self.registry = AdapterRegistry(lm.fingerprint, saes, lm.model, max_adapters)
        self.tokenizer, self.eos = lm.tokenizer, stop_token_ids(lm)
        self._max_len = context_limit(lm.model.config, max_model_len, self.reserve_tokens)
        self.incoming: queue.Queue[Any] = queue.Queue()  # bounded by admission (`_admitted`)
        # model work is bounded by admission too; the slack is for adapter loads/unloads (admin only)
        self.commands: queue.Queue[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = \
            queue.Queue(maxsize=max_batch + max_queue + COMMAND_SLACK)
        self.dead: str | None = None  # why the engine thread stopped serving (then every request gets 503)
        self._held: Any | None = None  # a row taken from `incoming` and put back (it did not fit this step)
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.running = False

    # ---- what an engine provides to the loop ---------------------------------------------------------
    def _setup(self) -> None:
        """Runs first on the engine thread (the vLLM engine builds vLLM here)."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Take queued requests (`self.incoming`) into the running batch."""

    @abc.abstractmethod
    def _busy(self) -> bool:
        """Whether any request is running."""

    @abc.abstractmethod
    def _step(self) -> None:
        """Advance every running request by one step."""

    @abc.abstractmethod
    def _fail_running(self, error: Exception) -> None:
        """A step raised: fail the running requests (the server keeps serving)."""

    @abc.abstractmethod
    def _load(self, name: str, path: Path) -> None:
        """Engine thread: validate the bundle at `path` (`registry.validate`), attach it as `name`, register it."""
        raise NotImplementedError

    @abc.abstractmethod
    def _detach(self, name: str) -> None:
        """Engine thread: drop adapter `name` from the model."""

    # ---- shared parts of the interface ---------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def sae_names(self) -> list[str]:
        return list(self.sae_map)

    def saes(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.sae_list]

    def adapters(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.registry.entries.values()]

    def _check(self, req: GenerationRequest) -> GenerationRequest:
        return check_request(req, self.saes(), len(self.tokenizer), self._max_len)

    async def latent_logits(self, sae: str, index: int, k: int) -> LogitPairs | None:
        """On the engine thread, like every torch op of a server (adapters/threads.py: a parallel op on another
        thread would start a second OpenMP team and slow every request after it)."""
        from saelora.adapters.logit_lens import latent_logits

        return await self._call(lambda: latent_logits(self.lm.model, self.sae_map[sae], index, k))

    async def similar_latents(self, sae: str, index: int, n: int) -> list[tuple[int, float]]:
        from saelora.adapters.logit_lens import similar_latents

        return await self._call(lambda: similar_latents(self.sae_map[sae], index, n))

    def _check_encode(self, prompt_ids: list[int], saes: list[str] | None) -> None:
        if len(prompt_ids) > self._max_len:
            raise EngineError("context_length", f"the input has {len(prompt_ids)} tokens; the limit is {self._max_len}",
                              "input")
        unknown = set(saes or []) - set(self.sae_names)
        if unknown:
            raise EngineError("not_found", f"unknown SAE ids {sorted(unknown)}", "saes")

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Validate, copy, read and attach the bundle at `path` (under the adapter root) as `name`, all in one
        command on the engine thread, between two steps (decision 45): the load then has the CPU to itself
        instead of sharing two cores with a decode step, and two loads can never race each other."""
        real = safe_adapter_path(self.adapter_root, path)
        self.registry.check_new(name)  # answered at once; validation checks it again on the engine thread
        await self._call(lambda: self._load(name, real), work=False)
        return self.registry.entries[name].describe()

    async def unload_adapter(self, name: str) -> None:
        entry = self.registry.remove(name)  # 404 / 409 (in use) before anything changes
        try:
            await self._call(lambda: self._detach(name), work=False)
        except BaseException:
            self.registry.entries[name] = entry
            raise
        self.registry.discard(entry)

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        loop, started = asyncio.get_running_loop(), None
        started = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if not started.done():
                started.set_exception(error) if error else started.set_result(None)

        self.running = True
        self.thread = threading.Thread(target=self._main, args=(lambda e: loop.call_soon_threadsafe(settle, e),),
                                       name="saelora-engine", daemon=True)
        self.thread.start()
        await started

    async def stop(self) -> None:
        self.running = False
        self.wake.set()
        if self.thread:
            await asyncio.to_thread(self.thread.join, 10)
        self.registry.close()

    @property
    def ready(self) -> bool:
        """Up and serving: the engine thread is alive, and its last FAILING_STEPS steps did not all fail within
        the last FAILING_WINDOW_S seconds (/health answers 503 otherwise, so an orchestrator can restart it)."""
        alive = self.running and self.dead is None and self.thread is not None and self.thread.is_alive()
        return alive and not self._failing()

    @property
    def not_ready_reason(self) -> str:
        if self.dead is not None:
            return self.dead
        if self.running and self._failing():
            return "the engine's last steps all failed (the server log says why)"
        return super().not_ready_reason

    def _failing(self) -> bool:
        return self.failed_steps >= FAILING_STEPS and time.monotonic() - self.last_failure < FAILING_WINDOW_S

    # ---- event loop side ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """One rule for both engines and every route that runs the model: max_batch rows run, max_queue more wait
        (in our queue or vLLM's), then 429; a dead engine thread answers 503."""
        if self.dead is not None:
            raise EngineError("not_ready", self.dead)
        if self.in_flight >= self.max_batch + self.max_queue:
            raise EngineError("queue_full", "the server is at capacity; retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _stream(self, make_row: Callable[[Emit], Any]) -> AsyncIterator[Event]:
        """Queue the row `make_row(emit)` builds and yield its events until `Finished` (or an error)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with self._admitted():
            row = make_row(lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))  # may raise: nothing held
            row.hold(self.registry)
            self.incoming.put(row)
            self.wake.set()
            deadline = None if self.request_timeout is None else loop.time() + self.request_timeout
            try:
                while True:
                    ev = await self._next_event(events, deadline)
                    if isinstance(ev, BaseException):
                        raise ev
                    yield ev
                    if isinstance(ev, Finished):
                        return
            finally:
                row.cancelled = True  # no-op when finished; otherwise the engine drops the row

    async def _next_event(self, events: asyncio.Queue, deadline: float | None) -> Any:
        if deadline is None:
            return await events.get()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:  # the caller's finally drops the row
            raise EngineError("timeout", f"the request ran past this server's --request-timeout "
                              f"({self.request_timeout:g} s)") from None

    async def _call(self, fn: Callable[[], Any], work: bool = True) -> Any:
        """Run `fn` on the engine thread between steps and return its result. `work` (model work: encode, steering
        vectors, auto-steer) counts against admission like a request; adapter loads and unloads do not."""
        if not work:
            return await self._command(fn)
        with self._admitted():
            return await self._command(fn)

    async def _command(self, fn: Callable[[], Any]) -> Any:
        if self.dead is not None:
            raise EngineError("not_ready", self.dead)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if not fut.done():
                    fut.set_exception(error) if error else fut.set_result(result)
            loop.call_soon_threadsafe(settle)
        try:
            self.commands.put_nowait((fn, done))
        except queue.Full:
            raise EngineError("queue_full", "the server is at capacity; retry shortly") from None
        self.wake.set()
        return await fut

    # ---- engine thread --------------------------------------------------------------------------------
    def _main(self, started: Callable[[BaseException | None], None]) -> None:
        try:
            self._setup()
        except BaseException as e:  # noqa: BLE001 - reported to start()
            log.exception("engine set-up failed")
            self.running = False
            started(e)
            return
        started(None)
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - outside a step (admission, commands): nothing serves now
            log.critical("the engine thread stopped", exc_info=e)
            self._abandon("the engine stopped serving (the server log says why); restart the server")
        finally:
            self._teardown()

    def _abandon(self, why: str) -> None:
        """Engine thread, dying: every request and command waiting on it gets a 503, and so does every new one."""
        self.dead = why
        error = EngineError("not_ready", why)
        self._fail_running(error)
        while (row := self._next_incoming()) is not None:
            row.fail(error)
        while True:
            try:
                _, done = self.commands.get_nowait()
            except queue.Empty:
                return
            done(None, error)

    def _loop(self) -> None:
        while self.running:
            self._run_commands()
            self._admit()
            if not self._busy():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self._step()
                self.failed_steps = 0
            except Exception as e:  # noqa: BLE001 - fail the rows, keep serving
                log.exception("engine step failed")
                self.failed_steps, self.last_failure = self.failed_steps + 1, time.monotonic()
                self._fail_running(e)

    def _teardown(self) -> None:
        """Engine thread, after the loop: release what the engine started (child processes, above all)."""

    def _next_incoming(self) -> Any | None:
        """The next queued row that is still wanted (cancelled ones release their adapter), or None."""
        while True:
            row, self._held = self._held, None
            if row is None:
                try:
                    row = self.incoming.get_nowait()
                except queue.Empty:
                    return None
            if not row.cancelled:
                return row
            row.release()

    def _put_back(self, row: Any) -> None:
        """Engine thread: `row` (from `_next_incoming`) waits for the next step, first in line."""
        self._held = row

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                done(fn(), None)
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                done(None, e)
