"""Readers of the real formats: LLaVA JSON arrays by offset, records, MMMU parquet."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from llava_trainer.data.formats import (
    JsonRecords,
    MalformedRecord,
    image_file,
    iter_json_array,
    mmmu_files,
    parse_options,
    parse_record,
    read_mmmu,
    record_source,
)

RECORDS = [
    {
        "id": "1",
        "image": "coco/train2017/000000000001.jpg",
        "conversations": [{"from": "human", "value": "<image>\nhi"}],
    },
    {"id": "2", "conversations": [{"from": "human", "value": "café ☕ 你好 — ünïcode"}]},
    {"id": "3", "nested": {"list": [1, 2, {"x": "]},["}]}, "conversations": []},
]


def write(tmp_path, text: str):
    path = tmp_path / "data.json"
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("indent", [None, 2])
def test_offsets_give_back_each_record(tmp_path, indent):
    path = write(tmp_path, json.dumps(RECORDS, indent=indent, ensure_ascii=False))
    raw = path.read_bytes()
    found = list(iter_json_array(path, chunk_chars=7))  # tiny chunks: records span many reads
    assert [record for _, _, record in found] == RECORDS
    for offset, length, record in found:
        assert json.loads(raw[offset : offset + length]) == record


def test_random_access_reader_survives_pickling_into_workers(tmp_path):
    path = write(tmp_path, json.dumps(RECORDS, ensure_ascii=False))
    records = JsonRecords.scan(path)
    assert len(records) == 3 and records[1] == RECORDS[1]
    clone = pickle.loads(pickle.dumps(records))
    assert clone[2] == RECORDS[2] and clone[0] == RECORDS[0]


@pytest.mark.parametrize("text", ["[]", " \n[ ]\n"])
def test_empty_array(tmp_path, text):
    assert list(iter_json_array(write(tmp_path, text))) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": 1}', "expected '['"),
        ('[{"id": 1}, {"id": 2}', "unexpected end of file"),
        ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
        ('[{"id": 1}, {"id": ]', "Expecting value"),
        ('[{"id": 1},]', "Expecting value"),
        ('[{"id": 1}]\n{"id": 2}', "data after the end of the array"),
    ],
)
def test_bad_json_names_the_file_and_byte(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        list(iter_json_array(path))
    assert str(path) in str(err.value) and "at byte" in str(err.value)


def test_parse_record_accepts_the_llava_format():
    conversation = parse_record(RECORDS[0])
    assert conversation.images == ("coco/train2017/000000000001.jpg",)
    assert conversation.turns == (("human", "<image>\nhi"),)
    assert parse_record(RECORDS[1]).images == ()


@pytest.mark.parametrize(
    "record",
    [
        [],
        {"id": "x"},
        {"conversations": []},
        {"conversations": [{"from": "system", "value": "hi"}]},
        {"conversations": [{"from": "human"}]},
        {"image": 5, "conversations": [{"from": "human", "value": "hi"}]},
    ],
)
def test_parse_record_rejects_what_is_not_a_conversation(record):
    with pytest.raises(MalformedRecord):
        parse_record(record)


def llava_record(image, *human_turns: str) -> dict:
    """A record with `image` and these human turns, each answered by the assistant."""
    turns = [
        t for text in human_turns for t in ({"from": "human", "value": text}, {"from": "gpt", "value": "ok"})
    ]
    return {"id": "r", "conversations": turns} | ({} if image is None else {"image": image})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # Image paths that leave the image folder are never opened.
        (
            llava_record("../../../../etc/passwd", "<image>\nWhat?"),
            "'../../../../etc/passwd' leaves the image folder",
        ),
        (llava_record("coco/../../x.jpg", "<image>\nWhat?"), "'coco/../../x.jpg' leaves the image folder"),
        (llava_record("..", "<image>\nWhat?"), "'..' leaves the image folder"),
        (llava_record("/etc/passwd", "<image>\nWhat?"), "'/etc/passwd' is absolute"),
        (llava_record(["coco/1.jpg", "/etc/shadow"], "<image> <image>\nWhat?"), "'/etc/shadow' is absolute"),
        (llava_record("coco/1.jpg\x00.png", "<image>\nWhat?"), "contains a NUL byte"),
        # The <image> tags must say where each image goes, as LLaVA's preprocessing expects.
        (llava_record("coco/1.jpg", "What is this?"), "the first human turn has no <image> tag"),
        (
            llava_record("coco/1.jpg", "What is this?", "<image>\nAnd now?"),
            "the first human turn has no <image> tag",
        ),
        (llava_record("coco/1.jpg", "<image>\n<image>\nWhat?"), "2 <image> tags for 1 image(s)"),
        (llava_record("coco/1.jpg", "<image>\nWhat?", "<image>\nAgain?"), "2 <image> tags for 1 image(s)"),
        (llava_record(["coco/1.jpg", "coco/2.jpg"], "<image>\nWhat?"), "1 <image> tags for 2 image(s)"),
        (llava_record(None, "<image>\nWhat?"), "1 <image> tag(s) in a text-only record"),
    ],
)
def test_records_that_lie_about_their_images_are_malformed(bad, message):
    with pytest.raises(MalformedRecord, match=re.escape(message)):
        parse_record(bad)


@pytest.mark.parametrize(
    ("good", "images"),
    [
        (
            llava_record("coco/train2017/1.jpg", "What is this?\n<image>", "And now?"),
            ("coco/train2017/1.jpg",),
        ),
        (llava_record("vg/VG_100K/../VG_100K_2/1.jpg", "<image>\nWhat?"), ("vg/VG_100K/../VG_100K_2/1.jpg",)),
        (llava_record(["a/1.jpg", "b/2.jpg"], "<image> <image>\nCompare."), ("a/1.jpg", "b/2.jpg")),
        (llava_record(None, "No image here."), ()),
    ],
)
def test_records_whose_images_are_where_they_say_are_accepted(good, images):
    assert parse_record(good).images == images


def test_image_files_resolve_inside_the_image_folder_only(tmp_path):
    assert image_file(tmp_path, "coco/1.jpg") == tmp_path / "coco" / "1.jpg"
    for outside in ("../secret.jpg", "/etc/passwd", "coco/../../secret.jpg"):
        with pytest.raises(MalformedRecord, match="image path"):
            image_file(tmp_path, outside)


@pytest.mark.parametrize(
    ("images", "stage", "source"),
    [
        (("00453/004539375.jpg",), "pretrain", "pretrain"),
        (("coco/train2017/1.jpg",), "finetune", "coco"),
        (("gqa/images/1.jpg",), "finetune", "gqa"),
        (("ocr_vqa/images/1.jpg",), "finetune", "ocr_vqa"),
        (("textvqa/train_images/a.jpg",), "finetune", "textvqa"),
        (("vg/VG_100K_2/1.jpg",), "finetune", "vg"),
        ((), "finetune", "text_only"),
        (("elsewhere/1.jpg",), "finetune", "other"),
    ],
)
def test_record_source(images, stage, source):
    assert record_source(images, stage) == source


def test_mmmu_options_are_a_python_list_in_a_string():
    assert parse_options("['$1', \"it's\", '<image 2>']", "q") == ["$1", "it's", "<image 2>"]
    assert parse_options("[]", "q") == []
    with pytest.raises(ValueError, match="validation_Art_3"):
        parse_options("['unclosed", "validation_Art_3")


@pytest.mark.trainer
def test_mmmu_parquet_of_the_synthetic_data_dir(synth_dir):
    files = mmmu_files(synth_dir / "MMMU" / "MMMU", "validation")
    assert set(files) == {"Accounting", "Economics", "Art", "Math"}
    questions = read_mmmu(files["Accounting"])
    assert [q.id for q in questions] == [f"validation_Accounting_{n}" for n in range(1, 7)]
    kinds = {q.question_type for q in questions}
    assert kinds == {"multiple-choice", "open"}
    multi = [q for q in questions if sum(img is not None for img in q.images) > 1]
    assert multi and all(len(q.images) == 7 for q in questions)
    assert multi[0].options[:2] == ["<image 1>", "<image 2>"]
    open_question = next(q for q in questions if q.question_type == "open")
    assert open_question.options == [] and open_question.answer.isdigit()
    assert read_mmmu(files["Math"], images=False)[0].images == []


def test_mmmu_reader_rejects_a_file_without_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "Art" / "validation-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ["x"]}), path)
    with pytest.raises(ValueError, match="missing columns"):
        read_mmmu(path)
