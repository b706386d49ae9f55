"""The typed client against a live server; the terminal chat through a pseudo-terminal."""

import asyncio
import subprocess
import sys

import pexpect
import pytest

from conftest import SAE, make_engine
from saelora.clients import (AsyncSaeloraClient, ConflictError, ContextLengthError, Edit, InvalidRequestError,
                             NotFoundError, RateLimitError, SaeloraClient)
from saelora.clients import protocol as P
from server_util import LiveServer

pytestmark = pytest.mark.integration


def test_client_never_imports_torch():
    code = "import sys, saelora.clients, saelora.clients.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.fixture
def client(server):
    with SaeloraClient(server.url) as c:
        yield c


def test_typed_calls(client):
    assert client.default_model() == "tiny"
    r = client.complete("the cat sat on", max_tokens=4, temperature=0)
    assert isinstance(r, P.CompletionResponse) and r.usage.completion_tokens == 4
    chat = client.chat([{"role": "user", "content": "the cat"}], max_tokens=3, temperature=0)
    assert chat.choices[0].message.content
    streamed = "".join(d["choices"][0]["text"] for d in client.stream("the cat sat on", max_tokens=4, temperature=0))
    assert streamed == r.choices[0].text
    chunks = list(client.stream_chat([{"role": "user", "content": "the cat"}], max_tokens=3, temperature=0))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    feats = client.features("the cat sat", top_k=2)
    assert [t.token for t in feats.tokens] == ["the", "cat", "sat"] and feats.tokens[0].features[0].sae == SAE
    assert client.saes.list().data[0].d_sae == 64
    assert client.feature(SAE, 5).index == 5
    assert [a.name for a in client.adapters.list().data] == ["a1"]


def test_steer_and_compare(client):
    steered = client.steer("the cat sat on", [Edit.set(3, 250.0, positions="generated")], top_k=2, max_tokens=4,
                           temperature=0)
    assert all(t.features[0].indices[0] == 3 for t in steered.choices[0].features.generated)
    cmp = client.compare("the cat sat on", [Edit.set(3, 250.0, positions="generated")], max_tokens=6)
    assert cmp["default"] != cmp["steered"]
    assert cmp["changed"][0]["feature"] == 3 and cmp["changed"][0]["steered"] == 250.0
    a, b = ["the cat sat on the mat", "a cat and a dog"], ["sun rises east", "river flows to sea"]
    c = client.contrast(a, b, n=3)  # default: standardised mean difference, dense latents excluded
    assert len(c) == 3 and [x["score"] for x in c] == sorted((x["score"] for x in c), reverse=True)
    assert all(x["ranking"] == "smd" and x["freq_b"] <= 0.2 for x in c)
    assert all(0.0 <= x["lens"] <= 1.0 for x in client.contrast(a, b, n=2, lens=True))
    old = client.contrast(a, b, n=3, ranking="mean_diff")  # the old ranking, kept by name
    assert [abs(x["diff"]) for x in old] == sorted((abs(x["diff"]) for x in old), reverse=True)
    assert Edit.ablate(4).op == "ablate" and Edit.clamp_max(4, 1.0).value == 1.0


def test_presets_conditions_and_compare_through_the_client(client):
    edit = Edit.set(3, 250.0, positions="generated", when=Edit.when(3, -1.0))  # always holds
    client.presets.put("c-steer", [edit])
    try:
        assert [p.name for p in client.presets.list().data if p.name == "c-steer"] == ["c-steer"]
        assert client.presets.get("c-steer").edits[0].when.above == -1.0
        by_preset = client.steer("the cat sat on", preset="c-steer", compare=True, max_tokens=4, temperature=0)
        inline = client.steer("the cat sat on", [edit], max_tokens=4, temperature=0)
        plain = client.complete("the cat sat on", max_tokens=4, temperature=0)
        ch = by_preset.choices[0]
        assert ch.text == inline.choices[0].text and ch.unsteered.text == plain.choices[0].text != ch.text
        stopped = client.steer("the cat sat on", stop_when=[Edit.when(3, -1.0)], max_tokens=4, temperature=0)
        assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
        cmp = client.compare("the cat sat on", preset="c-steer", max_tokens=4)
        assert cmp["steered"] == ch.text and cmp["default"] == ch.unsteered.text
        assert len(client.feature(SAE, 3).logits.promoted) == 10
    finally:
        client.presets.delete("c-steer")
    with pytest.raises(NotFoundError):
        client.presets.get("c-steer")


