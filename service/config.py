"""Service configuration: one YAML file, validated by pydantic, with environment overrides.

Every field is documented once, here, in its ``Field(description=…)``; ``logand config-schema``
prints them.  A bad file fails at start-up with the offending field named.

Environment overrides (applied after the file, for containers):

``LOGAND_HOST`` / ``LOGAND_PORT``         server.host / server.port
``LOGAND_API_KEY`` / ``LOGAND_API_KEY_FILE``  auth.api_key / auth.api_key_file
``LOGAND_MODELS_DIR``                    folder that relative model paths are resolved against
``LOGAND_DEVICE`` / ``LOGAND_DTYPE``      device / dtype of every model
``LOGAND__SECTION__FIELD=value``         any scalar field, e.g. ``LOGAND__ENGINE__MAX_WAIT_MS=5``
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .utility import DEFAULT_METHOD, METHODS

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the file and field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReferenceConfig(_Section):
    type: Literal["none", "constant", "responses", "quantile"] = Field(
        "none", description="how r_ref(x) is found: 0, a constant, reference responses, or a quantile predictor"
    )
    value: float = Field(0.0, description="the constant, for type 'constant'", allow_inf_nan=False)
    responses: list[str] = Field(
        default_factory=list, description="reference responses, for type 'responses': r_ref = mean r(x, y_ref)"
    )
    path: str | None = Field(None, description="quantile predictor artifact, for type 'quantile'")
    q: float | None = Field(None, gt=0, lt=1, description="quantile level (s = Φ⁻¹(q)), for type 'quantile'")
    s: float | None = Field(None, description="number of standard deviations, instead of q", allow_inf_nan=False)
    cache_size: int = Field(100_000, ge=0, description="prompts whose reference is kept in memory")

    @model_validator(mode="after")
    def _complete(self) -> "ReferenceConfig":
        if self.type == "responses" and not [r for r in self.responses if r.strip()]:
            raise ValueError("type 'responses' needs a non-empty 'responses' list")
        if self.type == "quantile":
            if not self.path:
                raise ValueError("type 'quantile' needs 'path'")
            if (self.q is None) == (self.s is None):
                raise ValueError("type 'quantile' needs exactly one of 'q' or 's'")
        return self


class ModelConfig(_Section):
    name: str = Field(description="name used in requests and responses", pattern=NAME_PATTERN)
    path: str = Field(
        description="model directory, 'pkg:module/sub/dir' inside an installed package, or a hub name"
    )
    backend: Literal["torch", "onnx"] = Field("torch", description="inference backend")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on CUDA, float32 on CPU (bfloat16 is opt-in there: "
                "1.6x faster on CPUs with native bf16, see reports/performance)"
    )
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when present)")
    max_length: int | None = Field(None, ge=8, description="token limit; default: the model's own")
    style: Literal["pair", "chat", "text"] | None = Field(
        None, description="input formatting; default: pair for encoders, chat when a template exists, else text"
    )
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    append_eos: bool | None = Field(None, description="append EOS after the response (default: as trained)")
    trust_remote_code: bool = Field(False, description="allow code shipped with the model (off: safer)")
    quantize: Literal["none", "int8"] = Field(
        "none", description="onnx backend only: int8 = dynamically quantised weights (made once, beside model.onnx)"
    )
    reuse_prefix: bool = Field(
        True, description="decoders: items of a batch sharing a prompt compute its KV cache once (torch backend)"
    )
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="how r_ref(x) is found")


class EngineConfig(_Section):
    max_batch_tokens: int = Field(16384, ge=64, description="padded tokens (longest × count) per forward pass")
    max_batch_size: int = Field(64, ge=1, description="items per forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long the batcher waits to gather a batch")
    min_fill: float | None = Field(
        None, ge=0, le=1,
        description="least real/padded token ratio of a batch; default 0.9 on CPU (padding is costly), 0 on GPU",
    )
    max_queue_items: int = Field(8192, ge=1, description="items waiting per model before 429")
    batch_timeout_s: float = Field(120.0, gt=0, description="a forward pass taking longer fails its batch (504)")
    threads: int | None = Field(None, ge=1, description="torch/onnxruntime CPU threads; default: torch's own (one per physical core), "
                                 "capped at the CPUs the affinity mask and cgroup quota allow")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503")


class LimitsConfig(_Section):
    max_items_per_request: int = Field(4096, ge=1, description="items in one request (413 past it)")
    max_chars_per_text: int = Field(200_000, ge=1, description="characters in one prompt or response (413)")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size (413)")


class AuthConfig(_Section):
    api_key: SecretStr | None = Field(None, description="required Bearer key; prefer api_key_file or env")
    api_key_file: str | None = Field(None, description="file holding the key (first line)")

    def resolved_key(self) -> str | None:
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_file:
            try:
                key = Path(self.api_key_file).read_text().strip().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"auth.api_key_file {self.api_key_file!r}: cannot read a key ({exc})") from exc
            if not key:
                raise ConfigError(f"auth.api_key_file {self.api_key_file!r} is empty")
            return key
        return None


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="bind address; loopback unless told otherwise")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins (off when empty)")
    keep_alive_s: float = Field(
        75.0, gt=0, description="idle keep-alive connections are closed after this; keep it above the idle "
                                "timeout of clients and load balancers (httpx: 5 s, ALB: 60 s), or a request sent "
                                "on a connection the server is closing fails")
    drain_timeout_s: float = Field(
        130.0, gt=0, description="on SIGTERM, how long accepted requests may take to finish before the server exits")


class CompatConfig(_Section):
    """How requests of external RL trainers (OpenRLHF ``/get_reward``, verl ``/classify``) are read."""

    prompt_format: Literal["auto", "passthrough", "chat_template"] = Field(
        "auto", description="passthrough: prompts are what the reward models expect (HH transcripts or plain "
                            "text); chat_template: text rendered with policy_tokenizer's chat template is parsed "
                            "back into turns; auto: chat_template when policy_tokenizer is set")
    policy_tokenizer: str | None = Field(
        None, description="tokenizer (directory, pkg:/hub reference) of the trainer's policy: its chat template "
                          "(chat_template format) and its EOS / pad tokens, cut from responses")
    keep_system: bool = Field(False, description="keep system turns parsed from rendered text (default: dropped)")
    end_tokens: list[str] = Field(
        default_factory=list, description="extra whole tokens stripped from the end of responses (besides the "
                                          "policy tokenizer's EOS, pad and end-of-turn tokens)")
    allow_truncation: bool = Field(
        True, description="cut responses over a model's context instead of failing: a trainer cannot fix them")
    trust_remote_code: bool = Field(False, description="allow custom code when loading policy_tokenizer")

    @property
    def uses_template(self) -> bool:
        return self.prompt_format == "chat_template" or (self.prompt_format == "auto" and bool(self.policy_tokenizer))

    @model_validator(mode="after")
    def _tokenizer_given(self) -> "CompatConfig":
        if self.prompt_format == "chat_template" and not self.policy_tokenizer:
            raise ValueError("prompt_format 'chat_template' needs policy_tokenizer")
        return self


class Settings(_Section):
    models: list[ModelConfig] = Field(min_length=1, description="reward models to host")
    default_models: list[str] | None = Field(None, description="models scored when a request names none (default: all)")
    default_method: str = Field(DEFAULT_METHOD, description=f"aggregation method: one of {', '.join(METHODS)}")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    compat: CompatConfig = Field(default_factory=CompatConfig)
    base_dir: str | None = Field(None, description="folder relative model paths are resolved against (default: the config file's)")

    @field_validator("default_method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _names(self) -> "Settings":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        for n in self.default_models or []:
            if n not in names:
                raise ValueError(f"default_models names {n!r}, which is not among models ({', '.join(names)})")
        return self

    @property
    def default_model_names(self) -> list[str]:
        return list(self.default_models or [m.name for m in self.models])


def _format_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def _set_path(data: dict[str, Any], path: list[str], value: str) -> None:
    node: Any = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = yaml.safe_load(value) if value != "" else None


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with the environment overrides of the module docstring applied."""
    out = dict(data)
    named = {
        "LOGAND_HOST": ["server", "host"],
        "LOGAND_PORT": ["server", "port"],
        "LOGAND_API_KEY": ["auth", "api_key"],
        "LOGAND_API_KEY_FILE": ["auth", "api_key_file"],
        "LOGAND_MODELS_DIR": ["base_dir"],
    }
    for var, path in named.items():
        if env.get(var):
            if var == "LOGAND_API_KEY":
                out.setdefault("auth", {})["api_key"] = env[var]  # never YAML-parsed: keys are opaque
            else:
                _set_path(out, path, env[var])
    for var, value in env.items():
        if var.startswith("LOGAND__"):
            _set_path(out, [p.lower() for p in var[len("LOGAND__"):].split("__")], value)
    for var, key in (("LOGAND_DEVICE", "device"), ("LOGAND_DTYPE", "dtype")):
        if env.get(var):
            out["models"] = [{**m, key: env[var]} for m in out.get("models", [])]
    return out


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read, override and validate a config file (``None``: the embedded default models)."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level")
    data = apply_env(data, os.environ if env is None else env)
    data.setdefault("base_dir", str(source.resolve().parent))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(str(source), exc)) from None
    settings.auth.resolved_key()  # fail now, not on the first request, if the key file is unreadable
    return settings
