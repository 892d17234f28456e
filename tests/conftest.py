"""Shared fixtures: real tiny models on disk, settings for them, in-process and live servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
import yaml

from clients.local import LocalService, free_port
from service.config import Settings
from tests.tiny import CHAT_TEMPLATE, make_tiny_bert, make_tiny_gpt2

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_DIR = SHARED_DATA / "hh-rlhf"

needs_data = pytest.mark.skipif(
    not HH_DIR.is_dir(), reason=f"HH-RLHF data not found at {HH_DIR} (only present beside the project checkout)"
)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "bert", seed=1)


@pytest.fixture(scope="session")
def tiny_bert_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "bert_b", seed=2)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2", seed=3, chat_template=CHAT_TEMPLATE)


def make_settings(models: list[dict[str, Any]], **sections: Any) -> Settings:
    base = {"models": models, "engine": {"max_wait_ms": 1.0, "threads": 1}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings.model_validate(base)


@pytest.fixture
def two_model_settings(tiny_bert: Path, tiny_bert_b: Path) -> Settings:
    return make_settings([
        {"name": "helpful", "path": str(tiny_bert), "dtype": "float32", "device": "cpu"},
        {"name": "harmless", "path": str(tiny_bert_b), "dtype": "float32", "device": "cpu",
         "reference": {"type": "responses", "responses": ["I can't answer that.", "I cannot help with that."]}},
    ])


async def asgi_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    from asgi_lifespan import LifespanManager

    from service.api import create_app

    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=120) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def client(two_model_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(two_model_settings):
        yield c


class LiveServer(LocalService):
    """``logand serve --config FILE`` in a subprocess on 127.0.0.1: the path a user takes."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        port = free_port()
        config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
        self.config_path = tmp / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        super().__init__(self.config_path, tmp / "server.log", env, port)

    def wait_ready(self, timeout: float = 120.0, headers: dict[str, str] | None = None) -> "LiveServer":
        super().wait_ready(timeout, headers)
        return self


def enc_dec_config(tiny_bert: Path, tiny_gpt2: Path, **sections: Any) -> dict[str, Any]:
    """A server config of an encoder ("enc", constant reference 0.5) and a decoder ("dec")."""
    return {
        "models": [
            {"name": "enc", "path": str(tiny_bert), "device": "cpu", "dtype": "float32",
             "reference": {"type": "constant", "value": 0.5}},
            {"name": "dec", "path": str(tiny_gpt2), "device": "cpu", "dtype": "float32"},
        ],
        "engine": {"max_wait_ms": 2, "threads": 1},
        **sections,
    }


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_gpt2: Path) -> Iterator[LiveServer]:
    server = LiveServer(enc_dec_config(tiny_bert, tiny_gpt2), tmp_path_factory.mktemp("live"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
