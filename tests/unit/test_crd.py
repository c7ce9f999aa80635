"""The committed CRD is exactly what the API models generate, and it is structural."""

from __future__ import annotations

from llava_operator.api.crd import generate_crd
from llava_operator.yamlio import dump

from tests.helpers import ROOT, load_yaml


def test_committed_crd_matches_generated():
    committed = (ROOT / "crds" / "llavarun.yaml").read_text()
    assert committed == dump(generate_crd()), (
        "crds/llavarun.yaml is stale: run `llavarun crd > crds/llavarun.yaml`"
    )


def _walk(node, path="$"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    schema = generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "const"} & node.keys(), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, False), bool), path


def test_crd_names_and_columns():
    crd = load_yaml(ROOT / "crds" / "llavarun.yaml")
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"]) == ("llavarun.io", "LlavaRun", "llavaruns")
    assert names["shortNames"] == ["lrun"] and names["categories"] == ["llava"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    default_columns = [name for name, c in columns.items() if not c.get("priority")]
    # The phase, the ETA and why it waits or failed, as `kubectl get pods` shows STATUS.
    assert default_columns == ["Stage", "Phase", "Progress", "ETA", "Reason", "Age"]
    assert [columns[n]["jsonPath"] for n in ("Phase", "ETA", "Reason")] == [
        ".status.phase",
        ".status.eta",
        ".status.reason",
    ]
    assert columns["ETA"]["type"] == "string", "a date column prints a time in the future as <invalid>"
    assert {"Loss", "MMMU", "Job", "MFU%"} <= {n for n, c in columns.items() if c.get("priority") == 1}


def test_recipe_defaults_are_in_the_schema():
    spec = generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pretrain = spec["properties"]["pretrain"]["properties"]
    finetune = spec["properties"]["finetune"]["properties"]
    assert pretrain["learningRate"]["default"] == 1e-3 and pretrain["globalBatchSize"]["default"] == 256
    assert pretrain["zeroStage"]["default"] == 2 and "template" not in pretrain  # fixed per stage
    assert finetune["learningRate"]["default"] == 2e-5 and finetune["globalBatchSize"]["default"] == 128
    assert finetune["zeroStage"]["default"] == 3 and finetune["imageAspectRatio"]["default"] == "pad"
    assert spec["properties"]["stages"]["default"] == ["prepare", "pretrain", "finetune", "evaluate"]
    # Nested objects default to their fields' defaults written out (the apiserver checks CEL
    # rules against a default as written).
    assert spec["properties"]["pretrain"]["default"]["globalBatchSize"] == 256
    assert spec["properties"]["pretrain"]["default"]["resources"] == {
        "nodes": 1,
        "gpusPerNode": 8,
        "shmSize": "32Gi",
    }
    assert spec["properties"]["pretrain"]["properties"]["resources"]["default"]["gpusPerNode"] == 8


def test_every_status_writer_field_is_declared():
    status = generate_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    props = status["properties"]
    assert {
        "phase",
        "reason",
        "stage",
        "stages",
        "conditions",
        "observedGeneration",
        "plan",
        "eta",
        "progress",
        "results",
    } <= props.keys()
    assert {"reason", "message"} <= props["stages"]["properties"]["prepare"]["properties"].keys()
    plan = props["plan"]["properties"]
    assert {"generation", "device", "fits", "seconds", "gpuHours", "unavailable"} <= plan.keys()
    assert {"seconds", "gpuHours", "fits", "memoryGib", "fix"} <= (
        plan["stages"]["properties"]["finetune"]["properties"].keys()
    )
    progress = props["progress"]["properties"]
    assert {"step", "totalSteps", "loss", "samplesPerSecond", "tokensPerSecond", "mfu", "mfuFlagperf"} <= (
        progress.keys()
    )
    assert props["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_configuration_reference_is_current():
    from llava_operator.api.reference import render_reference

    committed = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    assert committed == render_reference(), "run `llavarun crd --reference > docs/CONFIGURATION.md`"
