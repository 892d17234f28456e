"""Schemathesis against the service's own OpenAPI on a live server: every operation, every
check, positive and negative inputs.  No 5xx, no response outside the schema.

A modest number of examples per operation runs in `make test`; `make fuzz` runs many more
(``LOGAND_FUZZ_EXAMPLES``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.conftest import LiveServer, enc_dec_config

EXAMPLES = int(os.environ.get("LOGAND_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_gpt2: Path) -> Iterator[LiveServer]:
    limits = {"max_items_per_request": 64, "max_chars_per_text": 2000, "max_body_bytes": 65536}
    server = LiveServer(enc_dec_config(tiny_bert, tiny_gpt2, limits=limits), tmp_path_factory.mktemp("fuzz"))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _operations() -> list[tuple[str, bool]]:
    """Every documented operation and whether it takes input, read from the app's OpenAPI at
    collection time (the live server's schema is the same document, checked in the test)."""
    from service.api import create_app
    from service.config import Settings

    app = create_app(Settings.model_validate({"models": [{"name": "enc", "path": "unused"}]}))
    return [(f"{m.upper()} {path}", "requestBody" in op or bool(op.get("parameters")))
            for path, ops in app.openapi()["paths"].items() for m, op in ops.items()]


CASES = [(label, mode) for label, has_input in _operations()
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input or mode is GenerationMode.POSITIVE]

# Every check runs on every operation, with one exception: "schema-valid data is accepted" is
# left out where the request has rules JSON Schema does not carry — across fields (a
# single-model method with several models, weights or references naming models not scored, one
# reference value per item) or in the text (an HH transcript, the policy's chat template).  There
# a schema-valid request may rightly get a 422, and `error_names_the_field` checks instead that
# every such refusal is a clean error body naming the offending field.
CROSS_FIELD_RULES = {"POST /v1/score", "POST /v1/utility", "POST /get_reward", "POST /classify"}


@schemathesis.check
def error_names_the_field(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx is the service's error body; a 422 names the field at fault."""
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and error.get("code") and error.get("message"), f"not an error body: {body}"
    if response.status_code == 422:
        assert error.get("field"), f"422 without the field at fault: {body}"
    return True


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_every_operation_survives_fuzzing(api_schema: Any, label: str, mode: GenerationMode) -> None:
    from schemathesis.checks import positive_data_acceptance

    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is in the app's OpenAPI but not in the live server's"
    excluded = [positive_data_acceptance] if label in CROSS_FIELD_RULES else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case: Any) -> None:
        case.call_and_validate(timeout=60, excluded_checks=excluded, additional_checks=[error_names_the_field])

    fuzz()


def test_the_schema_names_the_hosted_models(api_schema: Any) -> None:
    request = api_schema.raw_schema["components"]["schemas"]["ScoreRequest"]["properties"]
    assert request["models"]["anyOf"][0]["items"]["enum"] == ["enc", "dec"]
    assert request["weights"]["anyOf"][0]["propertyNames"]["enum"] == ["enc", "dec"]