def test_errors_map_to_classes(client):
    with pytest.raises(NotFoundError):
        client.complete("x", model="nope")
    with pytest.raises(NotFoundError, match="outside"):  # a latent the SAE does not have
        client.steer("x", [Edit.set(64, 1.0)])
    with pytest.raises(ContextLengthError, match="maximum context length"):
        client.complete("the " * 200, max_tokens=100)
    with pytest.raises(ConflictError):
        client.adapters.load("a1", "a2")
    with pytest.raises(InvalidRequestError, match="outside the adapter root"):
        client.adapters.load("x", "../a1")


def test_adapter_load_unload_through_client(client):
    client.adapters.load("c2", "a2")
    r = client.complete("the cat", model="c2", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    client.adapters.unload("c2")
    with pytest.raises(NotFoundError):
        client.adapters.unload("c2")


def test_retries_429_honouring_retry_after(ws):
    with LiveServer(__import__("saelora.serve.api.app", fromlist=["create_app"]).create_app(
            make_engine(ws, max_batch=1, max_queue=1), served_name="tiny")) as srv:
        async def burst(retries):
            async with AsyncSaeloraClient(srv.url, model="tiny", max_retries=retries) as c:
                return await asyncio.gather(*[c.complete("the cat", max_tokens=20) for _ in range(5)],
                                            return_exceptions=True)
        no_retry = asyncio.run(burst(0))
        assert any(isinstance(r, RateLimitError) for r in no_retry)
        with_retry = asyncio.run(burst(6))
        assert all(isinstance(r, P.CompletionResponse) for r in with_retry), with_retry


def test_async_client(server):
    async def go():
        async with AsyncSaeloraClient(server.url) as c:
            r = await c.complete("the cat sat on", max_tokens=3, temperature=0)
            parts = [d["choices"][0]["text"] async for d in c.stream("the cat sat on", max_tokens=3, temperature=0)]
            f = await c.features("the cat", top_k=1)
            s = await c.steer("the cat", [Edit.set(3, 250.0, positions="generated")], top_k=1, max_tokens=2,
                              temperature=0)
            await c.presets.put("async-p", [Edit.set(3, 250.0, positions="generated")])
            cmp = await c.compare("the cat", preset="async-p", max_tokens=2)
            assert cmp["steered"] == s.choices[0].text and [p.name for p in (await c.presets.list()).data
                                                            if p.name == "async-p"] == ["async-p"]
            await c.presets.delete("async-p")
            return r, parts, f, s
    r, parts, f, s = asyncio.run(go())
    assert "".join(parts) == r.choices[0].text and len(f.tokens) == 2
    assert s.choices[0].features.generated[0].features[0].indices == [3]


def test_terminal_chat_in_a_pty(server):
    child = pexpect.spawn(sys.executable, ["-m", "saelora", "chat", "--url", server.url, "--max-tokens", "4"],
                          encoding="utf-8", timeout=60)
    try:
        child.expect("saelora chat with tiny")
        child.expect("> ")
        child.sendline("the cat")
        child.expect(r"'\S+'\[#\d+:\d+\.\d")  # a token with its top latents
        child.expect("> ")
        child.sendline("/steer 3 set 250")
        child.expect(r"\[steering: set #3 250 raw\]")
        child.sendline("the cat")
        child.expect("#3:250.0")
        child.expect("> ")
        child.sendline("/save chat-p")
        child.expect(r"\[saved preset chat-p: 1 edit")
        child.sendline("/presets")
        child.expect("chat-p: error_term, set #3 250")
        child.sendline("/unsteer")
        child.sendline("/preset chat-p")
        child.expect(r"\[preset chat-p\]")
        child.sendline("/compare on")
        child.expect(r"\[compare on\]")
        child.sendline("the cat")
        child.expect("#3:250.0")
        child.expect(r"\[unsteered\] \S")
        child.sendline("/preset nope")
        child.expect(r"\[error 404")
        child.sendline("/features off")
        child.expect(r"\[features off\]")
        child.sendline("/adapter a1")
        child.expect(r"\[talking to a1\]")
        child.sendline("/adapter nope")
        child.expect(r"\[no model 'nope'")
        child.sendline("/steer x")
        child.expect(r"\[usage: /steer")
        child.sendline("/search cat")
        child.expect(r"\[error 404")  # the tiny SAE has no descriptions
        child.sendline("/autosteer p /nonexistent/texts.txt")
        child.expect(r"\[cannot read")
        child.sendline("/clear")
        child.expect(r"\[conversation cleared\]")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_without_a_server_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "saelora", "chat", "--url", "http://127.0.0.1:9"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "cannot reach a server" in r.stderr and "Traceback" not in r.stderr


def _public_calls(obj) -> dict[str, object]:
    return {n: getattr(obj, n) for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n))}


