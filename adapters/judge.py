"""A concept judge independent of any model and SAE: a bag-of-words logistic regression over labelled texts.

    judge = Judge.fit({"mathematics": texts_a, "music": texts_b}, negatives=texts_c)
    judge.prob(["The theorem states ..."], "mathematics")    # [0.93]

Words are lower-case runs of letters (a-z, with apostrophes inside); a word is in the vocabulary when it occurs
in at least `min_df` training texts. Features are (1 + log(count)) x idf, scaled to unit length per text. The model is
one logistic regression per label against every other text (the other labels' and the negatives), each class
weighted to half the loss, with an L2 penalty, fitted by full-batch L-BFGS (deterministic).
The steering benchmark (trainer/steer_eval.py) trains one on held-out concept texts and reports its accuracy on
texts it never saw; auto-steer trains one on the texts it is given.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Judge:
    """Fitted judge: vocabulary, labels, weights (V, L) and bias (L,)."""

    vocab: dict[str, int]
    idf: torch.Tensor  # (V,) log((1 + N) / (1 + df)) + 1
    labels: list[str]
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, texts: Mapping[str, Sequence[str]], negatives: Sequence[str] = (), min_df: int = 2,
            l2: float = 1e-4, steps: int = 100) -> "Judge":
        """Fit on `texts` (label -> texts) and `negatives` (texts of no label); every label needs a text, and
        there must be something to tell it from."""
        if not texts or any(not t for t in texts.values()) or (len(texts) < 2 and not negatives):
            raise ValueError("a judge needs labelled texts for every label and other texts to tell them from")
        every = [t for ts in texts.values() for t in ts] + list(negatives)
        df: Counter[str] = Counter(w for t in every for w in set(words(t)))
        vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= min_df))}
        idf = torch.tensor([math.log((1 + len(every)) / (1 + df[w])) + 1 for w in vocab])
        labels = list(texts)
        x = _features(every, vocab, idf)
        y = torch.zeros(len(every), len(labels))
        row = 0
        for j, ts in enumerate(texts.values()):
            y[row:row + len(ts), j] = 1.0
            row += len(ts)
        pos = y.sum(0)
        weight = torch.where(y > 0, 0.5 / pos, 0.5 / (len(every) - pos))  # each class half of each label's loss
        w = torch.zeros(len(vocab), len(labels), requires_grad=True)
        b = torch.zeros(len(labels), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.sparse.mm(x, w) + b, y,
                                                                       reduction="none")
            loss = (bce * weight).sum() / len(labels) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(vocab, idf, labels, w.detach(), b.detach())

    def probs(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L) probability of each label (one-vs-rest: rows need not sum to 1)."""
        return torch.sigmoid(torch.sparse.mm(_features(texts, self.vocab, self.idf), self.weight) + self.bias)

    def prob(self, texts: Sequence[str], label: str) -> list[float]:
        return self.probs(texts)[:, self.labels.index(label)].tolist()

    def accuracy(self, texts: Mapping[str, Sequence[str]], negatives: Sequence[str] = (),
                 threshold: float = 0.5) -> dict[str, dict[str, float]]:
        """Per label: recall (its texts scored >= threshold) and false-positive rate (other labels' texts and the
        negatives)."""
        out = {}
        for label in texts:
            if label not in self.labels:
                continue
            own = self.prob(texts[label], label)
            rest = [p for other, ts in texts.items() if other != label for p in self.prob(ts, label)]
            rest += self.prob(negatives, label) if negatives else []
            out[label] = {"recall": sum(p >= threshold for p in own) / max(1, len(own)),
                          "false_positive": sum(p >= threshold for p in rest) / max(1, len(rest)),
                          "n": len(own)}
        return out


def _features(texts: Sequence[str], vocab: Mapping[str, int], idf: torch.Tensor) -> torch.Tensor:
    """(N, V) sparse (COO): each text's (1 + log count) x idf, unit length (texts are short, the vocabulary large:
    dense, a benchmark's judge would be gigabytes)."""
    rows, cols, vals = [], [], []
    for r, t in enumerate(texts):
        for w, c in Counter(words(t)).items():
            if w in vocab:
                rows.append(r)
                cols.append(vocab[w])
                vals.append(1.0 + math.log(c))
    col = torch.tensor(cols, dtype=torch.long)
    val = torch.tensor(vals, dtype=torch.float32) * idf[col] if cols else torch.zeros(0)
    row = torch.tensor(rows, dtype=torch.long)
    norm = torch.zeros(len(texts)).index_add_(0, row, val * val).sqrt().clamp_min(1e-12)
    return torch.sparse_coo_tensor(torch.stack([row, col]), val / norm[row],
                                   (len(texts), max(1, len(vocab))), check_invariants=True).coalesce()
