"""LlavaRun files are read strictly and safely: every bad file ends as one located message and
exit code 1 (never a traceback, a hang or a silent win of one value over another), and values
are typed the way kubectl types them for the apiserver."""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from llava_operator.cli import main
from llava_operator.yamlio import MAX_BYTES, dump, parse_documents

VALID = """\
apiVersion: llavarun.io/v1alpha1
kind: LlavaRun
metadata:
  name: good-run
spec:
  image: ghcr.io/llavarun/llava-trainer:0.1.0
  storage:
    data:
      source:
        emptyDir: {}
"""
VALID_LINES = VALID.count("\n")

# (case, file content, expected exit code, expected fragment of the output).
CASES: list[tuple[str, str | bytes, int, str]] = [
    ("not-yaml", VALID + "  retries: a: b\n", 1, f"run.yaml:{VALID_LINES + 1}:13: not YAML: mapping values"),
    ("unclosed-flow", VALID + "  stages: [prepare\n", 1, "not YAML: expected ',' or ']'"),
    ("empty-file", "", 1, "run.yaml: no YAML documents"),
    ("only-comments", "# nothing here\n---\n", 1, "run.yaml: no YAML documents"),
    ("alias", VALID + "  retries: &r 1\n  suspend: *r\n", 1, "alias *r refused"),
    ("merge-key", VALID + "  placement:\n    <<: {queueName: q}\n", 1, "merge keys (<<) are not accepted"),
    (
        "duplicate-key",
        VALID + "  pretrain:\n    epochs: 1\n  pretrain:\n    epochs: 2\n",
        1,
        f"run.yaml:{VALID_LINES + 3}:3: duplicate key 'pretrain' (first at line {VALID_LINES + 1})",
    ),
    (
        "duplicate-name",
        VALID + "---\n" + VALID,
        1,
        "metadata.name: 'good-run' is already used by the document at line 1",
    ),
    (
        "non-utf8",
        VALID.encode() + b"  serviceAccountName: caf\xe9\n",
        1,
        f"run.yaml:{VALID_LINES + 1}:26: not UTF-8 text",
    ),
    (
        "control-character",
        VALID + "  serviceAccountName: a\x00b\n",
        1,
        f"run.yaml:{VALID_LINES + 1}:24: not YAML",
    ),
    ("binary-tag", VALID + "  serviceAccountName: !!binary aGk=\n", 1, "tag !!binary is not accepted"),
    ("not-a-number", VALID + "  pretrain:\n    learningRate: .nan\n", 1, ".nan is not a finite number"),
    ("non-string-key", VALID + "  ? [a]\n  : b\n", 1, "mapping keys must be strings"),
    ("too-deep", VALID + "  affinity: " + "[" * 80 + "]" * 80 + "\n", 1, "nested deeper than 64 levels"),
    ("huge-integer", VALID + "  retries: " + "9" * 5000 + "\n", 1, "an integer of 5000 digits is too large"),
    (
        "seed-beyond-int64",
        VALID + "  pretrain:\n    seed: 1180591620717411303424\n",
        1,
        "spec.pretrain.seed: Input should be less than or equal to 4294967295",
    ),
    (
        "max-steps-1e30",
        VALID + "  pretrain:\n    maxSteps: 1e30\n",
        1,
        "spec.pretrain.maxSteps: Input should be a valid integer (got 1e+30)",
    ),
    ("learning-rate-2e-3", VALID + "  pretrain:\n    learningRate: 2e-3\n", 0, "LlavaRun good-run is valid"),
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(("case", "content", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_validate_answers_each_file_with_one_located_message(tmp_path, capsys, case, content, code, fragment):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    got_code, output = run_cli(["validate", str(path)], capsys)
    assert (got_code, "Traceback" in output) == (code, False), output
    assert fragment in output


# render and local read files as validate does. Left out: local takes exactly one document, so it
# answers two with its own message; render's empty-file answer is unchanged and covered above.
NOT_SHARED = {("local", "duplicate-name"), ("render", "empty-file"), ("render", "only-comments")}
SHARED = [
    (command, *case)
    for command in ("render", "local")
    for case in CASES
    if case[2] == 1 and (command, case[0]) not in NOT_SHARED
]


@pytest.mark.parametrize(
    ("command", "case", "content", "code", "fragment"), SHARED, ids=[f"{c[0]}-{c[1]}" for c in SHARED]
)
def test_render_and_local_refuse_the_same_files(tmp_path, capsys, command, case, content, code, fragment):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    extra = ["--data-dir", str(tmp_path)] if command == "local" else []
    got_code, output = run_cli([command, str(path), *extra], capsys)
    assert (got_code, "Traceback" in output) == (1, False), output
    assert output.startswith(f"llavarun {command}: ") and fragment in output


def test_validate_checks_the_remaining_files_after_an_unreadable_one(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    code, output = run_cli(["validate", str(tmp_path / "missing.yaml"), str(good)], capsys)
    assert code == 1
    assert "missing.yaml: cannot read: No such file or directory" in output
    assert "good.yaml:1: LlavaRun good-run is valid" in output


def test_stdin_is_read_like_a_file(monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(VALID.encode() + b"  image: caf\xe9\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, output = run_cli(["render", "-"], capsys)
    assert code == 1 and f"<stdin>:{VALID_LINES + 1}:13: not UTF-8 text" in output


def test_file_larger_than_the_apiserver_accepts_is_refused(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(VALID + "#" * MAX_BYTES + "\n")
    code, output = run_cli(["validate", str(path)], capsys)
    assert code == 1 and "run.yaml: larger than 3 MiB" in output


def test_render_types_2e_3_as_the_number_kubectl_sends(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(VALID + "  stages: [pretrain]\n  pretrain:\n    learningRate: 2e-3\n")
    code, output = run_cli(["render", str(path)], capsys)
    assert code == 0
    (job,) = [d.data for d in parse_documents(output) if d.data["kind"] == "PyTorchJob"]
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--learning-rate") + 1] == "0.002"


# Unquoted scalars as kubectl (go-yaml v2 in sigs.k8s.io/yaml) types them, where PyYAML's YAML 1.1
# rules differ.
KUBECTL_TYPING = [
    ("2e-3", 0.002),
    ("1e30", 1e30),
    ("1.5e3", 1500.0),
    ("y", True),
    ("0o17", 15),
    ("08", 8.0),
    ("1:30", "1:30"),
    ("2024-01-01", "2024-01-01"),
]


@pytest.mark.parametrize(("text", "value"), KUBECTL_TYPING, ids=[t for t, _ in KUBECTL_TYPING])
def test_unquoted_scalar_is_typed_as_kubectl_types_it(text, value):
    (document,) = parse_documents(f"v: {text}\n")
    assert document.data == {"v": value}
    assert type(document.data["v"]) is type(value)


@pytest.mark.parametrize("text", [t for t, v in KUBECTL_TYPING if not isinstance(v, str)])
def test_dump_quotes_a_string_kubectl_would_retype(text):
    assert dump({"v": text}) == f"v: '{text}'\n"


def billion_laughs(levels: int = 9) -> str:
    """About 2 KB of nested anchors that expand to 9**9 (~390 million) strings."""
    lines = [VALID.rstrip("\n"), "  placement:", "    podAnnotations:", '      l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']  # fmt: skip
    for level in range(1, levels):
        refs = ",".join([f"*l{level - 1}"] * 9)
        lines.append(f"      l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


def _limit_memory() -> None:
    one_gib = 2**30
    resource.setrlimit(resource.RLIMIT_AS, (2 * one_gib, 2 * one_gib))


@pytest.mark.parametrize("command", ["validate", "render"])
def test_alias_bomb_is_refused_at_once_within_bounded_memory(tmp_path: Path, command: str):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size < 2500
    result = subprocess.run(
        [sys.executable, "-m", "llava_operator.cli", command, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"bomb.yaml:{VALID_LINES + 4}:16: alias *l0 refused" in result.stderr
