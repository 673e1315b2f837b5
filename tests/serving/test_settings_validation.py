"""Settings built from other settings are validated like settings built anew.

pydantic's `model_copy(update=...)` skips validation; the paths that derive
settings (a Ray replica's key from `SAFECODE_API_KEY`, per-request SafeCoDe
settings, the server's input policy, the engine's untimed judge config) go
through `validated_copy` instead.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from safecode_guard.config import InputPolicy, SafeCoDeConfig, validated_copy
from safecode_guard.serving.settings import ServerSettings


def test_validated_copy_checks_types_and_ranges():
    config = SafeCoDeConfig()
    assert validated_copy(config, {"alpha": 0.5}).alpha == 0.5
    with pytest.raises(ValidationError, match="alpha"):
        validated_copy(config, {"alpha": -1})
    settings = validated_copy(ServerSettings(), {"api_key": "k"})
    assert isinstance(settings.api_key, SecretStr) and settings.api_key.get_secret_value() == "k"
    with pytest.raises(ValidationError, match="max_new_tokens"):
        validated_copy(ServerSettings(), {"max_new_tokens": 0})


def test_a_server_never_reads_local_files_for_clients():
    settings = ServerSettings(policy=InputPolicy(allow_local_files=True, local_files_root="/srv", max_images=2))
    assert settings.policy.allow_local_files is False and settings.policy.max_images == 2


def test_a_ray_replica_takes_its_key_from_the_environment_as_a_secret(monkeypatch, tiny_model_dir):
    """Regression: the key from `SAFECODE_API_KEY` stayed a `str` and every Bearer request got HTTP 500."""
    pytest.importorskip("ray.serve")
    from safecode_guard.serving.ray_serve import SafeCoDeServer

    monkeypatch.setenv("SAFECODE_API_KEY", "replica-key")
    settings = ServerSettings(model=str(tiny_model_dir("llava")), judge="fixed:safe", max_new_tokens=2)
    replica_class = SafeCoDeServer.__mro__[1]  # the class under Serve's ingress wrapper (its constructor is async)
    replica = replica_class(settings.model_dump_json())
    client = TestClient(replica.__serve_build_asgi_app__())
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer replica-key"})
    assert ok.status_code == 200, ok.text
    wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer other"})
    assert wrong.status_code == 401
    assert client.post("/v1/chat/completions", json=body).status_code == 401
