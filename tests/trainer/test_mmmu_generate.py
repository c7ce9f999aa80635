"""End to end: `llava-trainer evaluate` of a tiny random LLaVA checkpoint on synthetic MMMU data,
on 1 rank in-process and on 2 ranks under torchrun (gloo), which must give the same predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from llava_trainer.config import EvaluateConfig  # noqa: E402
from llava_trainer.evaluate.data import Question  # noqa: E402
from llava_trainer.evaluate.generate import (  # noqa: E402
    Answerer,
    GenerationSettings,
    Ranks,
    global_batches,
    rank_batches,
)
from llava_trainer.evaluate.run import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from mmmu_fixtures import build_tiny_llava, image_bytes, question_row, write_split  # noqa: E402

SUBJECTS = ["Art", "Music", "Physics"]
FLAGS = {"precision": "fp32", "batch_size": 2, "max_new_tokens": 6, "subjects": SUBJECTS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mmmu_e2e")
    build_tiny_llava(root / "model")
    mmmu = root / "MMMU" / "MMMU"
    cities = ["Paris", "London", "Berlin", "Madrid"]
    write_split(
        mmmu,
        "Art",
        "validation",
        [
            question_row("validation_Art_1", "<image 1> Which city is shown?", "B", cities),
            question_row(
                "validation_Art_2",
                "Compare <image 1> and <image 2>. Which is brighter?",
                "A",
                ["<image 1>", "<image 2>"],
                images={1: image_bytes((10, 10, 10)), 2: image_bytes((250, 250, 250), (30, 60), "JPEG")},
            ),
            question_row("validation_Art_3", "<image 1> How many cats?", "2"),
        ],
    )
    write_split(
        mmmu,
        "Music",
        "validation",
        [
            question_row(
                "validation_Music_1", "<image 1> Which city?", "C", cities, images={1: b"not an image"}
            ),
            question_row("validation_Music_2", "Which city?", "D", cities, images={1: None}),
        ],
    )
    write_split(
        mmmu,
        "Physics",
        "validation",
        [
            question_row(
                "validation_Physics_1",
                "<image 1> What is the area?",
                "12",
                images={1: image_bytes((0, 90, 0))},
            ),
            question_row("validation_Physics_2", "<image 1> Which city?", "A", cities),
        ],
    )
    return root


def _evaluate_in_process(data_dir: Path, out: Path, **flags) -> dict:
    """One rank, one thread: what each torchrun rank gets (torchrun sets OMP_NUM_THREADS=1)."""
    assert "WORLD_SIZE" not in os.environ
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = EvaluateConfig(data_dir=data_dir, model_path="model", output_dir=out, **{**FLAGS, **flags})
        assert run(config) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_two_ranks_give_exactly_the_predictions_of_one_rank(data_dir: Path):
    one = _evaluate_in_process(data_dir, data_dir / "out-1")
    status_file = data_dir / "status.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "llava_trainer", "evaluate", "--data-dir", str(data_dir), "--model-path", "model",
        "--output-dir", str(data_dir / "out-2"), "--precision", "fp32", "--batch-size", "2",
        "--max-new-tokens", "6", "--subjects", ",".join(SUBJECTS),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAVARUN_STATUS_FILE": str(status_file)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads((data_dir / "out-2" / "results.json").read_text())

    lines_one = (data_dir / "out-1" / "predictions.jsonl").read_text()
    assert lines_one == (data_dir / "out-2" / "predictions.jsonl").read_text()
    predictions = [json.loads(line) for line in lines_one.splitlines()]
    assert [p["id"] for p in predictions][:2] == ["validation_Art_1", "validation_Art_2"]
    assert len(predictions) == 7 and any(p["response"] for p in predictions)
    assert two["settings"]["world_size"] == 2 and one["settings"]["world_size"] == 1
    for key in ("overall", "disciplines", "subjects", "counts", "problems"):
        assert one[key] == two[key], key
    assert list(two["problems"]["image_errors"]) == ["validation_Music_1", "validation_Music_2"]
    assert "not a recognised image format" in two["problems"]["image_errors"]["validation_Music_1"]
    assert two["problems"]["generation_errors"] == {}
    if status_file.exists():  # the status reporter is wired: results land in status.results.evaluate
        reported = json.loads(status_file.read_text())["results"]["evaluate"]
        assert reported["overall"] == two["overall"]["percent"]
        assert reported["questions"] == 7


def test_all_referenced_images_can_be_passed(data_dir: Path):
    results = _evaluate_in_process(
        data_dir, data_dir / "out-referenced", images="referenced", subjects=["Art"]
    )
    assert results["settings"]["images"] == "referenced"
    assert results["counts"]["questions"] == 3
    assert results["problems"]["generation_errors"] == {} and results["problems"]["image_errors"] == {}


def _question(qid: str, text: str, images: dict[int, bytes]) -> Question:
    return Question(
        id=qid, subject="Art", question=text, options=[], answer="1", question_type="open", images=images
    )


def test_prompts_get_one_image_token_per_image_passed():
    answerer = Answerer.__new__(Answerer)  # only the prompt building, no model
    answerer.settings = GenerationSettings(images="referenced")
    both = {1: image_bytes(), 2: image_bytes()}
    questions = [_question("q1", "<image 1> vs <image 2>", both), _question("q2", "plain", {})]
    from llava_trainer.evaluate.data import Problems

    prompts, images = answerer._inputs(questions, Problems())
    assert prompts[0].count("<image>") == 2 and prompts[1].count("<image>") == 0
    assert len(images) == 2
    answerer.settings = GenerationSettings(images="first")
    prompts, images = answerer._inputs(questions, Problems())
    assert prompts[0].count("<image>") == 1 and len(images) == 1


def test_batches_are_the_same_for_any_world_size_and_each_goes_to_one_rank():
    questions = [_question(f"q{i}", "", {}) for i in range(7)]
    batches = global_batches(questions, 2)
    assert [[q.id for q in b] for b in batches] == [["q0", "q1"], ["q2", "q3"], ["q4", "q5"], ["q6"]]
    shares = [rank_batches(batches, Ranks(rank=r, world_size=3)) for r in range(3)]
    assert [[i for i, _ in share] for share in shares] == [[0, 3], [1], [2]]
