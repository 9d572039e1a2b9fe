"""Understanding benchmarks scored as their official rules state them: answer extraction, scorers, aggregates.

Each rule below is reimplemented from its published description (no code copied); the source is named.

* **Multiple choice — MMBench** (Liu et al., "MMBench", arXiv:2307.06281, and its evaluation in OpenCompass
  VLMEvalKit, ``vlmeval/utils/matching_util.py``): :func:`extract_choice` applies MMBench's *step 1* matching: the
  reply with the characters ``.()[],:;!*#{}`` turned into spaces is split into words; if exactly one option letter
  appears as a word, that is the choice; otherwise (none or several), if exactly one option's text (lower-cased) occurs in the
  lower-cased reply, that option; otherwise nothing is matched and the answer counts as wrong (MMBench's step 2, an
  LLM choice extractor, is not run; unmatched replies are counted). **CircularEval**: a question with n options is
  asked n times with the options rotated; it counts as right only when every pass is right
  (:func:`mmbench_aggregate`: ``circular_acc``; ``vanilla_acc`` is the first pass alone).
* **MME** (Fu et al., arXiv:2306.13394, and its ``eval_tool/calculation.py``): :func:`mme_answer` lower-cases the
  reply; exactly ``yes`` or ``no`` is that answer, else ``yes`` in its first four characters means yes, else ``no``
  there means no, else ``other`` (wrong). Per subtask: ``acc`` = right questions / questions × 100, ``acc_plus`` =
  pictures with **both** questions right / pictures × 100, score = acc + acc+; perception and cognition totals are
  sums of their subtasks' scores (:func:`mme_aggregate`).
* **POPE** (Li et al., arXiv:2305.10355, and its ``evaluate.py``): :func:`pope_answer` keeps the reply's first
  sentence (up to the first ``.``), drops commas, splits on spaces; ``No``, ``no`` or ``not`` among the words means
  no, anything else yes. ``yes`` is the positive class: accuracy, precision, recall, F1 and the yes-ratio (share of
  yes answers) per split and overall (:func:`pope_aggregate`).
* **Short answers** (generic JSONL without options): :func:`normalise_short_answer` — lower-case, punctuation removed
  (a decimal point between digits kept), articles ``a``/``an``/``the`` dropped, number words zero–ten as digits,
  whitespace collapsed — a simplification of the VQAv2 answer normalisation (Antol et al., ICCV 2015); right when it
  equals the normalised reference or any of the listed alternatives (no 10-annotator consensus).

Example:
    >>> extract_choice("The answer is (B).", {"A": "cat", "B": "dog"})
    'B'
    >>> extract_choice("I think it shows a dog", {"A": "cat", "B": "dog"})
    'B'
    >>> mme_answer("Yes, there is."), pope_answer("There is not a dog. Yes."), normalise_short_answer("Two cats.")
    ('yes', 'no', '2 cats')
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chatumm_kit.eval.metrics import TurnScore
from chatumm_kit.eval.scoring import ScoreRequest, _base
from chatumm_kit.eval.turns import ExpectedTurn

__all__ = [
    "extract_choice",
    "mme_answer",
    "pope_answer",
    "normalise_short_answer",
    "ChoiceScorer",
    "MMEAnswerScorer",
    "POPEAnswerScorer",
    "ShortAnswerScorer",
    "mmbench_aggregate",
    "mme_aggregate",
    "pope_aggregate",
    "accuracy_aggregate",
    "MME_PERCEPTION",
    "MME_COGNITION",
]

_CHOICE_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "ocr")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def extract_choice(reply: str, options: Mapping[str, str]) -> str | None:
    """MMBench step-1 matching (module docstring): the option letter the reply chooses, or None."""
    words = reply.translate(_CHOICE_PUNCT).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    low = reply.lower()
    hits = [letter for letter, text in options.items() if str(text).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mme_answer(reply: str) -> str:
    """MME's reading of a yes/no reply: ``yes``, ``no`` or ``other``."""
    low = reply.lower().strip()
    if low in ("yes", "no"):
        return low
    head = low[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def pope_answer(reply: str) -> str:
    """POPE's reading of a yes/no reply: ``no`` when its first sentence has the word No/no/not, else ``yes``."""
    text = reply.split(".")[0] if "." in reply else reply
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]")


