"""Config: validation names the field, environment overrides, the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.config import DEFAULT_CONFIG, ConfigError, load_settings


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data, field", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a b", "path": "x"}]}, "models.0.name"),
    ({"models": [{"name": "a", "path": "x", "dtype": "int8"}]}, "models.0.dtype"),
    ({"models": [{"name": "a", "path": "x", "reference": {"type": "responses"}}]}, "models.0.reference"),
    ({"models": [{"name": "a", "path": "x", "reference": {"type": "quantile", "path": "p"}}]}, "models.0.reference"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "unique"),
    ({"models": [{"name": "a", "path": "x"}], "default_models": ["b"]}, "default_models"),
    ({"models": [{"name": "a", "path": "x"}], "default_method": "max"}, "default_method"),
    ({"models": [{"name": "a", "path": "x"}], "engine": {"max_batch_size": 0}}, "engine.max_batch_size"),
    ({"models": [{"name": "a", "path": "x", "colour": 1}]}, "models.0.colour"),
])
def test_bad_config_names_the_field(tmp_path: Path, data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, data), env={})
    assert field in str(exc.value) and str(tmp_path) in str(exc.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, env={})


def test_environment_overrides(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    path = write(tmp_path, {"models": [{"name": "a", "path": "x"}]})
    s = load_settings(path, env={
        "LOGAND_HOST": "0.0.0.0", "LOGAND_PORT": "9001", "LOGAND_API_KEY_FILE": str(key_file),
        "LOGAND_DEVICE": "cpu", "LOGAND_DTYPE": "bfloat16", "LOGAND__ENGINE__MAX_WAIT_MS": "7.5",
        "LOGAND_MODELS_DIR": "/models",
    })
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9001)
    assert s.auth.resolved_key() == "from-file"
    assert s.models[0].device == "cpu" and s.models[0].dtype == "bfloat16"
    assert s.engine.max_wait_ms == 7.5 and s.base_dir == "/models"
    s = load_settings(path, env={"LOGAND_API_KEY": "123"})
    assert s.auth.resolved_key() == "123"  # kept as a string, not parsed as a number
    assert s.server.host == "127.0.0.1"  # loopback unless told otherwise


def test_missing_key_file_fails_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, {"models": [{"name": "a", "path": "x"}], "auth": {"api_key_file": str(tmp_path / "no")}})
    with pytest.raises(ConfigError, match="api_key_file"):
        load_settings(path, env={})


def test_embedded_default_config_is_valid() -> None:
    s = load_settings(None, env={})
    assert [m.name for m in s.models][:2] == ["helpful", "harmless"]
    assert s.default_model_names == ["helpful", "harmless"]
    assert Path(s.base_dir or "") == DEFAULT_CONFIG.parent
