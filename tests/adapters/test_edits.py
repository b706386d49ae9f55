"""The steering vocabulary has one home (adapters/edits.py): the HTTP protocol takes its words from there, and
the checks, op table and JSON form behave as documented."""

from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from saelora.adapters import edits as E
from saelora.clients import protocol as P


def test_protocol_vocabulary_is_the_edits_vocabulary():
    assert get_args(P.EditOp) == E.OPS and get_args(P.SpliceMode) == E.MODES
    positions = P.SAEEdit.model_fields["positions"].annotation
    assert E.POSITION_WORDS == get_args(get_args(positions)[0])
    assert P.SAEOptions().mode == E.SERVE_MODE == "error_term" and E.TRAIN_MODE == "replace"
    assert set(E.OP_TABLE) == set(E.OPS)


@pytest.mark.parametrize("value", [1e39, -1e300, E.MAX_EDIT_VALUE * 1.5])
def test_values_past_the_bound_are_refused_by_the_protocol_and_the_checks(value):
    with pytest.raises(ValidationError):
        P.SAEEdit(feature=1, op="set", value=value)
    with pytest.raises(E.SpliceError, match="outside"):
        E.check_edit(E.LatentEdit("s", 1, "clamp_max", value), 8)
    E.check_edit(E.LatentEdit("s", 1, "set", E.MAX_EDIT_VALUE), 8)  # the bound itself is allowed


@pytest.mark.parametrize("edit", [E.LatentEdit("s", 3, "scale", 2.5, "generated"),
                                  E.LatentEdit("s", 0, "ablate", 0.0, (0, 4, 9))])
def test_json_round_trip(edit):
    import json

    assert E.LatentEdit.from_json(json.loads(json.dumps(edit.to_json()))) == edit


def test_op_table_on_a_latent_column():
    col = torch.tensor([-2.0, 0.0, 3.0])
    want = {"set": [5.0, 5.0, 5.0], "add": [3.0, 5.0, 8.0], "scale": [-10.0, 0.0, 15.0],
            "clamp_max": [-2.0, 0.0, 3.0], "clamp_min": [5.0, 5.0, 5.0], "ablate": [0.0, 0.0, 0.0]}
    for op, expected in want.items():
        assert E.apply_op(op, col, 5.0).tolist() == expected, op


def test_position_mask_words_lists_and_padding():
    pos = torch.tensor([[-1, 0, 1, 2, 3]])  # one pad, then 4 tokens; prompt of 2
    assert E.position_mask("all", pos, 2).tolist() == [[False, True, True, True, True]]
    assert E.position_mask("prompt", pos, 2).tolist() == [[False, True, True, False, False]]
    assert E.position_mask("generated", pos, 2).tolist() == [[False, False, False, True, True]]
    assert E.position_mask("generated", pos, None).tolist() == [[False] * 5]
    assert E.position_mask((0, 3), pos, 2).tolist() == [[False, True, False, False, True]]
    assert E.position_mask((), pos, 2).tolist() == [[False] * 5]
