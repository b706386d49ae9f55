"""Model names that carry the splice: how a tool that sends only `model` (lm-eval-harness, litellm, a chat front
end) reaches it, the way vLLM exposes LoRA adapters by name.

    <model>               the base model (the served name) or a loaded adapter, as before
    <model>+sae           <model> with every SAE spliced in `replace` mode: the paper's spliced model. With no
                          adapter, the base model spliced. This name is fixed: scripts can rely on it.
    <model>+sae:<preset>  <model> with steering preset <preset>: its mode, edits and vectors

A request by a derived name is the request with the `sae` extension the name stands for (`"mode": "replace"`,
or `"preset": <preset>`); an `sae` field sent beside it adds to that (features, edits, stop conditions), and
its own `mode` wins, as a request's mode wins over a preset's. A name that parses but names no model, adapter
or preset here, and a name that does not parse, are 404s. `GET /v1/models` lists every name that resolves now.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from saelora.clients import protocol as P

from ..core.engine import EngineError

SPLICE = "+sae"  # the suffix that splices the SAEs in; ":<preset>" after it names a steering preset
_DERIVED = re.compile(r"^(?P<model>.+?)\+sae(?::(?P<preset>[^:]*))?$")


@dataclass(frozen=True)
class ModelName:
    """A request's `model`, resolved: the adapter it runs (None: the base model) and the splice it carries."""

    name: str  # as the client sent it (the response's `model`)
    adapter: str | None
    spliced: bool = False  # `+sae`
    preset: str | None = None  # `+sae:<preset>`

    def options(self, sae: P.SAEOptions | None) -> P.SAEOptions | None:
        """The `sae` extension this request runs with: the body's, with what the name carries filled in."""
        if not self.spliced:
            return sae
        sae = sae or P.SAEOptions()
        if self.preset is None:
            return sae if "mode" in sae.model_fields_set else sae.model_copy(update={"mode": "replace"})
        if sae.preset not in (None, self.preset):
            raise EngineError("invalid", f"the model name names preset {self.preset!r} and the sae field names "
                              f"{sae.preset!r}: name one", "sae.preset")
        return sae.model_copy(update={"preset": self.preset})


def resolve(model: str | None, served: str, adapters: Iterable[str], presets: Iterable[str],
            has_sae: bool) -> ModelName:
    """`model` as a request sends it (None: the base model). EngineError 404 unless it names something here."""
    if model is None or model == served:
        return ModelName(model or served, None)
    names = set(adapters)
    if model in names:
        return ModelName(model, model)
    m = _DERIVED.match(model)
    if m is not None and has_sae and (m["model"] == served or m["model"] in names):
        preset = m["preset"]
        if preset is None or preset in set(presets):  # a stored preset's name is already a safe one
            return ModelName(model, None if m["model"] == served else m["model"], True, preset)
    raise EngineError("not_found", f"The model `{model}` does not exist.", "model")


def listing(served: str, adapters: Iterable[str], presets: Iterable[str], has_sae: bool) -> list[tuple[str, str]]:
    """Every model name that resolves now, with the plain model (base or adapter) each derives from."""
    plain = [served, *adapters]
    out = [(m, m) for m in plain]
    if has_sae:
        presets = sorted(presets)
        out += [(m + SPLICE + suffix, m) for m in plain for suffix in ["", *(":" + p for p in presets)]]
    return out
