"""The Helm chart: what `helm template` renders for several values sets, and its CRD copy.

Needs the helm binary (built by tests/cluster/build, or on PATH, or $LLAVARUN_HELM); the tests
that do not render run without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from llava_operator import cli
from llava_operator import main as operator_main
from llava_operator.api.crd import generate_crd
from llava_operator.yamlio import dump

from tests.helpers import ROOT, SHARED
from tests.unit.test_render import unknown_fields

CHART = ROOT / "charts" / "llavarun-operator"
K8S_VERSION = "1.37.0"
RELEASE, NAMESPACE = "lr", "llavarun-system"
CORE_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Deployment",
    "Service",
}


@cache
def helm_binary() -> str | None:
    candidates = [os.environ.get("LLAVARUN_HELM")]
    build = ROOT / "tests" / "cluster" / "build"
    if build.exists():
        out = subprocess.run([str(build), "--bin-dir"], capture_output=True, text=True, check=False)
        candidates.append(str(Path(out.stdout.strip()) / "helm") if out.returncode == 0 else None)
    candidates.append(shutil.which("helm"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = helm_binary()
    if binary is None:
        pytest.skip("no helm binary (run tests/cluster/build or put helm on PATH)")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/llavarun-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/llavarun-helm/config",
    }
    proc = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@cache
def _render(*sets: str) -> tuple[dict[str, Any], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    return tuple(d for d in yaml.safe_load_all(helm(*args).stdout) if d)


def render(*sets: str) -> list[dict[str, Any]]:
    return list(_render(*sets))


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rules_of(obj: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in obj["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


OPERATOR_RULES = {
    *(("llavarun.io", "llavaruns", v) for v in ("get", "list", "watch", "patch")),
    *(("llavarun.io", "llavaruns/status", v) for v in ("get", "patch")),
    *(("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")),
    ("", "serviceaccounts", "create"),
    ("rbac.authorization.k8s.io", "roles", "create"),
    ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ("", "events", "create"),
    ("", "events", "patch"),
    ("", "pods", "list"),
}
CRD_DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}


# --- no helm needed --------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    """`make crd` output, byte for byte: regenerate with `llavarun crd > charts/.../files/crds/llavarun.yaml`."""
    chart_copy = (CHART / "files" / "crds" / "llavarun.yaml").read_text()
    assert chart_copy == dump(generate_crd())
    assert chart_copy == (ROOT / "crds" / "llavarun.yaml").read_text()


def test_default_values_match_the_values_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


# --- helm lint and template ------------------------------------------------------------------------


@pytest.mark.parametrize("sets", [(), ("watchNamespace=team-a",), ("replicas=0", "crds.install=false")])
def test_helm_lint_is_clean(sets: tuple[str, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize(
    "sets", [(), ("watchNamespace=team-a",), ("metrics.service.enabled=false", "rbac.create=false")]
)
def test_rendered_core_objects_are_valid_kubernetes(sets: tuple[str, ...]) -> None:
    objs = render(*sets)
    assert objs
    for obj in objs:
        if obj["kind"] in CORE_KINDS or obj["kind"] == "CustomResourceDefinition":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_default_install_objects() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render())
    assert kinds == [
        ("ClusterRole", "lr-llavarun-operator"),
        ("ClusterRole", "lr-llavarun-operator-discovery"),
        ("ClusterRole", "lr-llavarun-operator-edit"),
        ("ClusterRole", "lr-llavarun-operator-view"),
        ("ClusterRoleBinding", "lr-llavarun-operator"),
        ("ClusterRoleBinding", "lr-llavarun-operator-discovery"),
        ("CustomResourceDefinition", "llavaruns.llavarun.io"),
        ("Deployment", "lr-llavarun-operator"),
        ("Service", "lr-llavarun-operator-metrics"),
        ("ServiceAccount", "lr-llavarun-operator"),
    ]


def test_crd_template_is_the_generated_crd_with_release_labels_and_keep_policy() -> None:
    crd = one(render(), "CustomResourceDefinition")
    generated = generate_crd()
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "crd"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_crd_switches() -> None:
    assert "annotations" not in one(render("crds.keep=false"), "CustomResourceDefinition")["metadata"]
    assert not [o for o in render("crds.install=false") if o["kind"] == "CustomResourceDefinition"]


def test_deployment_is_one_recreated_replica_with_a_liveness_probe() -> None:
    dep = one(render(), "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/llavarun/llavarun-operator:0.1.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "healthz")
    assert pod["serviceAccountName"] == "lr-llavarun-operator"
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_deployment_args_are_the_operators_own_flags() -> None:
    args = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator"
    parsed = operator_main.build_parser().parse_args(args[1:])
    assert parsed.all_namespaces and not parsed.namespace
    assert (parsed.log_format, parsed.liveness_port, parsed.metrics_port, parsed.resync_seconds) == (
        "json",
        8080,
        9090,
        30.0,
    )


def test_deployment_args_run_the_operator_through_the_llavarun_entrypoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image's ENTRYPOINT is `llavarun`: its args must reach kopf.run as the chart means them."""
    args = one(render("watchNamespace=team-a"), "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(operator_main.kopf, "run", lambda **kw: calls.append(kw))
    monkeypatch.setattr(operator_main.kopf, "configure", lambda **kw: None)
    monkeypatch.setattr(operator_main.metrics, "serve", lambda *a: None)
    assert cli.main(args) == 0
    (run,) = calls
    assert run["standalone"] is True
    assert (run["clusterwide"], run["namespaces"]) == (False, ["team-a"])
    assert run["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    assert run["memo"].ctx.resync_seconds == 30.0


def test_pod_security_is_restricted() -> None:
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}


def test_scheduling_values_reach_the_pod() -> None:
    pod = one(
        render(
            "nodeSelector.pool=system",
            "tolerations[0].key=dedicated",
            "tolerations[0].operator=Exists",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
            ".matchExpressions[0].key=zone",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
            ".matchExpressions[0].operator=Exists",
            "priorityClassName=system-cluster-critical",
            "image.tag=dev",
            "operator.extraArgs[0]=--debug",
        ),
        "Deployment",
    )["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["containers"][0]["image"].endswith(":dev")
    assert pod["containers"][0]["args"][-1] == "--debug"


def test_cluster_wide_rbac_is_exactly_what_the_operator_needs() -> None:
    objs = render()
    assert rules_of(one(objs, "ClusterRole", "lr-llavarun-operator")) == OPERATOR_RULES
    assert rules_of(one(objs, "ClusterRole", "lr-llavarun-operator-discovery")) == CRD_DISCOVERY
    binding = one(objs, "ClusterRoleBinding", "lr-llavarun-operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lr-llavarun-operator", "namespace": NAMESPACE}
    ]


@pytest.mark.parametrize("sets", [(), ("watchNamespace=team-a",)])
def test_no_secrets_and_no_wildcards(sets: tuple[str, ...]) -> None:
    for obj in render(*sets):
        if obj["kind"] in ("ClusterRole", "Role"):
            for group, resource, verb in rules_of(obj):
                assert "secrets" not in resource and "*" not in (group, resource, verb), obj["metadata"][
                    "name"
                ]


def test_watch_namespace_uses_a_role_there() -> None:
    objs = render("watchNamespace=team-a")
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    assert rules_of(role) == OPERATOR_RULES
    binding = one(objs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert [
        o["metadata"]["name"] for o in objs if o["kind"] == "ClusterRole" and "aggregate" not in str(o)
    ] == ["lr-llavarun-operator-discovery"]
    discovery = rules_of(one(objs, "ClusterRole", "lr-llavarun-operator-discovery"))
    assert discovery == CRD_DISCOVERY | {("", "namespaces", "list"), ("", "namespaces", "watch")}
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert operator_main.build_parser().parse_args(args[1:]).namespace == ["team-a"]


def test_users_get_llavaruns_through_the_default_roles() -> None:
    objs = render()
    view, edit = (
        one(objs, "ClusterRole", "lr-llavarun-operator-view"),
        one(objs, "ClusterRole", "lr-llavarun-operator-edit"),
    )
    for label in ("view", "edit", "admin"):
        assert view["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{label}"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert ("llavarun.io", "llavaruns", "create") in rules_of(edit)
    assert not [r for r in rules_of(edit) if r[1] == "llavaruns/status"]
    assert not [
        o
        for o in render("rbac.aggregateToDefaultRoles=false")
        if o["metadata"]["name"].endswith(("-view", "-edit"))
    ]


def test_replicas_zero_keeps_the_deployment_for_later() -> None:
    assert one(render("replicas=0"), "Deployment")["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    "bad", ["replicas=2", "operator.logFormat=xml", "unknownKey=1", "watchNamespace=Team_A"]
)
def test_values_schema_refuses(bad: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower(), proc.stderr


# --- the TrainJob backend --------------------------------------------------------------------------

TRAINJOB_ON = ("backends.trainJob.enabled=true",)
RUNTIME_CRD = SHARED / "crds" / "trainer.kubeflow.org_clustertrainingruntimes.yaml"


def test_trainjob_backend_adds_exactly_its_runtime_rbac_and_flags() -> None:
    objs = render(*TRAINJOB_ON, "backends.default=TrainJob")
    trainjobs = {
        ("trainer.kubeflow.org", "trainjobs", v)
        for v in ("create", "get", "list", "watch", "patch", "delete")
    }
    assert rules_of(one(objs, "ClusterRole", "lr-llavarun-operator")) == OPERATOR_RULES | trainjobs
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = operator_main.build_parser().parse_args(args[1:])
    assert (parsed.backend, parsed.training_runtime) == ("TrainJob", "llavarun-torch")
    assert operator_main.served_kinds(parsed.backend, parsed.backends) == ["TrainJob", "PyTorchJob"]
    default = operator_main.build_parser().parse_args(
        one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"][1:]
    )
    assert operator_main.served_kinds(default.backend, default.backends) == ["PyTorchJob"]
    assert not [o for o in render() if o["kind"] == "ClusterTrainingRuntime"]
    assert not [
        o
        for o in render(*TRAINJOB_ON, "backends.trainJob.runtime.create=false")
        if o["kind"] == "ClusterTrainingRuntime"
    ]


def test_trainer_v2_only_serves_and_grants_trainjobs_alone() -> None:
    """A cluster without the training-operator: no PyTorchJob watch, no PyTorchJob permissions."""
    objs = render(*TRAINJOB_ON, "backends.default=TrainJob", "backends.pyTorchJob.enabled=false")
    rules = rules_of(one(objs, "ClusterRole", "lr-llavarun-operator"))
    assert not [r for r in rules if r[1] == "pytorchjobs"] and [r for r in rules if r[1] == "trainjobs"]
    args = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = operator_main.build_parser().parse_args(args[1:])
    assert operator_main.served_kinds(parsed.backend, parsed.backends) == ["TrainJob"]


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (("backends.default=TrainJob",), "backends.default TrainJob needs backends.trainJob.enabled"),
        (
            ("backends.pyTorchJob.enabled=false",),
            "backends.default PyTorchJob needs backends.pyTorchJob.enabled",
        ),
    ],
)
def test_a_default_backend_that_is_not_enabled_is_refused(values: tuple[str, ...], said: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *(a for v in values for a in ("--set", v)), check=False)
    assert proc.returncode != 0 and said in proc.stderr


def test_training_runtime_is_valid_restricted_and_fails_fast() -> None:
    runtime = one(render(*TRAINJOB_ON), "ClusterTrainingRuntime", "llavarun-torch")
    schema = yaml.safe_load(RUNTIME_CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validators.validator_for(schema)(schema).validate(runtime)
    assert unknown_fields(runtime, schema) == []
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    [rjob] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert rjob["template"]["spec"]["backoffLimit"] == 0
    pod = rjob["template"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod["spec"]},
        K8S_VERSION,
        strict=True,
    )
    [container] = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
