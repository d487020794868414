"""Prompt lists and class labels for the harness: shipped files, COCO captions JSON, label ranges."""

from __future__ import annotations

import json

import pytest

from benchmarks.prompts import CALIBRATION_PROMPTS, EVAL_PROMPTS, coco_first_captions, parse_labels, read_prompts


def test_shipped_lists():
    calibration = read_prompts(CALIBRATION_PROMPTS)
    evaluation = read_prompts(EVAL_PROMPTS)
    assert len(calibration) == 10 and len(set(calibration)) == 10  # the paper calibrated on 10 prompts
    assert len(evaluation) >= 8 and not set(evaluation) & set(calibration)
    assert all(not p.startswith("#") and p == p.strip() for p in calibration + evaluation)
    assert read_prompts(EVAL_PROMPTS, limit=3) == evaluation[:3]


def test_coco_captions_first_caption_per_image_sorted_by_id(tmp_path):
    data = {"images": [{"id": 9}, {"id": 3}], "annotations": [
        {"image_id": 9, "id": 1, "caption": "A dog  on a\nbeach."},
        {"image_id": 3, "id": 2, "caption": "A cat."},
        {"image_id": 9, "id": 3, "caption": "Second caption of 9."},
        {"image_id": 3, "id": 4, "caption": "Second caption of 3."},
    ]}
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    assert read_prompts(path) == ["A cat.", "A dog on a beach."]
    assert read_prompts(path, limit=1) == ["A cat."]
    assert coco_first_captions(data) == ["A cat.", "A dog on a beach."]
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(["one", " two "]))
    assert read_prompts(plain) == ["one", "two"]


@pytest.mark.parametrize("content, suffix, message", [
    ("", ".txt", "holds no prompts"),
    ("# only a comment\n", ".txt", "holds no prompts"),
    ('{"annotations": [{"caption": "x"}]}', ".json", "lacks an integer 'image_id'"),
    ('{"foo": 1}', ".json", "neither a JSON list"),
])
def test_bad_prompt_files(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_missing_prompts_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_prompts(tmp_path / "nope.txt")


def test_labels():
    assert parse_labels("1,2,3") == [1, 2, 3]
    assert parse_labels("0-3, 7") == [0, 1, 2, 3, 7]
    for bad, message in (("1,x", "'x' is not a class index"), ("5-2", "'5-2'"), ("1000", "out of range"),
                         ("-1", "out of range"), (",", "name no class")):
        with pytest.raises(ValueError, match=message):
            parse_labels(bad)


def test_repeated_prompts_are_refused_not_merged(tmp_path, capsys):
    from benchmarks.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na cat\n")
    assert main(["compare", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "the prompts repeat 'a cat'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
