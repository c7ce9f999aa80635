"""REST calls to the apiserver, and the one writer of a LlavaRun's status both writers share.

Plain REST over the `kubernetes` client's transport (auth, TLS, proxies from the kubeconfig or
the in-cluster ServiceAccount), with JSON dicts in and out: the typed models would drop fields
they do not know (e.g. a PyTorchJob's). The operator (`kube.py`) and the trainer's rank 0
(`llava_trainer.status`) both write `llavaruns/status` through `patch_run_status`: the same path,
the same JSON merge patch, the same `ApiError`. Nothing here imports kopf or the reconcile plan,
so the trainer image can use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .api import API_VERSION, PLURAL

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
"""RFC 7386: maps merge, null deletes. Each status writer patches only its own subtree with it."""
TIMEOUT_S = 30.0


class ApiError(Exception):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        try:
            message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            message = body
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.message = message

    @property
    def rejected(self) -> bool:
        """The object itself was refused (its schema, or an admission webhook denied it), as
        opposed to an outage or missing permissions: creating it again unchanged fails the same way."""
        return self.status in (400, 422) or (self.status == 403 and "denied the request" in str(self.message))

    @property
    def namespace_terminating(self) -> bool:
        """Creation refused because the namespace is being (or was) deleted: its runs go with it."""
        gone = self.status == 404 and str(self.message).startswith("namespaces ")
        return gone or (self.status == 403 and "being terminated" in str(self.message))


def request(
    api: ApiClient,
    method: str,
    path: str,
    body: Any = None,
    query: Mapping[str, str] | None = None,
    content_type: str = JSON,
    timeout: float = TIMEOUT_S,
) -> Any:
    """One call; the answer's JSON (None when empty). Raises ApiError on a non-2xx answer."""
    headers = {"Accept": JSON}
    if body is not None:
        headers["Content-Type"] = content_type
    args = api.param_serialize(
        method=method,
        resource_path=path,
        query_params=dict(query or {}) or None,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = api.call_api(*args, _request_timeout=timeout)
    response.read()
    text = (response.data or b"").decode()
    if not 200 <= response.status <= 299:
        raise ApiError(response.status, method, path, text)
    return json.loads(text) if text else None


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    """The REST path of a namespaced collection ("v1" is the core group)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def run_path(namespace: str, name: str) -> str:
    return f"{collection_path(API_VERSION, PLURAL, namespace)}/{name}"


def patch_run_status(
    api: ApiClient, namespace: str, name: str, patch: Mapping[str, Any], timeout: float = TIMEOUT_S
) -> None:
    """Merge `patch` into the run's `status` through the status subresource (the only write the
    trainer's Role allows, and the only one that may change status)."""
    request(
        api,
        "PATCH",
        f"{run_path(namespace, name)}/status",
        {"status": dict(patch)},
        content_type=MERGE_PATCH,
        timeout=timeout,
    )
