"""Property-based fuzz of the OpenAPI schema (schemathesis): valid and invalid requests to
every operation of a real server; no response may be a 5xx. The real engine when it is
there, else the FakeEngine; a short context (--max-model-len 32) keeps generation small."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.server.conftest import ServerProcess, make_adapter, real_server_cmd

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    make_adapter(tmp / "adapters" / "a1", seed=1)
    args = ("--adapters", str(tmp / "adapters"), "--max-model-len", "32", "--max-num-seqs", "32")
    s = ServerProcess(real_server_cmd(*args), log=tmp / "log.txt")
    yield s
    assert s.stop() == 0, s.tail()


def test_schema_fuzz_no_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    count = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=MAX_EXAMPLES if mode == GenerationMode.POSITIVE else MAX_EXAMPLES // 2,
                      deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal count
                count += 1
                resp = case.call(base_url=server.url, timeout=60)
                if resp.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} {mode.name} -> "
                                    f"{resp.status_code}: {resp.text[:300]} body={case.body!r:.300}")

            try:
                run()
            except Unsatisfiable:  # nothing invalid to send (e.g. GET /health)
                pass
    assert count > 100
    assert not failures, "\n".join(failures[:10]) + "\n" + server.tail()
