"""The LlavaRun object: group llavarun.io, version v1alpha1."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from .base import ApiModel
from .spec import DNS1035, MAX_RUN_NAME_LENGTH, LlavaRunSpec
from .status import LlavaRunStatus

GROUP = "llavarun.io"
VERSION = "v1alpha1"
KIND = "LlavaRun"
PLURAL = "llavaruns"
SINGULAR = "llavarun"
SHORT_NAMES = ["lrun"]
CATEGORIES = ["llava"]
API_VERSION = f"{GROUP}/{VERSION}"


class ObjectMeta(ApiModel):
    """The parts of metadata a LlavaRun's validity depends on; the rest passes through."""

    model_config = {**ApiModel.model_config, "extra": "allow"}

    name: str = Field(min_length=1, max_length=MAX_RUN_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _dns1035(cls, value: str) -> str:
        if not re.match(DNS1035, value):
            raise ValueError(
                f"{value!r} must be a DNS-1035 label (lower-case letters, digits and '-', starting "
                "with a letter): pod and service names are derived from it"
            )
        return value


class LlavaRun(ApiModel):
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: LlavaRunSpec
    status: LlavaRunStatus | None = None

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        if value != API_VERSION:
            raise ValueError(f"must be {API_VERSION}")
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value != KIND:
            raise ValueError(f"must be {KIND}")
        return value

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @classmethod
    def from_k8s(cls, body: dict[str, Any]) -> LlavaRun:
        """Parse a LlavaRun as read from the apiserver or a file."""
        return cls.model_validate(body)
