"""Schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): ST202 `positive_data_acceptance`, with the single
exemption no static schema can express. Whether prompt + max_tokens fits the context depends on the prompt's
token count; the server answers that case with 400 and OpenAI's code "context_length_exceeded". Any other
rejection of schema-valid data still fails."""

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


def _context_length_exceeded(response) -> bool:
    try:
        return response.status_code == 400 and json.loads(response.text)["error"]["code"] == "context_length_exceeded"
    except (ValueError, KeyError, TypeError):
        return False


@schemathesis.check
def positive_data_acceptance_within_context(ctx, response, case):
    if _context_length_exceeded(response):
        return None
    return positive_data_acceptance(ctx, response, case)
