"""Which positions an SAE reconstructs: the position policy, one record used everywhere.

The paper (Chen, Engels, Tegmark 2025) keeps BOS and EOS tokens original when it splices sae-lens SAEs;
for a model whose tokenizer adds no BOS, the first position of a sequence is the attention sink (residual
norm ~100x the median) and stays original too. The same massive activations occur, rarely, later in a
row (SmolLM2 at layer 12: ~1 token in 8,000 with norm 1,000-30,000 against a median of 144); with
`keep_norm_above` set, a position whose residual norm at the hook exceeds it stays original as well.
A position outside the policy is never spliced, never
edited, and never counted in FVU, L0 or the MSE term; SAE training and feature descriptions drop it.

The policy travels with the SAE: `train-sae` writes it into the sae-lens cfg metadata (`saelora_policy`),
a foreign SAE gets it derived from its metadata (`prepend_bos`) and the tokenizer, and an explicit
override wins over both. Adapter manifests record it, so `eval` restores it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .errors import SaeloraError

log = logging.getLogger(__name__)
POLICY_KEY = "saelora_policy"  # key in a sae-lens cfg's metadata


class PolicyError(SaeloraError, ValueError):
    """A position-policy override that cannot be parsed."""


@dataclass(frozen=True)
class PositionPolicy:
    """Positions left original (not spliced) for one SAE, and how its input rows start."""

    keep_first: bool = True  # position 0 stays original (the attention sink of a model without BOS)
    keep_token_ids: tuple[int, ...] = ()  # tokens (BOS, EOS ids) that stay original wherever they occur
    prepend_bos: bool = False  # rows start with the tokenizer's BOS token
    keep_norm_above: float | None = None  # positions whose residual norm exceeds this stay original (sinks)

    def keep_mask(self, pos: torch.Tensor, ids: torch.Tensor | None,
                  x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) bool: True where the stream stays original (padding, pos -1, included); x (B, T, d) the
        residual stream at the hook, for `keep_norm_above`."""
        keep = pos < 0
        if self.keep_first:
            keep = keep | (pos == 0)
        if self.keep_token_ids and ids is not None:
            wanted = torch.tensor(self.keep_token_ids, dtype=ids.dtype, device=ids.device)
            keep = keep | torch.isin(ids, wanted).expand_as(keep)
        if self.keep_norm_above is not None and x is not None:
            keep = keep | (x.float().norm(dim=-1) > self.keep_norm_above)
        return keep

    def keep_in_rows(self, ids: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """`keep_mask` for whole rows ids (B, T) that start at position 0 (corpus rows, no padding)."""
        pos = torch.arange(ids.shape[-1], device=ids.device)[None].expand_as(ids)
        return self.keep_mask(pos, ids, x)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_token_ids"] = list(self.keep_token_ids)
        if d["keep_norm_above"] is None:
            del d["keep_norm_above"]  # the same record as a policy without the field
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PositionPolicy":
        norm = d.get("keep_norm_above")
        return cls(keep_first=bool(d.get("keep_first", True)),
                   keep_token_ids=tuple(int(i) for i in d.get("keep_token_ids", ())),
                   prepend_bos=bool(d.get("prepend_bos", False)),
                   keep_norm_above=None if norm is None else float(norm))

    def describe(self) -> str:
        """One line for logs and the CLI: which positions are spliced."""
        kept = (["position 0"] if self.keep_first else []) + \
            ([f"token ids {list(self.keep_token_ids)}"] if self.keep_token_ids else []) + \
            ([f"residual norm > {self.keep_norm_above:g}"] if self.keep_norm_above is not None else [])
        bos = ", rows start with BOS" if self.prepend_bos else ""
        return ("every position" if not kept else "every position except " + " and ".join(kept)) + bos


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front by default (Gemma, Llama do; SmolLM2, GPT-2 do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def special_ids(tokenizer: Any) -> tuple[int, ...]:
    """BOS and EOS ids of a tokenizer (those it has), sorted."""
    ids = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)}
    return tuple(sorted(i for i in ids if i is not None))


def default_policy(tokenizer: Any, prepend_bos: bool | None = None) -> PositionPolicy:
    """The paper's policy for this tokenizer: BOS/EOS ids kept; position 0 kept unless the row starts with BOS.

    prepend_bos None: rows start with BOS when the tokenizer adds one by default."""
    has_bos = getattr(tokenizer, "bos_token_id", None) is not None
    bos = adds_bos(tokenizer) if prepend_bos is None else (bool(prepend_bos) and has_bos)
    return PositionPolicy(keep_first=not bos, keep_token_ids=special_ids(tokenizer), prepend_bos=bos)


def policy_from_metadata(metadata: Any, tokenizer: Any) -> PositionPolicy:
    """An SAE's policy: the recorded one (`saelora_policy`), else derived from sae-lens's `prepend_bos`."""
    get = metadata.get if isinstance(metadata, dict) else (lambda k, d=None: getattr(metadata, k, d))
    recorded = get(POLICY_KEY)
    if recorded:
        return PositionPolicy.from_json(recorded)
    return default_policy(tokenizer, prepend_bos=get("prepend_bos", None))


def parse_override(text: str | None) -> dict[str, Any]:
    """`keep_first=0,keep_ids=1+2,prepend_bos=1,keep_norm_above=1000` (any subset; keep_norm_above= for none)
    -> fields to replace; '' or None -> {}."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        try:
            if key in ("keep_first", "prepend_bos") and sep:
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(value)
                out[key] = value.lower() in ("1", "true")
            elif key == "keep_ids" and sep:
                out["keep_token_ids"] = tuple(sorted(int(v) for v in value.split("+") if v))
            elif key == "keep_norm_above" and sep:
                out[key] = float(value) if value else None
                if out[key] is not None and not out[key] > 0:
                    raise ValueError(value)
            else:
                raise ValueError(part)
        except ValueError:
            raise PolicyError(f"position policy {text!r}: expected comma-separated keep_first=0|1, "
                              "keep_ids=ID+ID (or empty), prepend_bos=0|1, keep_norm_above=NORM (or empty)"
                              ) from None
    return out


def apply_override(policy: PositionPolicy, text: str | None) -> PositionPolicy:
    fields = parse_override(text)
    return replace(policy, **fields) if fields else policy


def corpus_bos(policies: list[PositionPolicy]) -> bool:
    """Whether rows start with BOS for a set of SAEs spliced together (they must agree)."""
    wants = {p.prepend_bos for p in policies}
    if len(wants) > 1:
        raise PolicyError("the SAEs disagree on prepend_bos; splice SAEs trained on the same kind of rows, or "
                          "override it with --policy prepend_bos=0|1")
    return wants.pop() if wants else False
