"""Per-row KV caches, stacked left-padded into one batch for a forward and split back after it.

Each row keeps its own keys/values per layer, (1, H, S_r, D). A batched step pads every row on the left
to S_max, masks the padding out (attention_mask 0) and gives each row its own position ids, so a row's
result does not depend on which other rows share the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

RowKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (1, H, S_r, D)


def row_len(kv: RowKV | None) -> int:
    return 0 if not kv else kv[0][0].shape[2]


def stack(kvs: list[RowKV]) -> tuple[Any, int]:
    """A DynamicCache holding all rows left-padded to the longest (S_max); returns (cache, S_max)."""
    from transformers import DynamicCache

    s_max = max(row_len(kv) for kv in kvs)
    cache = DynamicCache()
    for layer in range(len(kvs[0])):
        keys = torch.cat([F.pad(kv[layer][0], (0, 0, s_max - row_len(kv), 0)) for kv in kvs])
        values = torch.cat([F.pad(kv[layer][1], (0, 0, s_max - row_len(kv), 0)) for kv in kvs])
        cache.update(keys, values, layer)
    return cache, s_max


def split(cache: Any, lengths: list[int]) -> list[RowKV]:
    """Per-row caches from a batched cache whose rows are left-padded; `lengths` = each row's new length."""
    out: list[RowKV] = []
    total = cache.layers[0].keys.shape[2]
    for r, n in enumerate(lengths):
        start = total - n
        out.append([(layer.keys[r:r + 1, :, start:].contiguous(), layer.values[r:r + 1, :, start:].contiguous())
                    for layer in cache.layers])
    return out


def trim_left(cache: Any, length: int) -> None:
    """Drop the leading columns of a left-padded batched cache so that `length` (the longest row) remain."""
    for layer in cache.layers:
        cut = layer.keys.shape[2] - length
        if cut > 0:
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, T), attention_mask (B, T) and positions (B, T) with -1 on the padding."""
    t = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (t - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
    return ids, mask, pos
