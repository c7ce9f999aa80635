"""`llava-trainer evaluate`: MMMU accuracy of the finetuned checkpoint, or of a responses file.

    llava-trainer evaluate --data-dir D                       # generate with D/Output/checkpoints_finetune/model
    torchrun --nproc-per-node 8 -m llava_trainer evaluate --data-dir D     # the same, sharded over 8 ranks
    llava-trainer evaluate --data-dir D --responses out.json  # score {question_id: response}, no model

Rank 0 writes results.json, predictions.jsonl, responses.json and summary.md into the stage output
directory and reports overall and per-discipline accuracy into the LlavaRun status.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_trainer.config import EvaluateConfig

from .data import Problems, Question, load_questions
from .report import write_outputs
from .score import Prediction, accuracy_table, judge_all

if TYPE_CHECKING:
    from .generate import Answers

log = logging.getLogger("llava_trainer.evaluate")

PROTOCOL = "MMMU official (MMMU-Benchmark/MMMU llava1.5 prompts and answer parsing), vicuna_v1 template"


def run(config: EvaluateConfig) -> int:
    """The stage command; returns the process exit code (2: nothing could be evaluated)."""
    started = time.monotonic()
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    reporter = _status_reporter() if rank == 0 else None
    mmmu_dir = config.resolve(config.mmmu_dir)
    assert mmmu_dir is not None
    try:
        questions, problems = load_questions(mmmu_dir, config.split, config.subjects)
    except FileNotFoundError as err:
        log.error("%s", err)
        return 2
    if rank == 0:
        for line in problems.summary_lines():
            log.warning("MMMU %s: %s", config.split, line)
    if not questions:
        log.error(
            "no MMMU %s questions under %s for subjects %s: nothing to evaluate",
            config.split,
            mmmu_dir,
            ", ".join(config.subjects) or "all",
        )
        return 2
    log.info("MMMU %s: %d questions from %s", config.split, len(questions), mmmu_dir)

    source: dict[str, Any]
    world_size = 1
    if config.responses is not None:
        path = config.resolve(config.responses)
        assert path is not None
        try:
            responses = read_responses(path, questions, problems)
        except (OSError, ValueError) as err:
            log.error("cannot score the responses file %s: %s", path, err)
            return 2
        source = {"model": None, "responses_file": str(path)}
    else:
        generated = _generate(config, questions, reporter)
        if generated is None:
            return 2
        answers, world_size = generated
        if answers is None:
            return 0  # not rank 0: only rank 0 scores and writes
        responses = answers.responses
        order = {q.id: i for i, q in enumerate(questions)}  # ranks report in any order; files stay stable
        problems.image_errors = dict(sorted(answers.image_errors.items(), key=lambda kv: order[kv[0]]))
        problems.generation_errors = dict(sorted(answers.errors.items(), key=lambda kv: order[kv[0]]))
        source = {"model": str(config.model_dir), "responses_file": None}

    predictions, problems.missing_responses = judge_all(questions, responses, config.seed)
    results = build_results(config, questions, predictions, problems, source, world_size)
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    paths = write_outputs(config.stage_output, results, predictions)
    _log_results(results, paths["results"])
    _report_status(reporter, results, paths["results"])
    return 0


def _generate(
    config: EvaluateConfig, questions: list[Question], reporter: Any
) -> tuple[Answers | None, int] | None:
    """Answer all questions with the model, sharded over the ranks: (answers on rank 0 / None on the
    others, world size), or None when there is no model to load."""
    from ..prepare import llava_model_problems

    model_dir = config.model_dir
    # A merged LoRA export or a task-finetuned model is a whole LLaVA directory; an adapter is not.
    found = llava_model_problems(model_dir, field="spec.evaluate.modelPath, --model-path")
    if found:
        for problem in found:
            log.error("%s", problem)
        log.error(
            "nothing to evaluate: run the finetune stage first, pass --model-path, or score an existing "
            "responses file with --responses"
        )
        return None
    import torch.distributed as dist

    from .generate import GenerationSettings, answer_all, init_distributed

    ranks = init_distributed()
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        do_sample=config.do_sample,
        temperature=config.temperature,
        seed=config.seed,
        images=config.images,
    )
    log.info(
        "answering with %s on %s (rank %d of %d, batch size %d, %s)",
        model_dir,
        ranks.device,
        ranks.rank,
        ranks.world_size,
        config.batch_size,
        settings,
    )
    try:
        answers = answer_all(
            questions,
            model_dir,
            config.precision,
            config.batch_size,
            settings,
            ranks,
            on_progress=_progress_logger(reporter) if ranks.is_main else None,
        )
    finally:
        if ranks.owns_group and dist.is_initialized():  # never a group someone else made
            dist.destroy_process_group()
    return answers, ranks.world_size


def read_responses(path: Path, questions: list[Question], problems: Problems) -> dict[str, str]:
    """{question_id: response} from an official-format output file; oddities go to `problems`.

    Raises ValueError when nothing in the file can be scored: a file for another split or subject
    set would otherwise give an accuracy of null and look like a finished evaluation.
    """
    if not path.is_file():
        raise ValueError(f"no such file (relative paths are relative to --data-dir): {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object {{question_id: response}}, got a {type(raw).__name__}")
    known = {q.id for q in questions}
    responses = {}
    for qid, response in raw.items():
        if qid not in known:
            problems.unknown_response_ids.append(qid)
        elif isinstance(response, str):
            responses[qid] = response
        else:
            problems.invalid_responses.append(qid)
    if not responses:
        raise ValueError(_nothing_to_score(raw, questions, problems))
    return responses


def _nothing_to_score(raw: dict[str, Any], questions: list[Question], problems: Problems) -> str:
    """Why a responses file scores nothing, and what to check."""
    if not raw:
        return "it holds no responses ({}): nothing to score"
    if problems.invalid_responses:
        qid = problems.invalid_responses[0]
        return (
            f"none of the {len(problems.invalid_responses)} responses whose ids match a question is a "
            f"string (e.g. {qid!r}: {raw[qid]!r}); each value must be the response text"
        )
    return (
        f"none of its {len(raw)} ids matches a loaded question (e.g. {next(iter(raw))!r}; the "
        f"questions' ids look like {questions[0].id!r}): check --split and --subjects"
    )


def build_results(
    config: EvaluateConfig,
    questions: list[Question],
    predictions: list[Prediction],
    problems: Problems,
    source: dict[str, Any],
    world_size: int = 1,
) -> dict[str, Any]:
    """results.json: accuracies, counts, problems and the settings that produced them."""
    table = accuracy_table(predictions)
    settings: dict[str, Any] = {"protocol": PROTOCOL, "split": config.split, "seed": config.seed}
    if source.get("model"):
        settings.update(
            images=config.images,
            max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams,
            do_sample=config.do_sample,
            temperature=config.temperature,
            batch_size=config.batch_size,
            precision=config.precision,
            world_size=world_size,
        )
    return {
        "benchmark": "MMMU",
        "split": config.split,
        **source,
        **table,
        "counts": {
            "questions": len(questions),
            "multiple_choice": sum(q.is_multiple_choice for q in questions),
            "open": sum(not q.is_multiple_choice for q in questions),
            "responses": len(predictions),
            "scored": table["overall"]["questions"],
            "unanswered": len(problems.unanswered),
            "missing_responses": len(problems.missing_responses),
            "unmatched_responses": len(problems.unknown_response_ids),
            "random_fallbacks": sum(p.parse_rule == "random" for p in predictions),
            "image_errors": len(problems.image_errors),
            "generation_errors": len(problems.generation_errors),
        },
        "problems": problems.as_dict(),
        "problem_summary": problems.summary_lines(),
        "settings": settings,
    }


def status_results(results: dict[str, Any], results_file: Path) -> dict[str, Any]:
    """The LlavaRun `status.results.evaluate` fields (EvaluateResults), accuracies in percent."""
    return {
        "split": results["split"],
        "questions": results["overall"]["questions"],
        "overall": results["overall"]["percent"],
        "disciplines": {
            name: group["percent"]
            for name, group in results["disciplines"].items()
            if group["percent"] is not None
        },
        "results_file": str(results_file),
        "duration_seconds": results.get("duration_seconds"),
    }


def _status_reporter() -> Any:
    """The trainer's StatusReporter, or None where it is unavailable (never fatal)."""
    try:
        from llava_trainer.status import StatusReporter
    except ImportError:
        return None
    try:
        return StatusReporter.from_env()
    except Exception as err:
        log.warning("status reporting disabled: %s", err)
        return None