def test_async_client_offers_every_sync_call():
    """Invariant: every public call of SaeloraClient (and of its adapters/saes namespaces) exists on
    AsyncSaeloraClient as a coroutine function or async generator, with the same parameters."""
    import inspect
    sync, aio = SaeloraClient("http://127.0.0.1:9"), AsyncSaeloraClient("http://127.0.0.1:9")
    skip = {"close", "__enter__", "__exit__"}  # the context protocol differs by nature (aclose / async with)
    for s_obj, a_obj in ((sync, aio), (sync.adapters, aio.adapters), (sync.saes, aio.saes),
                         (sync.presets, aio.presets), (sync.vectors, aio.vectors)):
        s_calls, a_calls = _public_calls(s_obj), _public_calls(a_obj)
        missing = set(s_calls) - set(a_calls) - skip
        assert not missing, f"AsyncSaeloraClient lacks {sorted(missing)}"
        for name in set(s_calls) - skip:
            fn = a_calls[name]
            assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn), name
            s_params = list(inspect.signature(s_calls[name]).parameters)
            assert list(inspect.signature(fn).parameters) == s_params, name


def test_lens_agreement_counts_promoted_tokens_frequent_in_set_a():

    from saelora.clients.endpoints import lens_agreement

    def resp(words):
        return P.FeaturesResponse(model="m", usage=P.Usage(prompt_tokens=len(words), completion_tokens=0,
                                                           total_tokens=len(words)),
                                  tokens=[P.TokenFeatures(token=w, token_id=i, position=i, features=[])
                                                     for i, w in enumerate(words)])
    a, b = [resp([" court", " judge", " the", " court"])], [resp([" the", " sea", " judge", " judge"])]
    assert lens_agreement([" Court", "court ", " sea"], a, b) == pytest.approx(2 / 3)  # case and spaces ignored
    assert lens_agreement([" judge"], a, b) == 0.0  # more frequent in B
    assert lens_agreement([], a, b) == 0.0


def test_vector_builders_make_the_protocol_member_their_arguments_name():
    """Regression: `Vector.add` called the `SAEVectorEdit` union itself and failed on every call (the README's
    steering example, run by tests/test_readme.py, found it)."""
    from saelora.clients import Vector

    by_name, by_values = Vector.add("law", 0.4, unit="norm"), Vector.project([0.0, 1.0], 2.0)
    assert isinstance(by_name, P.SAEVectorByName)
    assert (by_name.vector, by_name.unit, by_name.op) == ("law", "norm", "add")
    assert isinstance(by_values, P.SAEVectorValues) and (by_values.values, by_values.op) == ([0.0, 1.0], "project")


def test_chat_survives_a_dropped_stream_and_sets_its_temperature():
    """The server drops the connection in the middle of a streamed reply: the chat says so, forgets that turn
    and goes on; /temp sets the sampling temperature within [0, 2]."""
    from io import StringIO

    from fake_engine import FakeEngine
    from saelora.clients import SaeloraClient
    from saelora.clients.cli import ChatSession
    from saelora.serve.api.app import create_app

    inner = create_app(FakeEngine(), served_name="fake")

    async def dropping(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"id": "x", "cho', "more_body": True})
            raise RuntimeError("the connection drops here")
        await inner(scope, receive, send)

    with LiveServer(dropping) as srv, SaeloraClient(srv.url) as client:
        out = StringIO()
        chat = ChatSession(client, out, temperature=0.3)
        assert chat.temperature == 0.3
        chat.command("/temp 0.7")
        chat.command("/temp 9")
        assert chat.temperature == 0.7 and "[temperature 0.7]" in out.getvalue() and "[usage: /temp" in out.getvalue()
        chat.ask("hello")
        assert "[the stream broke" in out.getvalue() and chat.messages == []
        assert chat.command("/models") is True  # still talking to the server
