"""Reference forwards of the tiny workspace's model by served model name, outside any server: plain
transformers for the base model, PEFT's model from the bundle for an adapter, the library's splice hooks for a
name that carries the splice (`+sae`: `replace`; `+sae:<preset>`: the preset's edits in `error_term`)."""

from __future__ import annotations

import torch

STEER = {"feature": 3, "op": "set", "value": 250.0}  # the steered preset's one edit (raw units, every position)


class Direct:
    def __init__(self, ws: dict) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from saelora.adapters.models import load_model
        from saelora.adapters.saes import load_sae
        from saelora.adapters.splice_hooks import Splice

        self.base = AutoModelForCausalLM.from_pretrained(ws["model"], dtype=torch.float32).eval()
        self.adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws["model"],
                                                                                      dtype=torch.float32),
                                                 ws["a1"]).eval()
        self.lm = load_model(ws["model"], device="cpu")
        self.sae = load_sae(self.lm.model, ws["saes"][0], tokenizer=self.lm.tokenizer)
        self.splice = Splice(self.lm.model, [self.sae], mode="replace").install()

    @torch.no_grad()
    def logits(self, name: str, ids: list[int]) -> torch.Tensor:
        """(T, V) logits of `ids` under the model `name` serves ("tiny", "a1", "tiny+sae", "tiny+sae:<steer>")."""
        from saelora.adapters.edits import LatentEdit
        from saelora.adapters.splice import RowSpec

        x = torch.tensor([ids])
        if name == "tiny":
            return self.base(input_ids=x).logits[0]
        if name == "a1":
            return self.adapted(input_ids=x).logits[0]
        row = RowSpec() if name == "tiny+sae" else RowSpec(
            modes={self.sae.name: "error_term"}, edits=[LatentEdit(self.sae.name, STEER["feature"], "set",
                                                                    STEER["value"])])
        with self.splice.batch(rows=[row]):
            return self.lm.model(input_ids=x).logits[0]

    def logprobs(self, name: str, ids: list[int]) -> list[float | None]:
        """Each token's logprob given the ones before it (None for the first)."""
        lp = torch.log_softmax(self.logits(name, ids).float(), -1)[:-1].gather(1, torch.tensor(ids)[1:, None])
        return [None, *lp[:, 0].tolist()]

    def loglikelihood(self, name: str, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """lm-eval's loglikelihood of `continuation` after `context`, and whether it is the greedy one."""
        ids = context + continuation
        logits = self.logits(name, ids).float()[len(context) - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(continuation)[:, None])[:, 0]
        return float(lp.sum()), bool((logits.argmax(-1) == torch.tensor(continuation)).all())
