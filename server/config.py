"""Settings: every option comes from a ``TOME_*`` environment variable or the command line.

Routes get the settings through FastAPI dependency injection (:func:`get_settings`), never from a
module global, so tests can build apps with different settings side by side.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOME_", extra="ignore", protected_namespaces=())

    model: str = Field(
        "vit_base_patch16_224", description="timm model name(s), comma-separated; the first is the default"
    )
    weights: str = Field("pretrained", description="'pretrained', 'random', or a local weights file")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_kwargs: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="JSON object of extra timm.create_model kwargs"
    )

    max_batch_size: int = Field(8, ge=1, le=1024)
    max_delay_ms: float = Field(5.0, ge=0.0)
    max_queue: int = Field(64, ge=1, description="capacity of each (model, r) queue")
    request_timeout_ms: float = Field(10_000.0, gt=0.0)
    max_upload_bytes: int = Field(10 * MIB, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    default_r: int = Field(16, ge=0)
    max_r: int | None = Field(None, ge=0, description="cap on r; each model's own maximum otherwise")
    api_key: SecretStr | None = None
    preprocess_threads: int = Field(2, ge=1, description="threads that decode and preprocess images")
    instances: int = Field(
        1,
        ge=1,
        le=64,
        description="inference threads per model, each running whole batches; on CPU they split "
        "torch's threads between them (more throughput, longer batches)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(False, description="log every request (costs throughput)")

    test_fail_r: int | None = Field(
        None, description="TEST ONLY: every batch at this r raises inside the inference worker"
    )

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _parse_kwargs(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"TOME_MODEL_KWARGS must be a JSON object: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("TOME_MODEL_KWARGS must be a JSON object")
        return value

    @field_validator("max_r", "test_fail_r", "api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model")
    @classmethod
    def _some_model(cls, value: str) -> str:
        if not [name for name in value.split(",") if name.strip()]:
            raise ValueError("TOME_MODEL names no model")
        return value

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


def get_settings(request: Request) -> Settings:
    """FastAPI dependency: the settings the app was built with."""
    return request.app.state.settings
