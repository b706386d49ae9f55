"""The compact latents form (`"features": {"format": "compact"}`): a choice's latents as parallel arrays, the
numbers packed little-endian and base64-encoded, instead of one JSON object per token and SAE.

    {"positions": [...], "token_ids": [...], "tokens": [...], "prompt_count": n, "k": 32,
     "index_dtype": "uint16", "value_dtype": "float16",
     "saes": {"<sae>": {"indices": "<base64>", "values": "<base64>"}}}

Token t's latents at SAE s are indices[t*k:(t+1)*k] and values[t*k:(t+1)*k] (fixed k; a slot with value 0 is
inactive, as the full form leaves it out). The first `prompt_count` tokens are the prompt's (with
`include_prompt`). Values are float16 (about 3 significant digits, magnitudes above 65504 sent as 65504; the
full form rounds to 5 decimals): the form is for bulk transfer, the full one for exact values. Indices are
uint16 when every index fits, else int32.
Torch-free and numpy-free (`struct`), like the rest of the client: `decode` gives the full form's objects.
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Literal, Sequence

from pydantic import BaseModel

if TYPE_CHECKING:
    from .protocol import TokenFeatures

IndexDtype = Literal["uint16", "int32"]
_FMT = {"uint16": "H", "int32": "i", "float16": "e"}
FP16_MAX = 65504.0  # a larger value is sent as this (float16's largest)


class CompactSAE(BaseModel):
    indices: str  # base64 of tokens x k little-endian `index_dtype`
    values: str  # base64 of tokens x k little-endian float16


class CompactFeatures(BaseModel):
    """A choice's latents (or a streamed chunk's) in the compact form; `decode` gives the full form."""

    positions: list[int]
    token_ids: list[int]
    tokens: list[str]
    prompt_count: int = 0
    k: int
    index_dtype: IndexDtype = "uint16"
    value_dtype: Literal["float16"] = "float16"
    saes: dict[str, CompactSAE]

    def decode(self) -> tuple[list["TokenFeatures"], list["TokenFeatures"]]:
        """(prompt tokens, generated tokens), as the full form's `TokenFeatures` (zero slots left out)."""
        from .protocol import SAELatents, TokenFeatures

        n, k = len(self.positions), self.k
        arrays = {name: (_unpack(s.indices, self.index_dtype, n * k), _unpack(s.values, "float16", n * k))
                  for name, s in self.saes.items()}
        out = []
        for t in range(n):
            feats = []
            for name, (idx, val) in arrays.items():
                pairs = [(i, v) for i, v in zip(idx[t * k:(t + 1) * k], val[t * k:(t + 1) * k], strict=True) if v != 0]
                feats.append(SAELatents(sae=name, indices=[i for i, _ in pairs], values=[v for _, v in pairs]))
            out.append(TokenFeatures(token=self.tokens[t], token_id=self.token_ids[t], position=self.positions[t],
                                     features=feats))
        return out[:self.prompt_count], out[self.prompt_count:]


def pack(values: Sequence[float] | Sequence[int], dtype: str) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}{_FMT[dtype]}", *values)).decode("ascii")


def _unpack(data: str, dtype: str, n: int) -> list:
    got = struct.unpack(f"<{n}{_FMT[dtype]}", base64.b64decode(data))
    return [float(v) for v in got] if dtype == "float16" else list(got)


def encode(tokens: Sequence[tuple[str, int, int, dict[str, tuple[Sequence[int], Sequence[float]]]]], k: int,
           prompt_count: int = 0) -> CompactFeatures:
    """tokens: (text, token id, position, {sae: (indices, values)}) in order; each SAE's rows padded to k."""
    names = sorted({name for *_, lat in tokens for name in lat})
    wide = any(i > 0xFFFF for *_, lat in tokens for idx, _ in lat.values() for i in idx)
    dtype: IndexDtype = "int32" if wide else "uint16"
    saes = {}
    for name in names:
        idx: list[int] = []
        val: list[float] = []
        for *_, lat in tokens:
            i, v = lat.get(name, ((), ()))
            i, v = list(i[:k]), [max(-FP16_MAX, min(FP16_MAX, float(x))) for x in v[:k]]
            idx += i + [0] * (k - len(i))
            val += v + [0.0] * (k - len(v))
        saes[name] = CompactSAE(indices=pack(idx, dtype), values=pack(val, "float16"))
    return CompactFeatures(positions=[p for _, _, p, _ in tokens], token_ids=[t for _, t, _, _ in tokens],
                           tokens=[s for s, *_ in tokens], prompt_count=prompt_count, k=k, index_dtype=dtype,
                           saes=saes)
