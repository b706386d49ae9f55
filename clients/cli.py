"""`saelora chat`: an interactive terminal chat against a saelora server that shows each generated token's top
SAE latents, with steering commands. Uses only the client (no torch)."""

from __future__ import annotations

import argparse
import os
import sys

import httpx
from typing import Any, TextIO

from . import protocol as P
from .client import Edit, SaeloraClient
from .errors import SaeloraAPIError

HELP = """commands:
  /steer <feature> <op> [value] [unit]   add a latent edit on all positions (op: set add scale clamp_max
                                  clamp_min ablate; unit: raw max norm, e.g. /steer 1905 add 0.4 norm)
  /search <words>                 latents whose descriptions match the words
  /autosteer <name> <file>        auto-steer from a file of concept texts (one per line); stores preset <name>
  /unsteer                        drop all edits (and the preset)
  /save <name>                    save the edits as a steering preset (needs the admin key, if the server has one)
  /preset <name|off>              steer with a saved preset (your /steer edits apply after it)
  /presets                        list the server's steering presets
  /compare on|off                 also show each reply unsteered (same batch, same seed)
  /clear                          forget the conversation
  /adapter <name|base>            talk to an adapter (see /models)
  /features on|off                show the top latents of each token
  /temp <t>                       sampling temperature (0: greedy)
  /models                         list the base model and adapters
  /help, /quit"""


class ChatSession:
    """State and commands of one chat; `out` receives everything shown."""

    def __init__(self, client: SaeloraClient, out: TextIO, top_k: int = 3, max_tokens: int = 64,
                 temperature: float = 0.0) -> None:
        self.c, self.out, self.top_k, self.max_tokens = client, out, top_k, max_tokens
        self.temperature = temperature
        self.base = client.default_model()
        self.model = self.base
        self.messages: list[dict[str, str]] = []
        self.edits: list[P.SAEEdit] = []
        self.preset: str | None = None
        self.show, self.compare = True, False

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        parts = line.split()
        cmd, args = parts[0], parts[1:]
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/clear":
            self.messages.clear()
            self.say("[conversation cleared]")
        elif cmd == "/temp" and len(args) == 1:
            self._temp(args[0])
        elif cmd == "/features" and args in (["on"], ["off"]):
            self.show = args == ["on"]
            self.say(f"[features {args[0]}]")
        elif cmd == "/adapter" and len(args) == 1:
            names = [m.id for m in self.c.models().data]
            target = self.base if args[0] == "base" else args[0]
            if target not in names:
                self.say(f"[no model {args[0]!r}; available: {', '.join(names)}]")
            else:
                self.model = target
                self.say(f"[talking to {target}]")
        elif cmd == "/models":
            for m in self.c.models().data:
                self.say(f"  {m.id}" + (f"  (adapter of {m.parent})" if m.parent else ""))
        elif cmd == "/unsteer":
            self.edits.clear()
            self.preset = None
            self.say("[no edits]")
        elif cmd == "/steer":
            self._steer(args)
        elif cmd == "/compare" and args in (["on"], ["off"]):
            self.compare = args == ["on"]
            self.say(f"[compare {args[0]}]")
        elif cmd in ("/save", "/preset", "/presets"):
            self._presets(cmd, args)
        elif cmd in ("/search", "/autosteer") and args:
            self._discover(cmd, args)
        else:
            self.say(f"[unknown command {line!r}; /help lists them]")
        return True

    def _steer(self, args: list[str]) -> None:
        try:
            feature, op = int(args[0]), args[1]
            value = float(args[2]) if len(args) > 2 else 0.0
            unit = args[3] if len(args) > 3 else "raw"
            self.edits.append(Edit.make(op, feature, value, unit=unit))  # all positions: what steers best
            self.say(f"[steering: {', '.join(f'{e.op} #{e.feature} {e.value:g} {e.unit}' for e in self.edits)}]")
        except (IndexError, ValueError) as e:
            self.say(f"[usage: /steer <feature> <op> [value] [unit] ({e.__class__.__name__})]")

    def _discover(self, cmd: str, args: list[str]) -> None:
        try:
            if cmd == "/search":
                sae = self.c.saes.list().data[0].id
                for h in self.c.search(sae, " ".join(args)).data[:8]:
                    self.say(f"  #{h.index} score {h.score:g}: fires on {', '.join(map(repr, h.tokens[:3]))}; "
                             f"promotes {', '.join(map(repr, h.promoted[:3]))}")
            elif len(args) == 2:
                with open(args[1], encoding="utf-8") as f:
                    texts = [ln.strip() for ln in f if ln.strip()]
                r = self.c.auto_steer(args[0], texts)
                m = r.measured
                self.preset = args[0]
                self.say(f"[preset {args[0]}: {m['method']} at {m['strength']} norm; on-concept {m['concept']:.0%}, "
                         f"fluency gap {m['fluency_gap']:+.2f}, {r.seconds:.0f} s; now steering with it]")
            else:
                self.say("[usage: /autosteer <name> <file>]")
        except OSError as e:
            self.say(f"[cannot read {args[-1]}: {e.strerror}]")
        except SaeloraAPIError as e:
            self.say(f"[error {e.status}: {e.message}]")

    def _presets(self, cmd: str, args: list[str]) -> None:
        try:
            if cmd == "/presets":
                for p in self.c.presets.list().data:
                    self.say(f"  {p.name}: {p.mode}, " + ", ".join(
                        [f"{e.op} #{e.feature} {e.value:g}" for e in p.edits] + [f"{v.op} vector" for v in p.vectors]))
            elif cmd == "/save" and len(args) == 1:
                if not self.edits:
                    self.say("[no edits to save: /steer first]")
                    return
                self.c.presets.put(args[0], self.edits)
                self.say(f"[saved preset {args[0]}: {len(self.edits)} edit(s)]")
            elif cmd == "/preset" and len(args) == 1:
                self.preset = None if args[0] == "off" else self.c.presets.get(args[0]).name
                self.say(f"[preset {self.preset or 'off'}]")
            else:
                self.say(f"[usage: {cmd} <name>]")
        except SaeloraAPIError as e:
            self.say(f"[error {e.status}: {e.message}]")

    def _temp(self, value: str) -> None:
        try:
            t = float(value)
        except ValueError:
            t = -1.0
        if not 0.0 <= t <= 2.0:
            self.say("[usage: /temp <t>, 0 <= t <= 2; 0 is greedy]")
            return
        self.temperature = t
        self.say(f"[temperature {t:g}]")

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        sae: dict[str, Any] = {"features": {"top_k": self.top_k},
                               "edits": [e.model_dump(exclude_none=True) for e in self.edits],
                               "preset": self.preset, "compare": self.compare}
        reply, shown, twin = "", [], ""
        try:
            for chunk in self.c.stream_chat(self.messages, model=self.model, max_tokens=self.max_tokens,
                                            temperature=self.temperature, sae=sae):
                for ch in chunk.choices:
                    if ch.unsteered is not None:
                        twin += ch.unsteered.text
                        continue
                    reply += ch.delta.content or ""
                    if self.show and ch.features:
                        shown += [_compact(t) for t in ch.features.generated]
                    elif ch.delta.content:
                        self.out.write(ch.delta.content)
                        self.out.flush()
        except SaeloraAPIError as e:
            self.messages.pop()
            self.say(f"[error {e.status}: {e.message}]")
            return
        except httpx.HTTPError as e:  # the connection dropped mid-stream: the turn is dropped, the chat goes on
            self.messages.pop()
            self.say(f"\n[the stream broke ({type(e).__name__}); that reply is dropped: ask again]")
            return
        if self.show:
            self.say(" ".join(shown))
        else:
            self.say("")
        if self.compare:
            self.say(f"[unsteered] {twin}")
        self.messages.append({"role": "assistant", "content": reply})


