"""Steering vectors, calibrated units, feature search and auto-steer over HTTP against the fake engine (fast
tier): what reaches the engine, persistence, the admin key, and bad input to every new route getting a 4xx in
the OpenAI envelope. What the engines do with vectors is in test_steering.py (both engines, live)."""

import json
import math

import pytest
from fastapi.testclient import TestClient

from fake_engine import SAE_INFO, FakeEngine
from saelora.adapters.edits import LatentEdit, VectorEdit
from saelora.serve.api.app import create_app
from server_util import error_body

V8 = [0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]  # the fake SAE reads a residual of 8


class DescribedEngine(FakeEngine):
    """The fake engine with an SAE whose feature descriptions exist (max, dec_norm and resid_norm in them)."""

    def __init__(self, folder) -> None:
        super().__init__()
        feats = [{"index": i, "density": 0.01 * (i + 1), "max": 10.0 * (i + 1), "dec_norm": 0.5,
                  "top": [{"token": " law" if i == 5 else " cat", "left": "", "right": "", "value": 1.0}],
                  "logits": {"promoted": [{"token": " court" if i in (5, 9) else " dog", "token_id": 1, "value": 1}],
                             "suppressed": []}} for i in range(16)]
        (folder / "features").mkdir(parents=True)
        (folder / "features" / "features.json").write_text(json.dumps(
            {"sae": {}, "tokens": 100, "dead": [], "resid_norm": 40.0, "features": feats}))
        self.info = dict(SAE_INFO, source=str(folder))

    def saes(self):
        return [self.info]


_err = error_body


def _complete(c, sae):
    return c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 1, "sae": sae})


def test_units_are_converted_to_raw_before_the_engine(tmp_path):
    engine = DescribedEngine(tmp_path / "sae")
    with TestClient(create_app(engine, served_name="fake")) as c:
        assert _complete(c, {"edits": [{"feature": 2, "op": "set", "value": 2.0, "unit": "max"},
                                       {"feature": 3, "op": "add", "value": 0.5, "unit": "norm"},
                                       {"feature": 4, "op": "add", "value": 7.0}]}).status_code == 200
        e = engine.requests[-1].splice.edits
        assert [x.value for x in e] == [60.0, 0.5 * 40.0 / 0.5, 7.0]  # max x 30; norm x 40 / |W_dec|; raw
        assert _complete(c, {"vectors": [{"values": V8, "value": 0.25, "unit": "norm"}]}).status_code == 200
        (v,) = engine.requests[-1].splice.edits
        assert isinstance(v, VectorEdit) and v.value * 5 ** 0.5 == pytest.approx(0.25 * 40.0)


def test_units_without_descriptions_and_bad_vectors_are_400(tmp_path):
    with TestClient(create_app(FakeEngine(), served_name="fake")) as c:  # the fake SAE has no descriptions
        # what the server lacks is a 404 (no scales without descriptions; a direction of another width; a latent
        # outside d_sae), what no server could accept a 400: schema-valid requests never get a 400 (schemathesis)
        _err(_complete(c, {"edits": [{"feature": 2, "op": "set", "value": 2.0, "unit": "max"}]}), 404)
        _err(_complete(c, {"edits": [{"feature": 2, "op": "set", "value": 2.0, "unit": "parsec"}]}), 400)
        _err(_complete(c, {"edits": [{"feature": 99, "op": "set", "value": 1.0, "unit": "norm"}]}), 404)
        _err(_complete(c, {"vectors": [{"values": V8[:3]}]}), 404)  # another width
        _err(_complete(c, {"vectors": [{"values": V8, "vector": "v"}]}), 400)  # two sources
        _err(_complete(c, {"vectors": [{}]}), 400)  # no source
        _err(_complete(c, {"vectors": [{"values": V8, "unit": "max"}]}), 400)  # a vector has no max activation
        _err(_complete(c, {"vectors": [{"values": V8, "op": "spin"}]}), 400)
        _err(_complete(c, {"vectors": [{"vector": "missing"}]}), 404)
        zero = _complete(c, {"vectors": [{"values": [0.0] * 8, "op": "project", "unit": "norm"}]})
        assert zero.status_code == 200  # an all-zero direction does nothing; project's value has no unit


