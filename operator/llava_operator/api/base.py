"""Shared pydantic configuration for the Kubernetes-facing API models.

Fields are snake_case in Python and camelCase on the wire, as Kubernetes APIs are.
Unknown fields are rejected (the apiserver does the same with strict field validation).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of every LlavaRun API object: camelCase aliases, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    def to_k8s(self) -> dict:
        """The object as Kubernetes JSON: camelCase, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