def _compact(t: P.TokenFeatures) -> str:
    lat = " ".join(f"#{i}:{v:.1f}" for f in t.features for i, v in zip(f.indices, f.values, strict=True))
    return f"{t.token!r}[{lat}]" if lat else repr(t.token)


def run_chat(session: ChatSession, stdin: TextIO) -> int:
    session.say(f"saelora chat with {session.model} — /help for commands")
    while True:
        session.out.write("> ")
        session.out.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
            else:
                session.ask(line)
        except httpx.HTTPError as e:  # the server went away or dropped the connection: say so, keep the chat
            session.say(f"[the server did not answer ({type(e).__name__}); try again]")


def _cmd_chat(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("SAELORA_ADMIN_API_KEY") or os.environ.get("SAELORA_API_KEY") or None
    with SaeloraClient(args.url, api_key=key, model=args.model) as client:
        try:
            session = ChatSession(client, sys.stdout, top_k=args.top_k, max_tokens=args.max_tokens,
                                  temperature=args.temperature)
        except (SaeloraAPIError, httpx.HTTPError, OSError) as e:
            print(f"saelora chat: cannot reach a server at {args.url}: {e}", file=sys.stderr)
            return 2
        return run_chat(session, sys.stdin)


def register(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive chat showing each token's top SAE latents, with /steer",
                       description="Chat with a saelora server; see /help inside.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key, if the server needs one (default: $SAELORA_ADMIN_API_KEY, which "
                   "also allows /save and /autosteer, else $SAELORA_API_KEY)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy; "
                   "/temp changes it)")
    p.add_argument("--model", help="model or adapter to talk to (default: the server's base model)")
    p.add_argument("--top-k", type=int, default=3, help="latents shown per token (default 3)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default 64)")
    p.set_defaults(func=_cmd_chat)
