"""Schemathesis against the service's own OpenAPI spec: no input gets a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from test_service import trained_store

from service.app import EventSink, create_app
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource

SOURCE = SyntheticSource(
    SyntheticConfig(num_sparse=3, num_dense=2, universe=200, interaction_pairs=[(1, 2)]), 3_000
)
LOG = InMemoryLog()
APP = create_app(trained_store(SOURCE.spec), events=EventSink(LOG.producer(), "t", SOURCE.spec))
# Load the published version now: the fuzzer's calls do not run the app's lifespan.
assert APP.state.models.refresh()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    case.call_and_validate(checks=[not_a_server_error])