def _progress_logger(reporter: Any):
    """Log (and report to the status) about every 10% of rank 0's batches."""
    last_decile = -1

    def on_progress(done: int, total: int, seconds: float) -> None:
        nonlocal last_decile
        decile = 10 * done // max(total, 1)
        if decile == last_decile and done != total:
            return
        last_decile = decile
        eta = seconds / done * (total - done)
        log.info("rank 0: %d/%d batches, %.0f s, ETA %.0f s", done, total, seconds, eta)
        if reporter is not None:
            reporter.progress(
                stage="evaluate",
                step=done,
                total_steps=total,
                percent=int(100 * done / max(total, 1)),
                eta_seconds=int(eta),
            )

    return on_progress


def _report_status(reporter: Any, results: dict[str, Any], results_file: Path) -> None:
    if reporter is None:
        return
    try:
        reporter.flush()  # the last progress update may still be held back by the throttle
        reporter.results("evaluate", status_results(results, results_file))
    except Exception as err:  # the results are on disk; a status hiccup must not fail the stage
        log.warning("could not report the MMMU results to the LlavaRun status: %s", err)


def _log_results(results: dict[str, Any], results_file: Path) -> None:
    overall = results["overall"]
    if overall["percent"] is None:
        log.info("MMMU %s: no question could be scored (no answers in this split?)", results["split"])
    else:
        log.info(
            "MMMU %s accuracy: %.2f%% (%d/%d)",
            results["split"],
            overall["percent"],
            overall["correct"],
            overall["questions"],
        )
    for name, group in results["disciplines"].items():
        if group["percent"] is not None:
            log.info("  %-30s %6.2f%% (%d/%d)", name, group["percent"], group["correct"], group["questions"])
    for line in results["problem_summary"]:
        log.warning("%s", line)
    log.info("results written to %s", results_file.parent)


def _setup_logging(rank: int) -> None:
    """Timestamped lines tagged with the rank, unless the caller configured logging already."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