def normalise_short_answer(text: str) -> str:
    """Simplified VQAv2 normalisation (module docstring)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the"))


# ---------------------------------------------------------------------------------------------------- scorers
class _AnswerScorer:
    """Reads an answer from each reply and compares it with ``expected.meta["answer"]``."""

    def read(self, reply: str, expected: ExpectedTurn) -> str | None:
        raise NotImplementedError

    def right(self, answer: str | None, expected: ExpectedTurn) -> bool:
        return answer is not None and answer == expected.meta["answer"]

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[TurnScore]:
        out = []
        for r in requests:
            answer = self.read(r.reply.text, r.expected)
            ok = self.right(answer, r.expected)
            out.append(_base(r.expected, r.reply, text_metric="answer", text_correct=ok, success=ok, extracted=answer))
        return out


class ChoiceScorer(_AnswerScorer):
    """Multiple choice by :func:`extract_choice` over ``expected.meta["options"]`` (letter → text)."""

    def read(self, reply: str, expected: ExpectedTurn) -> str | None:
        return extract_choice(reply, expected.meta["options"])


class MMEAnswerScorer(_AnswerScorer):
    """Yes/no by :func:`mme_answer` (``other`` is wrong)."""

    def read(self, reply: str, expected: ExpectedTurn) -> str | None:
        return mme_answer(reply)


class POPEAnswerScorer(_AnswerScorer):
    """Yes/no by :func:`pope_answer`."""

    def read(self, reply: str, expected: ExpectedTurn) -> str | None:
        return pope_answer(reply)


class ShortAnswerScorer(_AnswerScorer):
    """Short answers by :func:`normalise_short_answer` against ``meta["answer"]`` and ``meta["alternatives"]``."""

    def read(self, reply: str, expected: ExpectedTurn) -> str | None:
        return normalise_short_answer(reply)

    def right(self, answer: str | None, expected: ExpectedTurn) -> bool:
        wanted = [expected.meta["answer"], *expected.meta.get("alternatives", [])]
        return answer is not None and answer in {normalise_short_answer(str(w)) for w in wanted}


# ---------------------------------------------------------------------------------------------------- aggregates
Table = dict[str, dict[str, Any]]


def _by(items: Sequence[tuple[ExpectedTurn, TurnScore]], key: Callable[[ExpectedTurn], str | None]):
    groups: dict[str, list[tuple[ExpectedTurn, TurnScore]]] = defaultdict(list)
    for e, s in items:
        k = key(e)
        if k is not None:
            groups[k].append((e, s))
    return dict(sorted(groups.items()))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def accuracy_aggregate(expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, Table]:
    """Plain accuracy overall and per category (``unmatched``: replies no answer could be read from)."""

    def stats(items):
        return {
            "accuracy": _mean([float(s.success) for _, s in items]),
            "questions": len(items),
            "unmatched": sum(s.extracted is None for _, s in items),
        }

    items = list(zip(expected, scores))
    return stats(items), {k: stats(v) for k, v in _by(items, lambda e: e.category).items()}


def mmbench_aggregate(expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, Table]:
    """CircularEval: per question group (``meta["group"]``, all rotations), right only when every pass is right;
    ``vanilla_acc`` counts the first pass (``meta["rotation"] == 0``) alone. Overall, per ``category`` and per
    ``meta["l2_category"]`` (keys ``l2/<name>``)."""

    def stats(items):
        groups: dict[str, list[bool]] = defaultdict(list)
        first: list[bool] = []
        for e, s in items:
            groups[str(e.meta["group"])].append(s.success)
            if e.meta.get("rotation", 0) == 0:
                first.append(s.success)
        return {
            "circular_acc": _mean([float(all(v)) for v in groups.values()]),
            "vanilla_acc": _mean([float(v) for v in first]),
            "questions": len(groups),
            "passes": len(items),
            "unmatched": sum(s.extracted is None for _, s in items),
        }

    items = list(zip(expected, scores))
    table = {k: stats(v) for k, v in _by(items, lambda e: e.category).items()}
    l2 = _by(items, lambda e: e.meta.get("l2_category"))
    table.update({f"l2/{k}": stats(v) for k, v in l2.items()})
    return stats(items), table


def mme_aggregate(expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, Table]:
    """Per subtask (``category``): ``acc``, ``acc_plus`` (pictures, ``meta["image_group"]``, with every question
    right) and ``score`` = acc + acc+ (all × 100); overall: ``perception`` and ``cognition`` (sums of their subtasks'
    scores, :data:`MME_PERCEPTION`, :data:`MME_COGNITION`; other subtasks count in neither) and ``total``."""
    table: Table = {}
    for cat, items in _by(list(zip(expected, scores)), lambda e: e.category or "mme").items():
        pictures: dict[str, list[bool]] = defaultdict(list)
        for e, s in items:
            pictures[str(e.meta["image_group"])].append(s.success)
        acc = 100.0 * sum(s.success for _, s in items) / len(items)
        acc_plus = 100.0 * sum(all(v) for v in pictures.values()) / len(pictures)
        table[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(items),
                      "pictures": len(pictures), "other": sum(s.extracted == "other" for _, s in items)}  # fmt: skip

    def total(names):
        found = [v["score"] for k, v in table.items() if k.lower().replace(" ", "_") in names]
        return sum(found) if found else None

    perception, cognition = total(MME_PERCEPTION), total(MME_COGNITION)
    overall = {
        "perception": perception,
        "cognition": cognition,
        "total": sum(v["score"] for v in table.values()),
        "acc": 100.0 * sum(s.success for s in scores) / len(scores) if scores else None,
        "questions": len(scores),
    }
    return overall, table


def pope_aggregate(expected: Sequence[ExpectedTurn], scores: Sequence[TurnScore]) -> tuple[dict, Table]:
    """Accuracy, precision, recall, F1 (``yes`` positive) and yes-ratio, overall and per ``category`` (split)."""

    def stats(items):
        tp = sum(s.extracted == "yes" and e.meta["answer"] == "yes" for e, s in items)
        fp = sum(s.extracted == "yes" and e.meta["answer"] == "no" for e, s in items)
        tn = sum(s.extracted == "no" and e.meta["answer"] == "no" for e, s in items)
        fn = sum(s.extracted == "no" and e.meta["answer"] == "yes" for e, s in items)
        n = len(items)
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if n else None)
        return {"accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall, "f1": f1,
                "yes_ratio": (tp + fp) / n if n else None, "questions": n, "tp": tp, "fp": fp, "tn": tn,
                "fn": fn}  # fmt: skip

    items = list(zip(expected, scores))
    return stats(items), {k: stats(v) for k, v in _by(items, lambda e: e.category).items()}
