"""The status reporter writes only declared LlavaRun status fields, throttled, to the right place."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from llava_operator.api.status import LlavaRunStatus, timestamp
from llava_operator.apiserver import ApiError
from llava_trainer.status import FileSink, KubernetesSink, StatusReporter, TrainerStatusSink, trainer_status

pytestmark = pytest.mark.trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    min_interval = 10.0

    def __init__(self) -> None:
        self.patches: list[dict] = []

    def write(self, status_patch: dict) -> None:
        self.patches.append(json.loads(json.dumps(status_patch)))


def test_progress_is_camel_case_and_keeps_only_declared_fields(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    reporter = StatusReporter([FileSink(path)], stage="pretrain", attempt=2)

    reporter.progress(step=3, total_steps=10, samples_per_second=1.5, mfu_flagperf=12.0, bogus=1, percent=900)

    progress = json.loads(path.read_text())["progress"]
    assert progress["stage"] == "pretrain"
    assert progress["attempt"] == 2
    assert progress["totalSteps"] == 10
    assert progress["samplesPerSecond"] == 1.5
    assert progress["mfuFlagperf"] == 12.0
    assert "bogus" not in progress
    assert "percent" not in progress  # out of range (le=100): dropped, not written
    LlavaRunStatus.model_validate(json.loads(path.read_text()))


def test_progress_is_throttled_and_flush_writes_the_last_update() -> None:
    clock, sink = FakeClock(), RecordingSink()
    reporter = StatusReporter([sink], stage="finetune", clock=clock)

    reporter.progress(step=1)
    clock.now += 3
    reporter.progress(step=2)
    clock.now += 3
    reporter.progress(step=3, loss=1.25)
    assert [p["progress"]["step"] for p in sink.patches] == [1]

    clock.now += 10
    reporter.progress(step=4)
    assert [p["progress"]["step"] for p in sink.patches] == [1, 4]
    assert sink.patches[1]["progress"]["loss"] == 1.25  # merged from a throttled update

    reporter.progress(step=5)
    reporter.flush()
    assert [p["progress"]["step"] for p in sink.patches] == [1, 4, 5]
    reporter.flush()
    assert len(sink.patches) == 3  # nothing pending, nothing written


def test_first_progress_of_a_stage_clears_the_previous_stages_fields(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    previous = StatusReporter([FileSink(path)], stage="pretrain")
    previous.progress(step=7, loss=2.0, mfu=40.0)
    previous.results("pretrain", {"steps": 7})

    StatusReporter([FileSink(path)], stage="finetune").progress(step=1)

    status = json.loads(path.read_text())
    assert status["progress"]["stage"] == "finetune"
    assert status["progress"]["step"] == 1
    assert "loss" not in status["progress"]
    assert "mfu" not in status["progress"]
    assert status["results"]["pretrain"] == {"steps": 7}  # results of earlier stages stay


def test_results_are_written_at_once_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"phase": "Running", "results": {"prepare": {"missingImages": 0}}}))
    reporter = StatusReporter([FileSink(path)])

    reporter.results("pretrain", {"checkpoint": "/out/model", "final_loss": 2.1, "tokens": 5, "mfu": "x"})
    reporter.results("nonsense", {"steps": 1})

    status = json.loads(path.read_text())
    assert status["phase"] == "Running"  # the operator's fields are untouched
    assert status["results"]["prepare"] == {"missingImages": 0}
    assert status["results"]["pretrain"] == {"checkpoint": "/out/model", "finalLoss": 2.1}
    assert "nonsense" not in status["results"]
    LlavaRunStatus.model_validate(status)


def test_results_bypass_the_progress_throttle() -> None:
    clock, sink = FakeClock(), RecordingSink()
    reporter = StatusReporter([sink], clock=clock)
    reporter.progress(step=1)
    reporter.results("finetune", {"steps": 1})
    assert sink.patches[-1]["results"] == {"finetune": {"steps": 1}}


def test_from_env_picks_the_file_and_is_a_no_op_off_rank_zero(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    env = {"LLAVARUN_STATUS_FILE": str(path), "LLAVARUN_STAGE": "pretrain", "LLAVARUN_ATTEMPT": "1"}

    reporter = StatusReporter.from_env(env)
    assert reporter.enabled
    reporter.progress(step=1)
    assert json.loads(path.read_text())["progress"]["attempt"] == 1

    assert not StatusReporter.from_env({**env, "RANK": "1"}).enabled
    assert not StatusReporter.from_env({}).enabled
    StatusReporter.from_env({}).progress(step=1)  # no sink: nothing happens, nothing raises


def test_a_failing_sink_does_not_raise_and_retries_later() -> None:
    clock = FakeClock()

    class Flaky(RecordingSink):
        fail = True

        def write(self, status_patch: dict) -> None:
            if self.fail:
                raise ConnectionError("apiserver down")
            super().write(status_patch)

    sink = Flaky()
    reporter = StatusReporter([sink], clock=clock)
    reporter.progress(step=1)
    sink.fail = False
    reporter.progress(step=2)  # throttled: the failure counted as an attempt
    assert sink.patches == []
    reporter.flush()
    assert sink.patches[0]["progress"]["step"] == 2


_PATCHED = (200, {"apiVersion": "llavarun.io/v1alpha1", "kind": "LlavaRun"})


class _ApiServer(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str, dict]] = []
    answer: tuple[int, dict] = _PATCHED

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.command, self.path, self.headers["Content-Type"], body))
        code, answer = type(self).answer
        payload = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_apiserver(tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), _ApiServer)
    _ApiServer.requests = []
    _ApiServer.answer = _PATCHED
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    yield kubeconfig
    server.shutdown()


def test_kubeconfig_env_patches_the_status_subresource_of_this_run_only(fake_apiserver: Path) -> None:
    env = {
        "LLAVARUN_NAME": "demo",
        "LLAVARUN_NAMESPACE": "team-a",
        "LLAVARUN_KUBECONFIG": str(fake_apiserver),
        "LLAVARUN_STAGE": "pretrain",
    }
    reporter = StatusReporter.from_env(env)
    assert isinstance(reporter.sinks[0], KubernetesSink)

    reporter.progress(step=2, tokens_per_second=10.0)
    reporter.results("pretrain", {"steps": 2})

    (method, path, content_type, body), (_, _, _, results) = _ApiServer.requests
    assert method == "PATCH"
    assert path == "/apis/llavarun.io/v1alpha1/namespaces/team-a/llavaruns/demo/status"
    assert content_type == "application/merge-patch+json"
    assert set(body) == {"status"} and set(body["status"]) == {"progress"}
    assert body["status"]["progress"]["tokensPerSecond"] == 10.0
    assert body["status"]["progress"]["loss"] is None  # first write of the stage clears stale fields
    assert results == {"status": {"results": {"pretrain": {"steps": 2}}}}


def test_a_refused_patch_is_the_operators_api_error_and_is_sent_again_later(
    fake_apiserver: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forbidden = (
        'llavaruns.llavarun.io "demo" is forbidden: User "system:serviceaccount:team-a:x" cannot patch'
    )
    _ApiServer.answer = (403, {"kind": "Status", "status": "Failure", "message": forbidden, "code": 403})
    sink = KubernetesSink.connect("demo", "team-a", str(fake_apiserver))
    with pytest.raises(ApiError) as refused:
        sink.write({"progress": {"step": 1}})
    assert (refused.value.status, refused.value.message) == (403, forbidden)

    reporter = StatusReporter([sink], clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="llava_trainer.status"):
        reporter.progress(step=2)
    assert f"403 {forbidden}" in caplog.text
    _ApiServer.answer = _PATCHED
    reporter.flush()
    assert _ApiServer.requests[-1][3]["status"]["progress"]["step"] == 2


def test_times_are_written_as_the_operator_writes_them(tmp_path: Path) -> None:
    two_hours_east = timezone(timedelta(hours=2))
    assert timestamp(datetime(2024, 5, 6, 7, 8, 9, 999_999, tzinfo=two_hours_east)) == "2024-05-06T05:08:09Z"

    path = tmp_path / "status.json"
    before = timestamp()
    StatusReporter([FileSink(path)]).progress(step=1)
    written = json.loads(path.read_text())["progress"]["lastUpdate"]
    assert before <= written <= timestamp()
    assert timestamp(datetime.fromisoformat(written)) == written


# --- Kubeflow Trainer v2's trainerStatus --------------------------------------------------------


def test_trainer_status_maps_progress_and_adds_the_stages_result_numbers() -> None:
    status = {
        "progress": {"stage": "finetune", "attempt": 1, "step": 50, "totalSteps": 200, "percent": 25,
                     "loss": 1.2345678, "samplesPerSecond": 12.5, "etaSeconds": 3600, "mfu": 41.0,
                     "lastUpdate": "2026-11-30T12:00:00Z", "gpuMemoryGib": None},
        "results": {"finetune": {"finalLoss": 0.9, "samplesPerSecond": 11.0, "checkpoint": "/data/x"},
                    "pretrain": {"finalLoss": 2.0}},
    }  # fmt: skip
    out = trainer_status(status)
    assert (out["progressPercentage"], out["estimatedRemainingSeconds"]) == (25, 3600)
    assert out["lastUpdatedTime"] == "2026-11-30T12:00:00Z"
    assert {m["name"]: m["value"] for m in out["metrics"]} == {
        "step": "50", "totalSteps": "200", "loss": "1.23457", "samplesPerSecond": "12.5", "mfu": "41",
        "finalLoss": "0.9",  # this stage's result; the progress keeps samplesPerSecond; no strings
    }  # fmt: skip
    assert trainer_status({}) == {"metrics": []}


def test_trainer_status_sink_needs_the_whole_injected_environment() -> None:
    url = {"KUBEFLOW_TRAINER_SERVER_URL": "https://trainer.svc:10443/apis/trainer.kubeflow.org/v1alpha1/x"}
    assert TrainerStatusSink.from_env({}) is None
    assert TrainerStatusSink.from_env(url) is None  # no CA and token: said once, not reported there
    env = {**url, "KUBEFLOW_TRAINER_SERVER_CA_CERT": "/ca.crt", "KUBEFLOW_TRAINER_SERVER_TOKEN": "/token"}
    reporter = StatusReporter.from_env({**env, "RANK": "0"})
    assert [type(s) for s in reporter.sinks] == [TrainerStatusSink]
    assert StatusReporter.from_env({**env, "RANK": "3"}).sinks == []
