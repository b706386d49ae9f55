"""Steering presets and `compare` over HTTP against the fake engine (fast tier): routes, persistence across a
restart, the admin key, validation (404 for what the server lacks, 400 for bounds), and the response shapes.
What the engines do with them is in test_steering.py."""

import json

import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from saelora.serve.api.app import create_app
from server_util import error_body

PRESET = {"mode": "error_term", "edits": [{"feature": 3, "op": "set", "value": 5.0, "positions": "generated"},
                                          {"feature": 4, "op": "ablate", "when": {"feature": 2, "above": 0.5}}]}


@pytest.fixture
def engine():
    return FakeEngine()


_err = error_body


def test_preset_crud_and_persistence(engine, tmp_path):
    with TestClient(create_app(engine, served_name="fake", presets_dir=str(tmp_path))) as c:
        assert c.get("/v1/steering/presets").json() == {"object": "list", "data": []}
        r = c.put("/v1/steering/presets/calm", json=PRESET)
        assert r.status_code == 200 and r.json()["name"] == "calm"
        got = c.get("/v1/steering/presets/calm").json()
        assert got["edits"][1]["when"] == {"sae": None, "feature": 2, "above": 0.5}
        assert [p["name"] for p in c.get("/v1/steering/presets").json()["data"]] == ["calm"]
        assert json.loads((tmp_path / "calm.json").read_text())["edits"][0]["feature"] == 3
    with TestClient(create_app(FakeEngine(), served_name="fake", presets_dir=str(tmp_path))) as c:  # a restart
        assert c.get("/v1/steering/presets/calm").json()["edits"] == got["edits"]
        assert c.delete("/v1/steering/presets/calm").status_code == 200
        _err(c.get("/v1/steering/presets/calm"), 404)
        _err(c.delete("/v1/steering/presets/calm"), 404)
    assert not (tmp_path / "calm.json").exists()


def test_preset_validation(engine):
    with TestClient(create_app(engine, served_name="fake")) as c:
        _err(c.put("/v1/steering/presets/x", json={"edits": [{"feature": 16, "op": "set"}]}), 404)  # d_sae 16
        _err(c.put("/v1/steering/presets/x", json={"edits": [{"sae": "nope", "feature": 1, "op": "set"}]}), 404)
        assert c.put("/v1/steering/presets/empty", json={"edits": []}).status_code == 200  # steers nothing
        c.delete("/v1/steering/presets/empty")
        _err(c.put("/v1/steering/presets/x", json={"edits": [{"feature": 1, "op": "set", "when": {
            "feature": 1, "above": 1e300}}]}), 400)
        _err(c.put("/v1/steering/presets/x", json={"edits": [{"feature": 1, "op": "set", "when": {
            "sae": "other", "feature": 1, "above": 0}}]}), 404)  # an SAE the server lacks
        _err(c.put("/v1/steering/presets/a.b", json=PRESET), 400)
        _err(c.put("/v1/steering/presets/" + "a" * 65, json=PRESET), 400)
        _err(c.post("/v1/completions", json={"prompt": "the cat", "sae": {"preset": "missing"}}), 404)
        _err(c.post("/v1/completions", json={"prompt": "the cat", "sae": {"stop_when": [
            {"feature": 99, "above": 1}]}}), 404)
        _err(c.post("/v1/completions", json={"prompt": "the cat", "sae": {"stop_when": [
            {"feature": 1, "above": 1}] * 17}}), 400)
        assert c.get("/v1/steering/presets").json()["data"] == []  # nothing stored by a refused PUT


def test_admin_key_guards_preset_changes(engine):
    user, admin = {"Authorization": "Bearer k"}, {"Authorization": "Bearer adm"}
    with TestClient(create_app(engine, served_name="fake", api_key="k")) as c:  # no admin key: changes are off
        _err(c.put("/v1/steering/presets/p", json=PRESET, headers=user), 403)
        assert c.get("/v1/steering/presets", headers=user).status_code == 200
    with TestClient(create_app(engine, served_name="fake", api_key="k", admin_api_key="adm")) as c:
        _err(c.put("/v1/steering/presets/p", json=PRESET, headers=user), 401)
        assert c.put("/v1/steering/presets/p", json=PRESET, headers=admin).status_code == 200
        assert c.get("/v1/steering/presets/p", headers=user).status_code == 200  # reading needs the user key
        _err(c.get("/v1/steering/presets/p"), 401)
        r = c.post("/v1/completions", json={"prompt": "the cat", "sae": {"preset": "p"}}, headers=user)
        assert r.status_code == 200
        _err(c.delete("/v1/steering/presets/p", headers=user), 401)
        assert c.delete("/v1/steering/presets/p", headers=admin).status_code == 200


def test_preset_edits_come_first_and_mode_follows_the_preset(engine):
    with TestClient(create_app(engine, served_name="fake")) as c:
        c.put("/v1/steering/presets/p", json={"mode": "replace", "edits": PRESET["edits"]})
        inline = {"feature": 9, "op": "add", "value": 1.0}
        assert c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 1,
                                               "sae": {"preset": "p", "edits": [inline]}}).status_code == 200
        req = engine.requests[-1].splice
        assert [e.feature for e in req.edits] == [3, 4, 9] and req.modes == {"fake": "replace"}
        assert req.edits[1].when is not None and req.edits[1].when.sae == "fake"
        c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 1, "sae": {"preset": "p", "mode": "off"}})
        assert engine.requests[-1].splice.modes == {"fake": "off"}  # the request's own mode wins


def test_compare_runs_unsteered_twins_with_the_same_seeds(engine):
    with TestClient(create_app(engine, served_name="fake")) as c:
        body = {"prompt": "the cat", "max_tokens": 3, "n": 2, "sae": {
            "edits": [{"feature": 3, "op": "set", "value": 5.0}], "compare": True,
            "features": {"top_k": 2}}}
        r = c.post("/v1/completions", json=body).json()
        reqs = engine.requests[-4:]
        assert [len(q.splice.edits) for q in reqs] == [1, 1, 0, 0]
        assert reqs[0].sampling.seed is not None  # drawn once, shared by both halves
        assert [q.sampling.seed for q in reqs[:2]] == [q.sampling.seed for q in reqs[2:]]
        assert len(r["choices"]) == 2
        for ch in r["choices"]:
            assert ch["unsteered"]["text"] and ch["unsteered"]["finish_reason"] == "length"
            assert len(ch["unsteered"]["features"]["generated"]) == 3
        assert r["usage"]["completion_tokens"] == 12  # both halves are counted
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
                "sae": {"edits": [{"feature": 3, "op": "set"}], "compare": True, "features": {"top_k": 0}}}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        twins = [ch["choices"][0]["unsteered"] for ch in chunks if "unsteered" in ch["choices"][0]]
        steered = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks
                          if "unsteered" not in ch["choices"][0])
        assert steered and "".join(t["text"] for t in twins) and twins[-1]["finish_reason"] == "length"
        assert {ch["choices"][0]["index"] for ch in chunks} == {0}


def test_405_lists_every_method_of_the_path(engine):
    """Regression (schemathesis ST205): a path served by several routes (GET, PUT, DELETE) names them all."""
    with TestClient(create_app(engine, served_name="fake")) as c:
        r = c.post("/v1/steering/presets/p", json=PRESET)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"
