"""The one line that says why a local attempt failed, read from its log as torchrun and the
trainer write it."""

from __future__ import annotations

from pathlib import Path

import pytest
from llava_operator.local.logs import describe_exit, failure_line

TORCHRUN_WORKER_FAILED = """\
$ python -m torch.distributed.run --standalone --nproc-per-node=2 -m llava_trainer pretrain
DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully
[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/main/trainer/llava_trainer/tokenizer.py", line 79, in vision_geometry
[rank0]:     config = json.loads(config_file.read_text())
[rank0]:              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
[rank0]:   File "/usr/lib/python3.11/json/decoder.py", line 355, in raw_decode
[rank0]:     raise JSONDecodeError("Expecting value", s, err.value) from None
[rank0]: json.decoder.JSONDecodeError: Expecting value: line 2 column 1 (char 12)
[rank1]: Traceback (most recent call last):
[rank1]:   File "/work/main/trainer/llava_trainer/tokenizer.py", line 79, in vision_geometry
[rank1]: json.decoder.JSONDecodeError: Expecting value: line 2 column 1 (char 12)
W1130 17:22:14.163000 30038 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 30146 closing signal SIGTERM
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
llava_trainer FAILED
"""
TRAINER_REFUSAL = """\
$ python -m llava_trainer prepare --data-dir /d
llava-trainer prepare: the data_dir layout is incomplete:
  missing /d/LLaVA-Pretrain/images: expected LLaVA-Pretrain images/<dir>/<id>.jpg
  missing /d/MMMU/MMMU: expected MMMU/MMMU/<Subject>/validation-*.parquet
"""
CHAINED = """\
Traceback (most recent call last):
  File "a.py", line 1, in <module>
KeyError: 'conversations'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "b.py", line 2, in <module>
ValueError: record 17 of /d/x.json has no 'conversations'
"""
ONLY_THE_LAUNCHER = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in launch_agent
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
exitcode  : -9 (pid: 4242)
"""


@pytest.mark.parametrize(
    ("log", "line"),
    [
        (TORCHRUN_WORKER_FAILED, "json.decoder.JSONDecodeError: Expecting value: line 2 column 1 (char 12)"),
        (
            TRAINER_REFUSAL,
            "llava-trainer prepare: the data_dir layout is incomplete: missing /d/LLaVA-Pretrain/images: "
            "expected LLaVA-Pretrain images/<dir>/<id>.jpg missing /d/MMMU/MMMU: expected "
            "MMMU/MMMU/<Subject>/validation-*.parquet",
        ),
        (CHAINED, "ValueError: record 17 of /d/x.json has no 'conversations'"),
        (ONLY_THE_LAUNCHER, None),
        ("$ python -m llava_trainer pretrain\nstep 1\n", None),
    ],
    ids=["torchrun worker", "trainer refusal", "chained", "launcher only", "killed silently"],
)
def test_the_failure_line_is_the_first_exception_a_process_raised(log: str, line: str | None) -> None:
    assert failure_line(log.splitlines(keepends=True)) == line


@pytest.mark.parametrize(
    ("code", "log", "expected"),
    [
        (
            1,
            TORCHRUN_WORKER_FAILED,
            "exited 1: json.decoder.JSONDecodeError: Expecting value: line 2 column 1",
        ),
        (-9, "", "killed by SIGKILL; log: "),
        (143, None, "exited 143; log: "),
    ],
)
def test_an_exit_is_described_with_its_error_and_log(
    code: int, log: str | None, expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "job.log"
    if log is not None:
        path.write_text(log)
    text = describe_exit(code, path)
    assert text.startswith(expected)
    assert text.endswith(f"; log: {path}")
