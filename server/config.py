"""Settings: every option comes from the command line or a ``TOME_*`` environment variable.

``tome-serve --help`` is generated from this class by pydantic-settings: each field is a flag
(``max_batch_size`` -> ``--max-batch-size``) whose help text is the field's description, and a
value on the command line wins over the environment. Routes get the settings through the app
(``request.app.state``), never from a module global, so tests can build apps side by side.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .params import MergeRule, RChoice, parse_r_choice

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Serve timm Vision Transformers accelerated with Token Merging (ToMe) over HTTP. Every option
    falls back to the environment variable TOME_<OPTION> (e.g. TOME_MAX_BATCH_SIZE); the command
    line wins. SIGTERM or Ctrl-C drains: /readyz turns 503, queued requests finish, then it exits.
    Exit status: 0 after a clean shutdown, 1 when a model cannot be served, 2 for invalid settings,
    3 when the port cannot be bound."""

    model_config = SettingsConfigDict(
        env_prefix="TOME_",
        extra="ignore",
        protected_namespaces=(),
        cli_prog_name="tome-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    model: str = Field(
        "vit_base_patch16_224",
        description="timm model name; comma-separated for several (the first is the default)",
    )
    weights: str = Field(
        "pretrained",
        description="'pretrained' (model hub, cached under HF_HOME), 'random', or a local weights file",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="model precision; auto: bfloat16 where the CPU or GPU computes it natively "
        "(AVX-512-BF16, AMX, Arm BF16, CUDA compute capability 8+), else float32",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    model_kwargs: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of extra timm.create_model arguments, e.g. '{\"img_size\": 224}'",
    )

    max_batch_size: int = Field(
        8, ge=1, le=1024, description="a batch closes when it holds this many images..."
    )
    max_delay_ms: float = Field(5.0, ge=0.0, description="...or when its oldest request has waited this long")
    max_queue: int = Field(
        64, ge=1, description="capacity of each (model, r) queue; a full queue answers 429"
    )
    request_timeout_ms: float = Field(
        10_000.0, gt=0.0, description="deadline from a request's arrival; then 504"
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0.0,
        description="seconds an idle keep-alive connection stays open; longer than load balancers' "
        "(60 s), so clients close first and never send into a connection the server is closing",
    )
    max_upload_bytes: int = Field(10 * MIB, ge=1, description="largest upload; larger ones get 413")
    embed_max_items: int = Field(
        32, ge=1, description="/v1/embeddings: most images in one request (and at most TOME_MAX_QUEUE)"
    )
    embed_max_request_bytes: int = Field(
        64 * MIB,
        ge=1,
        description="/v1/embeddings: largest request body; each image within TOME_MAX_UPLOAD_BYTES",
    )
    embed_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="/v1/embeddings: comma-separated hosts whose http(s) image URLs are fetched; empty: URL "
        "inputs are refused (a server that fetches any URL is an SSRF hole)",
    )
    embed_url_timeout_s: float = Field(5.0, gt=0.0, description="/v1/embeddings: time limit of one URL fetch")
    max_pixels: int = Field(
        40_000_000, ge=1, description="largest image (width x height), checked before decoding"
    )
    default_r: RChoice = Field(
        "auto",
        description="r for requests that give none: 'auto' (r=auto: the least merging that meets the "
        "latency target) or an integer (capped at each model's r_max)",
    )
    default_merge: MergeRule = Field(
        "tome",
        description="merge rule of requests that name none: 'tome' (the paper's size-weighted average) or "
        "'mlerp' (the average rescaled to the larger norm, ToFu); r=auto requests that name none get the "
        "rule chosen with r, this one unless another is measured better within the same time",
    )
    max_r: int | None = Field(
        None, ge=0, description="the server's ceiling on r; unset: each model's largest useful r"
    )
    latency_target_ms: float | None = Field(
        None,
        description="latency target of r=auto requests; unset: 2 x the measured time of a full batch "
        "at r=0, rounded up to 10 ms, at most the request timeout",
    )
    auto_max_r: int | None = Field(
        None, ge=0, description="the auto ceiling: largest r that r=auto may choose; unset: the ceiling"
    )
    auto_warmup_s: float = Field(
        20.0,
        ge=0.0,
        description="start-up budget per model for measuring r=auto's cost tables, one per merge rule, "
        "the default rule's first (0: one batch size at r=0 each; real batches fill in the rest)",
    )
    state_dir: Path | None = Field(
        None,
        description="folder that keeps each model's measured r=auto cost table between starts, keyed by "
        "model, weights, dtype, hardware, torch and timm versions and thread plan: a start that finds a "
        "valid one is ready without the warm-up and re-checks it in the background; unset: none kept",
    )
    calibration_dir: Path | None = Field(
        None,
        description="folder of images run at r=0 and at every r of the grid with every merge rule at "
        "start-up to measure fidelity; unset: the repository's sample photos (server/static/samples)",
    )
    calibration_budget_s: float = Field(
        10.0, ge=0.0, description="start-up budget per model for fidelity calibration (0: none)"
    )
    min_fidelity: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="fidelity floor of r=auto: it only chooses an r whose lower bound (top-1 agreement "
        "with r=0, or embedding cosine) is at least this; unset: no floor",
    )
    fidelity_min_samples: int = Field(
        30, ge=1, description="samples an r needs before it can meet a fidelity floor"
    )
    fidelity_profile: Path | None = Field(
        None, description="fidelity profile written by tome-eval --profile, merged in at start-up"
    )
    shadow_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of images served at r > 0 run again at r=0 while the model is idle, to "
        "measure fidelity on live traffic (dropped, and counted, while busy)",
    )
    api_key: SecretStr | None = Field(
        None, description="when set, requests need 'Authorization: Bearer <key>' (prefer the variable)"
    )
    preprocess_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="threads that decode, resize and crop uploads; auto: a quarter of the cores, >= 1"
    )
    instances: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="inference threads per model, each running whole batches; auto: on up to 4 CPU "
        "cores one per core, on more one per 4 cores, on a GPU one",
    )
    torch_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        "auto",
        description="torch threads of each instance; auto: 1 on up to 4 cores, else 4 "
        "(or the cores / instances when instances is set)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )
    access_log: bool = Field(False, description="log every request (costs throughput)")

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _parse_kwargs(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"--model-kwargs / TOME_MODEL_KWARGS must be a JSON object: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("--model-kwargs / TOME_MODEL_KWARGS must be a JSON object")
        return value

    @field_validator("embed_url_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    @field_validator("default_r", mode="before")
    @classmethod
    def _auto_or_integer(cls, value: object) -> object:
        return parse_r_choice(value, "TOME_DEFAULT_R")

    @field_validator(
        "max_r",
        "api_key",
        "latency_target_ms",
        "auto_max_r",
        "state_dir",
        "calibration_dir",
        "min_fidelity",
        "fidelity_profile",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("calibration_dir")
    @classmethod
    def _a_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"--calibration-dir / TOME_CALIBRATION_DIR: {value} is not a folder")
        return value

    @field_validator("fidelity_profile")
    @classmethod
    def _a_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"--fidelity-profile / TOME_FIDELITY_PROFILE: {value} is not a file")
        return value

    @field_validator("model")
    @classmethod
    def _some_model(cls, value: str) -> str:
        if not [name for name in value.split(",") if name.strip()]:
            raise ValueError("--model / TOME_MODEL names no model")
        return value

    @model_validator(mode="after")
    def _default_r_within_max_r(self) -> Settings:
        explicit = "default_r" in self.model_fields_set and isinstance(self.default_r, int)
        if explicit and self.max_r is not None and self.default_r > self.max_r:
            raise ValueError(
                f"--default-r / TOME_DEFAULT_R ({self.default_r}) is above "
                f"--max-r / TOME_MAX_R ({self.max_r})"
            )
        return self

    @model_validator(mode="after")
    def _target_within_timeout(self) -> Settings:
        target = self.latency_target_ms
        if target is not None and not 0 < target <= self.request_timeout_ms:
            raise ValueError(
                "--latency-target-ms / TOME_LATENCY_TARGET_MS must be above 0 and at most "
                f"TOME_REQUEST_TIMEOUT_MS ({self.request_timeout_ms:g}), got {target:g}"
            )
        return self

    @property
    def model_names(self) -> list[str]:
        names = [name.strip() for name in self.model.split(",") if name.strip()]
        return list(dict.fromkeys(names))

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def request_timeout_s(self) -> float:
        return self.request_timeout_ms / 1000.0


# The class docstring is the description of ``tome-serve --help``, which shows it as written.
Settings.__doc__ = inspect.cleandoc(Settings.__doc__ or "")
