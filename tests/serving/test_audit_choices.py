"""The audit log on the server's direct engine path: with `n > 1` every choice is a decision of its own
(one line each), all under the completion's id and the one verdict the judge gave."""

from __future__ import annotations

import json

import openai
import pytest
from support.servers import ThreadServer

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])


def test_each_choice_of_an_n_request_writes_its_own_line_under_one_id_and_one_verdict(tiny_model_dir, tmp_path):
    from safecode_guard.serving import ServerSettings, create_app

    audit = tmp_path / "audit.jsonl"
    settings = ServerSettings(
        model=str(tiny_model_dir("llava")), judge="fixed:unsafe", served_model_name="tiny", audit_log=str(audit)
    )
    with ThreadServer(create_app(settings)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=3, temperature=1.0, seed=5
        )
    lines = [json.loads(line) for line in audit.read_text().splitlines()]  # the server's exit flushed them
    assert len(completion.choices) == 3
    assert len(lines) == 3
    assert {line["request_id"] for line in lines} == {completion.id}
    assert {(line["verdict"], line["source"], line["model"]) for line in lines} == {("unsafe", "judge", "tiny")}
    assert sum(line["completion_tokens"] for line in lines) == completion.usage.completion_tokens
