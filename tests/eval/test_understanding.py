"""Understanding benchmarks from tiny files in their published formats, scored through the scoring interface:
extraction rules, CircularEval, MME's acc / acc+, POPE's precision / recall / F1, short answers — every figure checked
against a hand computation."""

import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

from chatumm_kit.eval import (
    BenchmarkFileError,
    ChoiceScorer,
    MMEAnswerScorer,
    POPEAnswerScorer,
    Reply,
    ScoreRequest,
    ShortAnswerScorer,
    TurnScorer,
    extract_choice,
    mme_answer,
    normalise_short_answer,
    pope_answer,
    read_mmbench_tsv,
    read_mme_tsv,
    read_pope,
    read_vqa_jsonl,
)
from chatumm_kit.eval.understanding import accuracy_aggregate, mmbench_aggregate, mme_aggregate, pope_aggregate


def png(colour, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(colour) -> str:
    return base64.b64encode(png(colour)).decode()


def write_tsv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def mmbench_rows():
    return [
        {"index": "0", "question": "What colour is it?", "hint": "nan", "A": "red", "B": "green", "C": "blue",
         "D": "nan", "answer": "A", "category": "colour", "l2-category": "perception", "image": b64((255, 0, 0))},
        {"index": "1", "question": "Is it bright?", "hint": "Look closely.", "A": "yes", "B": "no", "C": "",
         "D": "", "answer": "B", "category": "light", "l2-category": "perception", "image": "0"},
        {"index": "2", "question": "Which shape?", "hint": "nan", "A": "circle", "B": "square", "C": "triangle",
         "D": "star", "answer": "D", "category": "colour", "l2-category": "reasoning", "image": b64((0, 0, 255))},
    ]  # fmt: skip


def score(scorer: TurnScorer, items, texts):
    assert isinstance(scorer, TurnScorer)
    return scorer.score_many([ScoreRequest(expected=e, reply=Reply(parts=[t])) for e, t in zip(items, texts)])


def test_extraction_rules_follow_the_official_descriptions():
    opts = {"A": "red", "B": "green", "C": "blue"}
    assert extract_choice("B", opts) == "B"
    assert extract_choice("(C) blue.", opts) == "C"
    assert extract_choice("Answer: A", opts) == "A"
    assert extract_choice("It is green", opts) == "B"  # no letter: the one option text that occurs
    assert extract_choice("A or B, hard to say; green maybe", opts) == "B"  # two letters: the text rule decides
    assert extract_choice("red or blue", opts) is None  # two texts: unmatched
    assert extract_choice("I don't know", opts) is None
    assert extract_choice("a", opts) is None  # letters are upper case words
    assert [mme_answer(x) for x in ("Yes", "no", "Yes, it is.", "No.", "The answer is yes", "")] == [
        "yes", "no", "yes", "no", "other", "other"]  # fmt: skip
    assert [pope_answer(x) for x in ("Yes", "No, there is none.", "There is not a cat.", "Yes. No.", "nope")] == [
        "yes", "no", "no", "yes", "yes"]  # fmt: skip
    assert normalise_short_answer("The Two Cats!") == "2 cats"
    assert normalise_short_answer("3.5 m.") == "3.5 m"


def test_mmbench_circular_evaluation_on_crafted_replies(tmp_path):
    path = write_tsv(tmp_path / "mmbench.tsv", mmbench_rows())
    items = read_mmbench_tsv(path)
    assert len(items) == 3 + 2 + 4  # one pass per option
    q0 = [e for e in items if e.meta["group"] == 0]
    # rotation k moves option (j + k) % n to letter j, so the right letter moves back by k
    assert [e.meta["answer"] for e in q0] == ["A", "C", "B"]
    assert q0[1].meta["options"] == {"A": "green", "B": "blue", "C": "red"}
    assert "Options:\nA. green\nB. blue\nC. red\n" in q0[1].user[1] and q0[1].user[1].startswith("Question: ")
    q1 = [e for e in items if e.meta["group"] == 1]
    assert q1[0].user[1].startswith("Hint: Look closely.\nQuestion: Is it bright?")
    assert torch.equal(q1[0].user[0], q0[0].user[0])  # "0" in the image column refers to row 0's picture
    assert q0[0].user[0].shape == (3, 8, 8) and q0[0].user[0][0, 0, 0] == 255

    # q0 right in every pass (by letter, then by text, then by letter); q1 right once, wrong once;
    # q2 right in 3 passes, the last unmatched
    texts = {0: ["A", "I see red", "(B)"], 1: ["B", "B"], 2: ["D", "star", "B", "no idea"]}
    replies = [texts[e.meta["group"]][e.meta["rotation"]] for e in items]
    scores = score(ChoiceScorer(), items, replies)
    assert [s.extracted for s in scores[:3]] == ["A", "C", "B"]
    overall, table = mmbench_aggregate(items, scores)
    assert overall["circular_acc"] == pytest.approx(1 / 3)  # only q0 survives all passes
    assert overall["vanilla_acc"] == 1.0  # every first pass is right
    assert overall["questions"] == 3 and overall["passes"] == 9 and overall["unmatched"] == 1
    assert table["colour"]["circular_acc"] == 0.5 and table["light"]["circular_acc"] == 0.0
    assert table["l2/perception"]["circular_acc"] == 0.5 and table["l2/reasoning"]["circular_acc"] == 0.0

    flat = read_mmbench_tsv(path, circular=False, max_questions=2)
    assert [e.dialogue_id for e in flat] == ["0", "1"]


def test_mmbench_pre_rotated_file_is_read_as_it_is(tmp_path):
    base = mmbench_rows()[0]
    rotated = dict(base, index="1000000", A="green", B="blue", C="red", answer="C", image="0")
    items = read_mmbench_tsv(write_tsv(tmp_path / "pre.tsv", [base, rotated]))
    assert len(items) == 2 and {e.meta["group"] for e in items} == {0}
    overall, _ = mmbench_aggregate(items, score(ChoiceScorer(), items, ["A", "A"]))
    assert overall["circular_acc"] == 0.0 and overall["vanilla_acc"] == 1.0


def test_mme_accuracy_and_accuracy_plus_per_picture(tmp_path):
    rows = []
    for cat, pics in (("existence", 2), ("count", 1), ("code_reasoning", 1)):
        for _ in range(pics):
            for ans in ("Yes", "No"):
                i = len(rows)
                rows.append({"index": str(i), "category": cat, "image": b64((10 * i, 0, 0)) if ans == "Yes" else
                             str(i - 1), "question": f"q{i}? Please answer yes or no.", "answer": ans})  # fmt: skip
    items = read_mme_tsv(write_tsv(tmp_path / "mme.tsv", rows))
    assert len(items) == 8 and items[1].meta["image_group"] == items[0].meta["image_group"]
    # existence: picture 0 both right, picture 1 one right; count: both wrong; code: "Yes" on a no-question
    replies = ["Yes", "No", "yes, there is", "Yes", "No", "Yes", "Yes.", "Yes"]
    scores = score(MMEAnswerScorer(), items, replies)
    overall, table = mme_aggregate(items, scores)
    assert table["existence"]["acc"] == 75.0 and table["existence"]["acc_plus"] == 50.0
    assert table["existence"]["score"] == 125.0
    assert table["count"] == pytest.approx({"acc": 0.0, "acc_plus": 0.0, "score": 0.0, "questions": 2,
                                            "pictures": 1, "other": 0})  # fmt: skip
    assert table["code_reasoning"]["acc"] == 50.0 and table["code_reasoning"]["acc_plus"] == 0.0
    assert overall["perception"] == 125.0 and overall["cognition"] == 50.0 and overall["total"] == 175.0
    assert overall["acc"] == pytest.approx(100 * 4 / 8)
    with pytest.raises(BenchmarkFileError, match=r"mme.tsv index 0: column 'answer': the answer must be yes or no"):
        read_mme_tsv(write_tsv(tmp_path / "mme.tsv", [dict(rows[0], answer="Maybe")]))


def test_pope_precision_recall_f1_and_yes_ratio(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(3):
        (tmp_path / "img" / f"p{k}.png").write_bytes(png((k * 80, 0, 0)))
    labels = {"coco_pope_random": ["yes", "yes", "no", "no"], "coco_pope_adversarial": ["yes", "no"]}
    files = []
    for name, ls in labels.items():
        path = tmp_path / f"{name}.json"
        path.write_text("".join(json.dumps({"question_id": i, "image": f"p{i % 3}.png", "text": f"Is there a {i}?",
                                            "label": lab}) + "\n" for i, lab in enumerate(ls)))  # fmt: skip
        files.append(str(path))
    items = read_pope(files, image_root=tmp_path / "img")
    replies = ["Yes, there is.", "No.", "There is not.", "Yes", "No", "No"]
    scores = score(POPEAnswerScorer(), items, replies)
    overall, table = pope_aggregate(items, scores)
    # overall: TP 1, FN 2, TN 2, FP 1
    assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (1, 1, 2, 2)
    assert overall["accuracy"] == pytest.approx(3 / 6)
    assert overall["precision"] == pytest.approx(1 / 2) and overall["recall"] == pytest.approx(1 / 3)
    assert overall["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert overall["yes_ratio"] == pytest.approx(2 / 6)
    assert table["coco_pope_random"]["accuracy"] == 0.5 and table["coco_pope_adversarial"]["recall"] == 0.0
    with pytest.raises(BenchmarkFileError, match=r"picture 'p0.png' not found"):
        read_pope(files[0], image_root=tmp_path)


def test_generic_jsonl_multiple_choice_and_short_answers(tmp_path):
    (tmp_path / "a.png").write_bytes(png((0, 200, 0)))
    short = tmp_path / "short.jsonl"
    short.write_text(
        json.dumps({"id": "s0", "image": "a.png", "question": "How many?", "answer": "two", "category": "count"})
        + "\n# a comment\n"
        + json.dumps({"id": "s1", "question": "Say hi", "answer": "hello", "alternatives": ["hi"]})
        + "\n"
    )
    items = read_vqa_jsonl(short)
    assert [e.task for e in items] == ["short", "short"] and items[0].user[0].shape == (3, 8, 8)
    scores = score(ShortAnswerScorer(), items, ["2.", "Hi!"])
    overall, table = accuracy_aggregate(items, scores)
    assert overall["accuracy"] == 1.0 and table == {"count": {"accuracy": 1.0, "questions": 1, "unmatched": 0}}
    assert not score(ShortAnswerScorer(), items[:1], ["two cats"])[0].success

    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"id": "m0", "question": "Colour?", "options": ["red", "green"], "answer": "B"}) + "\n")
    items = read_vqa_jsonl(mc, circular=True)
    assert [e.meta["answer"] for e in items] == ["B", "A"]
    overall, _ = mmbench_aggregate(items, score(ChoiceScorer(), items, ["green", "green"]))
    assert overall["circular_acc"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(BenchmarkFileError, match=r"bad.jsonl line 1: field 'answer' is missing"):
        read_vqa_jsonl(bad)