def test_stored_vectors_crud_persist_and_act_like_inline_values(tmp_path):
    engine = FakeEngine()
    with TestClient(create_app(engine, served_name="fake", presets_dir=str(tmp_path))) as c:
        r = c.put("/v1/steering/vectors/up", json={"values": V8})
        assert r.status_code == 200 and r.json()["norm"] == pytest.approx(5 ** 0.5) and r.json()["source"] == "values"
        assert [v["name"] for v in c.get("/v1/steering/vectors").json()["data"]] == ["up"]
        assert _complete(c, {"vectors": [{"vector": "up", "value": 3.0, "positions": "generated"}]}).status_code == 200
        by_name = engine.requests[-1].splice.edits
        assert _complete(c, {"vectors": [{"values": V8, "value": 3.0, "positions": "generated"}]}).status_code == 200
        assert by_name == engine.requests[-1].splice.edits
        preset = {"edits": [{"feature": 1, "op": "add", "value": 1.0}], "vectors": [{"vector": "up", "op": "project",
                                                                                       "value": 2.0}]}
        assert c.put("/v1/steering/presets/both", json=preset).status_code == 200
        assert _complete(c, {"preset": "both"}).status_code == 200
        got = engine.requests[-1].splice.edits
        assert isinstance(got[0], LatentEdit) and isinstance(got[1], VectorEdit) and got[1].op == "project"
    with TestClient(create_app(FakeEngine(), served_name="fake", presets_dir=str(tmp_path))) as c:  # a restart
        assert c.get("/v1/steering/vectors/up").json()["values"] == V8
        assert c.delete("/v1/steering/vectors/up").status_code == 200
        _err(c.get("/v1/steering/vectors/up"), 404)


def test_vector_route_validation_and_admin_key():
    with TestClient(create_app(FakeEngine(), served_name="fake")) as c:
        _err(c.put("/v1/steering/vectors/x", json={"values": V8[:2]}), 404)
        _err(c.put("/v1/steering/vectors/x", json={}), 400)
        _err(c.put("/v1/steering/vectors/x", json={"values": V8, "positive": ["a"], "negative": ["b"]}), 400)
        _err(c.put("/v1/steering/vectors/x", json={"values": V8, "sae": "nope"}), 404)
        _err(c.put("/v1/steering/vectors/a.b", json={"values": V8}), 400)
        # every value finite and within 1e30, so the norm fits float32 (the splice's dtype): else 400, none stored
        for bad in (["1e400"], ["8e224"], ["NaN"], ["2e30"]):  # JSON's 1e400 parses as Inf
            body = '{"values": [%s]}' % ", ".join(bad + [repr(x) for x in V8[len(bad):]])
            _err(c.put("/v1/steering/vectors/x", content=body, headers={"Content-Type": "application/json"}), 400)
        assert c.get("/v1/steering/vectors").json()["data"] == []
        big = [1e30] * 8
        assert c.put("/v1/steering/vectors/big", json={"values": big}).json()["norm"] == round(math.hypot(*big), 6)
        assert c.delete("/v1/steering/vectors/big").status_code == 200
        # the fake engine, like vLLM, has no model in the server process: its API takes numbers only
        _err(c.put("/v1/steering/vectors/x", json={"positive": ["a"], "negative": ["b"]}), 400)
        assert "positive" not in json.dumps(c.get("/openapi.json").json()["components"]["schemas"].get(
            "VectorFromTexts", {}))
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x y"] * 4}), 404)  # not offered
        assert c.get("/v1/steering/vectors").json()["data"] == []
    user, admin = {"Authorization": "Bearer k"}, {"Authorization": "Bearer adm"}
    with TestClient(create_app(FakeEngine(), served_name="fake", api_key="k", admin_api_key="adm")) as c:
        _err(c.put("/v1/steering/vectors/x", json={"values": V8}, headers=user), 401)
        assert c.put("/v1/steering/vectors/x", json={"values": V8}, headers=admin).status_code == 200
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x"] * 4}, headers=user), 401)


class TextEngine(FakeEngine):
    """The fake engine claiming to read texts: what the HTTP edge checks before any engine work."""

    steers_from_text = True

    async def steering_vector(self, sae, positive, negative):
        return [float(len(positive) - len(negative))] * 8

    async def auto_steer(self, sae, positive, negative, prompts, max_fluency_gap):
        from saelora.adapters.autosteer import AutoSteerResult

        self.auto_args = (sae, positive, negative, prompts, max_fluency_gap)
        edits = [LatentEdit(sae, 3, "add", 1.5), VectorEdit(sae, tuple(V8), "add", 0.25, (1, 2))]
        return AutoSteerResult(edits, {"concept": 0.75, "fluency_gap": 0.1, "method": "diffmean"}, [], 1.0)


