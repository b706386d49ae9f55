"""Schemathesis against the server's own /openapi.json: 0 failures. Over the fake engine with every route; over
both real engines (tiny model) with the adapter-management routes left out, since the session's servers are
shared with other tests, and auto-steer left out (each call generates ~9 settings: seconds, not the milliseconds
the response-time check expects; its validation runs over a fake text-reading engine in
test_steer_routes_http.py, its real runs in test_steering.py). Server-dependent rules (a latent outside d_sae, a
vector of another width, units without descriptions) answer 404, so schema-valid requests never get a 400.

Every check runs. `positive_data_acceptance` (ST202, "a schema-valid request must not get a 400") runs as
`positive_data_acceptance_within_context` (schemathesis_hooks.py): the one rule no static schema can state is the
context limit, which depends on the prompt's token count; the server answers it with 400 and OpenAI's code
"context_length_exceeded", and the hook exempts exactly that answer. Negative-data rejection (ST201), status
codes, content types, response schemas, headers (Allow on 405) and the stateful phase are all checked.

`--max-response-time 10` is a stall detector, not a speed goal (those live in bench/): a tiny-model request
answers in milliseconds, so 10 s means the engine stopped serving. It found one: vLLM compiling its
logprob-rank op inside the engine step on the first logprobs request (14 s in CI; sampler_ops.py)."""

import os
import shutil
import subprocess
import sys

import pytest

from fake_engine import FakeEngine
from saelora.serve.api.app import create_app
from server_util import LiveServer

pytestmark = pytest.mark.integration


def _schemathesis(url: str, *extra: str, examples: int) -> None:
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert exe, "schemathesis is part of the dev extras"
    cmd = [exe, "run", url + "/openapi.json", "--checks", "all", "--max-examples", str(examples), "--seed", "1",
           "--request-timeout", "60", "--max-response-time", "10", "--no-color",
           "--exclude-checks", "positive_data_acceptance", *extra]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks",
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_schemathesis_over_the_fake_engine():
    with LiveServer(create_app(FakeEngine(), served_name="fake")) as srv:
        _schemathesis(srv.url, examples=60)


def test_schemathesis_over_a_real_engine(server):
    _schemathesis(server.url, "--exclude-path-regex", "lora_adapter|steering/auto", examples=15)
