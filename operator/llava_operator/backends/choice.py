"""Which cluster backend runs a LlavaRun: recorded in status.backend when the run starts, so a
started run never switches, whatever the spec or the operator's default says later."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LEGACY_KIND = "PyTorchJob"
"""What ran a run that started before status.backend was recorded."""


def chosen_kind(body: Mapping[str, Any], default: str) -> str:
    """status.backend, else (a run started without the record) PyTorchJob, else spec.backend, else
    the operator's default."""
    status = body.get("status") or {}
    if status.get("backend"):
        return str(status["backend"])
    if status.get("currentJob") or status.get("stages"):
        return LEGACY_KIND
    return str((body.get("spec") or {}).get("backend") or default)


def backend_record(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The status merge patch recording the backend ({} when recorded)."""
    return {} if (body.get("status") or {}).get("backend") == kind else {"backend": kind}


def not_served(body: Mapping[str, Any], kind: str, served: Iterable[str]) -> str:
    """Why a run whose backend is `kind` cannot run on an operator serving only `served`, naming
    the field that chose it and what to change."""
    served = ", ".join(served)
    serve = (
        f"serve {kind} (operator flag --backends; chart value backends.{kind[0].lower()}{kind[1:]}.enabled)"
    )
    if (body.get("status") or {}).get("backend") == kind:
        return (
            f"status.backend: the run started on {kind}, which this operator does not serve "
            f"(it serves {served}); {serve} to continue it"
        )
    if (body.get("spec") or {}).get("backend") == kind:
        return (
            f"spec.backend: {kind} is not served by this operator (it serves {served}); "
            f"choose one of those, or {serve}"
        )
    return (
        f"status: the run started before status.backend was recorded, so on {kind}, which this operator "
        f"does not serve (it serves {served}); {serve} to continue it"
    )