def test_search_ranks_by_descriptions(tmp_path):
    with TestClient(create_app(DescribedEngine(tmp_path / "sae"), served_name="fake")) as c:
        hits = c.get("/v1/saes/fake/search", params={"q": "law court"}).json()["data"]
        assert [h["index"] for h in hits[:2]] == [5, 9]  # context and promoted token, then promoted token only
        assert hits[0]["tokens"] == [" law"] and hits[0]["promoted"] == [" court"]
        assert c.get("/v1/saes/fake/search", params={"q": "zebra"}).json()["data"] == []
        _err(c.get("/v1/saes/fake/search", params={"q": "!!!"}), 400)
        _err(c.get("/v1/saes/fake/search", params={"q": "law", "n": 0}), 400)
        _err(c.get("/v1/saes/nope/search", params={"q": "law"}), 404)
    with TestClient(create_app(FakeEngine(), served_name="fake")) as c:
        _err(c.get("/v1/saes/fake/search", params={"q": "law"}), 404)  # no descriptions


def test_text_routes_validation_where_the_engine_reads_texts():
    with TestClient(create_app(TextEngine(), served_name="fake")) as c:
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x"] * 3}), 400)  # too few texts
        _err(c.post("/v1/steering/auto", json={"name": "a.b", "positive": ["x"] * 4}), 400)
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x"] * 4, "max_fluency_gap": 0}), 400)
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": [" "] * 4}), 400)  # white space only
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x" * 4001] * 4}), 400)
        _err(c.post("/v1/steering/auto", json={"name": "a", "positive": ["x"] * 4, "sae": "nope"}), 404)
        _err(c.put("/v1/steering/vectors/x", json={"positive": ["a"]}), 400)  # DiffMean needs both sides
        _err(c.put("/v1/steering/vectors/x", json={"positive": ["a"], "negative": [""]}), 400)
        r = c.put("/v1/steering/vectors/x", json={"positive": ["a", "b"], "negative": ["c"]})
        assert r.status_code == 200 and r.json()["source"] == "diffmean" and r.json()["texts"] == {
            "positive": 2, "negative": 1} and r.json()["values"] == [1.0] * 8
        assert c.put("/v1/steering/vectors/y", json={"values": V8}).status_code == 200  # numbers still work
        assert c.get("/v1/steering/presets").json()["data"] == []


def test_auto_steer_stores_the_engines_winner_as_a_preset():
    engine = TextEngine()
    with TestClient(create_app(engine, served_name="fake")) as c:
        r = c.post("/v1/steering/auto", json={"name": "auto1", "positive": ["a b"] * 4, "max_fluency_gap": 0.3})
        assert r.status_code == 200, r.text
        assert r.json()["measured"]["concept"] == 0.75
        negatives = engine.auto_args[2]
        assert len(negatives) >= 30 and engine.auto_args[4] == 0.3  # the shipped everyday texts by default
        stored = c.get("/v1/steering/presets/auto1").json()
        assert stored["edits"][0]["feature"] == 3 and stored["vectors"][0]["values"] == V8
        assert _complete(c, {"preset": "auto1"}).status_code == 200
        assert engine.requests[-1].splice.edits == [LatentEdit("fake", 3, "add", 1.5),
                                                     VectorEdit("fake", tuple(V8), "add", 0.25, (1, 2))]


def test_a_feature_carries_its_histogram_with_its_own_edges(tmp_path):
    """The stored histogram (bins lo.. of the file's edges) reaches the client with edges of its own: one more
    than its counts, from the file's edges (bin 0 from 0, the open last bin up to the latent's max)."""
    engine = DescribedEngine(tmp_path / "sae")
    path = tmp_path / "sae" / "features" / "features.json"
    data = json.loads(path.read_text())
    data["hist_edges"] = [1.0, 2.0, 4.0]
    data["features"][2]["hist"] = {"lo": 1, "counts": [5, 0, 2]}  # [1, 2), [2, 4), [4, max]
    data["features"][3]["hist"] = {"lo": 0, "counts": []}  # never active
    path.write_text(json.dumps(data))
    with TestClient(create_app(engine, served_name="fake")) as c:
        h = c.get("/v1/saes/fake/features/2").json()["histogram"]
        assert h == {"edges": [1.0, 2.0, 4.0, 30.0], "counts": [5, 0, 2]}  # feature 2's max is 30
        assert c.get("/v1/saes/fake/features/3").json()["histogram"] is None
        assert c.get("/v1/saes/fake/features/4").json()["histogram"] is None  # written before histograms
