"""`llavarun plan --data-dir`: sizes from the checkpoints, lengths from prepare's real index."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from llava_operator import yamlio
from llava_operator.api import Stage
from llava_operator.cli import main
from llava_operator.trainer_command import stage_config
from llava_operator.validate import load_run

pytestmark = pytest.mark.trainer

TINY = Path(__file__).resolve().parents[2] / "examples" / "llavarun-tiny.yaml"


def plan(capsys, data_dir: Path) -> dict:
    main(["plan", str(TINY), "--data-dir", str(data_dir), "--device", "H100", "--json"])
    return json.loads(capsys.readouterr().out)


def test_lengths_come_from_prepares_index_as_the_loader_keeps_them(data_dir_copy, capsys):
    from llava_trainer.data.formats import JsonRecords
    from llava_trainer.data.index import load_index
    from llava_trainer.data.loader import _excluded
    from llava_trainer.prepare import prepare
    from llava_trainer.tokenizer import (
        image_token_count,
        load_tokenizer,
        tokenizer_fingerprint,
        vision_geometry,
    )

    before = plan(capsys, data_dir_copy)
    assert before["stages"]["pretrain"]["lengthsFrom"].startswith("the recipe's")
    assert before["model"] == "vicuna-13b-v1.5 + clip-vit-large-patch14-336"  # the paths' names ...
    assert before["stages"]["finetune"]["memoryGiB"]["parameters"] < 0.01  # ... but synth's tiny sizes

    run = load_run(yamlio.load_documents(TINY)[0])
    prepare(stage_config(run.spec, Stage.PREPARE, data_dir_override=str(data_dir_copy)))
    after = plan(capsys, data_dir_copy)
    for stage in (Stage.PRETRAIN, Stage.FINETUNE):
        config = stage_config(run.spec, stage, data_dir_override=str(data_dir_copy))
        tokenizer = load_tokenizer(config.resolve(config.language_model))
        data = config.resolve(config.data_path)
        index, why = load_index(
            config.index_path,
            data,
            template=config.template,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        )
        assert index is not None, why
        image_tokens = image_token_count(*vision_geometry(config.resolve(config.vision_tower)))
        excluded, _ = _excluded(
            index,
            JsonRecords(data, index.offset, index.nbytes),
            num_image_tokens=image_tokens,
            max_length=config.max_length,
            bad_images=config.bad_images,
        )
        lengths = np.minimum(index.lengths(image_tokens), config.max_length)[~excluded]
        kept = Counter(zip(lengths.tolist(), index.num_images[~excluded].tolist(), strict=True))
        planned = after["stages"][stage.value]
        assert planned["lengthsFrom"].startswith("prepare's index")
        assert planned["samples"] == config.epochs * sum(kept.values())
        mean = sum(t * n for (t, _), n in kept.items()) / sum(kept.values())
        assert planned["meanTokens"] == pytest.approx(mean, abs=0.05)
        assert planned["sequenceLength"] == max(t for t, _ in kept)
