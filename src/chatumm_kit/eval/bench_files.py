"""Readers of benchmark files in their published formats, into exchanges (:class:`~.turns.ExpectedTurn`) to replay.

Nothing is downloaded: point a reader at the file you have. Each item becomes a one-exchange "dialogue" whose user
turn is the picture then the prompt text; ``meta`` carries what its scorer needs (``answer``, ``options``, groups).

* :func:`read_mmbench_tsv` — MMBench's TSV (OpenCompass/VLMEvalKit layout): ``index``, ``question``, optional
  ``hint``, option columns ``A``–``D`` (up to ``I``; empty or ``nan`` = absent), ``answer`` (a letter), ``category``,
  optional ``l2-category``, ``image`` (base64; a short all-digit value refers to the row with that ``index``, as
  VLMEvalKit deduplicates pictures). With ``circular=True`` each question with n options is asked n times with the
  options rotated (CircularEval); a file whose indices already run past 1 000 000 holds its own rotated copies (the
  question is ``index % 1000000``) and is read as it is. The prompt is VLMEvalKit's: ``Hint: ...`` (if any),
  ``Question: ...``, ``Options:`` one ``X. text`` per line, then "Please select the correct answer from the options
  above."
* :func:`read_mme_tsv` — MME as a TSV (VLMEvalKit layout): ``index``, ``category`` (subtask), ``image`` (base64 or a
  row reference), ``question`` (ends with "Please answer yes or no."), ``answer`` (Yes/No), optional ``image_path``.
  A picture's questions (for acc+) are grouped by ``(category, image_path)``, else by the picture's row.
* :func:`read_pope` — POPE's question files (one JSON object per line: ``question_id``, ``image`` (file name under
  ``image_root``), ``text``, ``label`` yes/no); each file is a category (its stem: ``coco_pope_random``, ...).
* :func:`read_vqa_jsonl` — a generic JSONL: ``id``, ``question``, ``image`` (a path relative to the file or
  ``image_root``, or a list of them), ``answer``, optional ``options`` (``{"A": ...}`` or a list, lettered A, B, ...),
  ``hint``, ``category``, ``alternatives`` (other right short answers). With options it is multiple choice (MMBench's
  prompt and matching; ``circular`` optional), without, a short answer.
* :func:`read_edit_jsonl` (``id``, ``instruction``, ``image``, optional ``category``) and :func:`read_t2i_jsonl`
  (``id``, ``prompt``, optional ``category``) — editing and text-to-image items, judged.
* :func:`read_dialogues` — your own dialogues: the kit's shards (an ``index.json``, a ``.tar``) or a ``.jsonl`` of
  dialogue objects (:meth:`~chatumm_kit.data.dialogue.Dialogue.to_dict`) each with ``"images": {key: path}``.

Errors name the file, line (or TSV row) and field.

Example:
    >>> items = read_mmbench_tsv("MMBench_DEV_EN.tsv", circular=True)        # doctest: +SKIP
    >>> items[0].meta["options"], items[0].meta["answer"]                     # doctest: +SKIP
    ({'A': 'a cat', 'B': 'a dog'}, 'B')
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import string
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.data.dialogue import Dialogue, DialogueError, DialogueSample
from chatumm_kit.eval.turns import ExpectedTurn
from chatumm_kit.synth.records import decode_image

__all__ = [
    "BenchmarkFileError",
    "read_mmbench_tsv",
    "read_mme_tsv",
    "read_pope",
    "read_vqa_jsonl",
    "read_edit_jsonl",
    "read_t2i_jsonl",
    "read_dialogues",
    "choice_prompt",
    "CIRCULAR_OFFSET",
]

CIRCULAR_OFFSET = 1_000_000
"""VLMEvalKit's index offset of pre-rotated MMBench copies (question = index % CIRCULAR_OFFSET)."""
_LETTERS = string.ascii_uppercase[:9]
_MISSING = {"", "nan", "NaN", "None", "none", "null"}


class BenchmarkFileError(ValueError):
    """A benchmark file that does not follow its format; the message names file, row or line, and field."""


def choice_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt (hint, question, lettered options, instruction)."""
    lines = [f"Hint: {hint}"] if hint else []
    lines += [f"Question: {question}", "Options:", *(f"{k}. {v}" for k, v in options.items())]
    lines.append("Please select the correct answer from the options above.")
    return "\n".join(lines)


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in _MISSING


def _tsv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise BenchmarkFileError(f"{path}: no rows")
    return rows


def _require(row: dict[str, str], key: str, where: str) -> str:
    value = row.get(key)
    if not _present(value):
        raise BenchmarkFileError(f"{where}: column {key!r} is missing or empty")
    return str(value).strip()


class _Pictures:
    """Base64 pictures of a TSV by row index (a short all-digit value refers to another row), decoded once."""

    def __init__(self, rows: Sequence[dict[str, str]], path: Path) -> None:
        self.raw = {str(r.get("index")).strip(): (r.get("image") or "").strip() for r in rows}
        self.path = path
        self._decoded: dict[str, torch.Tensor] = {}

    def root(self, index: str) -> str:
        """The index of the row whose column holds the picture of row ``index``."""
        value = self.raw.get(index, "")
        return value if value.isdigit() and len(value) <= 64 else index

    def get(self, index: str) -> torch.Tensor:
        key = self.root(index)
        if key not in self._decoded:
            where = f"{self.path} index {index}: column 'image'"
            data = self.raw.get(key, "")
            if not data:
                raise BenchmarkFileError(f"{where}: no picture (or a reference to a row that has none)")
            try:
                blob = base64.b64decode(data, validate=False)
            except (binascii.Error, ValueError) as e:
                raise BenchmarkFileError(f"{where}: not base64 ({e})") from None
            self._decoded[key] = decode_image(blob, where=where)
        return self._decoded[key]


def read_mmbench_tsv(
    path: str | Path, *, circular: bool = True, max_questions: int | None = None
) -> list[ExpectedTurn]:
    """MMBench's TSV as one exchange per pass (format and CircularEval in the module docstring)."""
    path = Path(path)
    rows = _tsv_rows(path)
    pictures = _Pictures(rows, path)
    pre_rotated = any(int(_require(r, "index", f"{path} row {i + 2}")) >= CIRCULAR_OFFSET for i, r in enumerate(rows))
    out: list[ExpectedTurn] = []
    questions: list[int] = []
    for i, row in enumerate(rows):
        index = _require(row, "index", f"{path} row {i + 2}")
        where = f"{path} index {index}"
        group = int(index) % CIRCULAR_OFFSET
        if group not in questions:
            if max_questions is not None and len(questions) >= max_questions:
                continue
            questions.append(group)
        options = {k: str(row[k]).strip() for k in _LETTERS if _present(row.get(k))}
        if len(options) < 2:
            raise BenchmarkFileError(f"{where}: fewer than two options in columns A-I")
        answer = _require(row, "answer", where)
        if answer not in options:
            raise BenchmarkFileError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
        question = _require(row, "question", where)
        hint = str(row["hint"]).strip() if _present(row.get("hint")) else None
        picture = pictures.get(index)
        letters = list(options)
        texts = list(options.values())
        shifts = range(len(letters)) if circular and not pre_rotated else [0]
        rotation0 = int(index) // CIRCULAR_OFFSET if pre_rotated else 0
        for k in shifts:
            rotated = {letters[j]: texts[(j + k) % len(texts)] for j in range(len(letters))}
            right = letters[(letters.index(answer) - k) % len(letters)]
            out.append(
                ExpectedTurn(
                    dialogue_id=f"{index}" if k == 0 else f"{index}/r{k}",
                    index=0,
                    task="mmbench",
                    output="text",
                    distance=None,
                    distractor=False,
                    answer=right,
                    answer_scene=None,
                    target=None,
                    user=[picture, choice_prompt(question, rotated, hint)],
                    reply=[right],
                    category=str(row.get("category") or "").strip() or None,
                    meta={
                        "group": group,
                        "rotation": rotation0 + k,
                        "options": rotated,
                        "answer": right,
                        **({"l2_category": row["l2-category"].strip()} if _present(row.get("l2-category")) else {}),
                    },
                )  # fmt: skip
            )
    return out


def _yes_no(value: str, where: str) -> str:
    low = value.strip().lower()
    if low not in ("yes", "no"):
        raise BenchmarkFileError(f"{where}: the answer must be yes or no, got {value!r}")
    return low


def read_mme_tsv(path: str | Path, *, max_questions: int | None = None) -> list[ExpectedTurn]:
    """MME as a TSV, one exchange per question (format in the module docstring)."""
    path = Path(path)
    rows = _tsv_rows(path)
    pictures = _Pictures(rows, path)
    out = []
    for i, row in enumerate(rows[:max_questions]):
        index = _require(row, "index", f"{path} row {i + 2}")
        where = f"{path} index {index}"
        category = _require(row, "category", where)
        answer = _yes_no(_require(row, "answer", where), where + ": column 'answer'")
        group = row["image_path"].strip() if _present(row.get("image_path")) else pictures.root(index)
        out.append(
            ExpectedTurn(
                dialogue_id=index,
                index=0,
                task="mme",
                output="text",
                distance=None,
                distractor=False,
                answer=answer.capitalize(),
                answer_scene=None,
                target=None,
                user=[pictures.get(index), _require(row, "question", where)],
                reply=[answer.capitalize()],
                category=category,
                meta={"answer": answer, "image_group": f"{category}/{group}"},
            )
        )
    return out


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFileError(f"{path} line {n}: not JSON ({e.msg} at char {e.pos})") from None
            if not isinstance(obj, dict):
                raise BenchmarkFileError(f"{path} line {n}: expected a JSON object")
            yield n, obj


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if not _present(obj.get(key)):
        raise BenchmarkFileError(f"{where}: field {key!r} is missing or empty")
    return obj[key]


def _picture(name: str, roots: Sequence[Path], where: str) -> torch.Tensor:
    for root in roots:
        p = root / name
        if p.is_file():
            return decode_image(p.read_bytes(), where=f"{where} ({p})")
    raise BenchmarkFileError(f"{where}: picture {name!r} not found under {[str(r) for r in roots]}")


def _roots(path: Path, image_root: str | Path | None) -> list[Path]:
    return [Path(image_root)] if image_root is not None else [path.parent]


def read_pope(
    paths: str | Path | Sequence[str | Path], *, image_root: str | Path, max_questions: int | None = None
) -> list[ExpectedTurn]:
    """POPE question files, one exchange per question; ``max_questions`` caps each file."""
    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    out = []
    for path in files:
        for count, (n, obj) in enumerate(_json_lines(path)):
            if max_questions is not None and count >= max_questions:
                break
            where = f"{path} line {n}"
            qid = str(_field(obj, "question_id", where))
            answer = _yes_no(str(_field(obj, "label", where)), where + ": field 'label'")
            out.append(
                ExpectedTurn(
                    dialogue_id=f"{path.stem}/{qid}",
                    index=0,
                    task="pope",
                    output="text",
                    distance=None,
                    distractor=False,
                    answer=answer,
                    answer_scene=None,
                    target=None,
                    user=[
                        _picture(str(_field(obj, "image", where)), [Path(image_root)], where),
                        str(_field(obj, "text", where)),
                    ],  # fmt: skip
                    reply=[answer],
                    category=path.stem,
                    meta={"answer": answer},
                )
            )
    return out


def _pictures_of(obj: dict[str, Any], roots: Sequence[Path], where: str, key: str = "image") -> list[torch.Tensor]:
    names = obj.get(key)
    if names is None:
        return []
    return [_picture(str(n), roots, where) for n in (names if isinstance(names, list) else [names])]


def read_vqa_jsonl(
    path: str | Path, *, image_root: str | Path | None = None, circular: bool = False, max_questions: int | None = None
) -> list[ExpectedTurn]:
    """A generic multiple-choice / short-answer JSONL (module docstring); ``task`` is ``choice`` or ``short``."""
    path = Path(path)
    roots = _roots(path, image_root)
    out = []
    for count, (n, obj) in enumerate(_json_lines(path)):
        if max_questions is not None and count >= max_questions:
            break
        where = f"{path} line {n}"
        qid = str(_field(obj, "id", where))
        question = str(_field(obj, "question", where))
        answer = str(_field(obj, "answer", where)).strip()
        pictures = _pictures_of(obj, roots, where)
        raw = obj.get("options")
        category = None if obj.get("category") is None else str(obj["category"])
        if raw:
            options = dict(zip(_LETTERS, map(str, raw))) if isinstance(raw, list) else {str(k): str(v)
                                                                                            for k, v in raw.items()}  # fmt: skip
            if answer not in options:
                raise BenchmarkFileError(f"{where}: answer {answer!r} is not one of the option letters {list(options)}")
            letters, texts = list(options), list(options.values())
            for k in range(len(letters)) if circular else [0]:
                rotated = {letters[j]: texts[(j + k) % len(texts)] for j in range(len(letters))}
                right = letters[(letters.index(answer) - k) % len(letters)]
                out.append(ExpectedTurn(
                    dialogue_id=qid if k == 0 else f"{qid}/r{k}", index=0, task="choice", output="text",
                    distance=None, distractor=False, answer=right, answer_scene=None, target=None,
                    user=[*pictures, choice_prompt(question, rotated, obj.get("hint"))], reply=[right],
                    category=category, meta={"group": qid, "rotation": k, "options": rotated, "answer": right},
                ))  # fmt: skip
        else:
            alternatives = [str(a) for a in obj.get("alternatives") or []]
            out.append(ExpectedTurn(
                dialogue_id=qid, index=0, task="short", output="text", distance=None, distractor=False, answer=answer,
                answer_scene=None, target=None, user=[*pictures, question], reply=[answer], category=category,
                meta={"answer": answer, "alternatives": alternatives},
            ))  # fmt: skip
    tasks = {e.task for e in out}
    if len(tasks) > 1:
        raise BenchmarkFileError(f"{path}: mixes multiple-choice and short-answer items; split them into two files")
    return out


def read_edit_jsonl(
    path: str | Path, *, image_root: str | Path | None = None, max_items: int | None = None
) -> list[ExpectedTurn]:
    """Editing items: the user turn is the input picture then the instruction; an image reply is expected."""
    path = Path(path)
    roots = _roots(path, image_root)
    out = []
    for count, (n, obj) in enumerate(_json_lines(path)):
        if max_items is not None and count >= max_items:
            break
        where = f"{path} line {n}"
        pictures = _pictures_of(obj, roots, where)
        if not pictures:
            raise BenchmarkFileError(f"{where}: field 'image' (the picture to edit) is missing")
        instruction = str(_field(obj, "instruction", where))
        out.append(ExpectedTurn(
            dialogue_id=str(_field(obj, "id", where)), index=0, task="edit", output="image", distance=None,
            distractor=False, answer=None, answer_scene=None, target=None, user=[*pictures, instruction], reply=[],
            category=None if obj.get("category") is None else str(obj["category"]), meta={"instruction": instruction},
        ))  # fmt: skip
    return out


def read_t2i_jsonl(path: str | Path, *, max_items: int | None = None) -> list[ExpectedTurn]:
    """Text-to-image items: the user turn is the prompt; an image reply is expected."""
    path = Path(path)
    out = []
    for count, (n, obj) in enumerate(_json_lines(path)):
        if max_items is not None and count >= max_items:
            break
        where = f"{path} line {n}"
        prompt = str(_field(obj, "prompt", where))
        out.append(ExpectedTurn(
            dialogue_id=str(_field(obj, "id", where)), index=0, task="generate", output="image", distance=None,
            distractor=False, answer=None, answer_scene=None, target=None, user=[prompt], reply=[],
            category=None if obj.get("category") is None else str(obj["category"]), meta={"prompt": prompt},
        ))  # fmt: skip
    return out


def read_dialogues(
    path: str | Path | Sequence[str | Path], *, max_dialogues: int | None = None
) -> list[DialogueSample]:
    """Your dialogues: kit shards (anything :func:`~chatumm_kit.data.shards.read_samples` accepts) or a ``.jsonl``
    of dialogue objects with ``"images": {key: path relative to the file}``."""
    if isinstance(path, str | Path) and str(path).endswith(".jsonl"):
        p = Path(path)
        out = []
        for n, obj in _json_lines(p):
            if max_dialogues is not None and len(out) >= max_dialogues:
                break
            where = f"{p} line {n}"
            files = obj.pop("images", {}) or {}
            try:
                dialogue = Dialogue.from_dict(obj)
            except DialogueError as e:
                raise BenchmarkFileError(f"{where}: {e}") from None
            images = {str(k): _picture(str(v), [p.parent], f"{where} image {k!r}") for k, v in files.items()}
            missing = sorted(set(dialogue.image_keys) - set(images))
            if missing:
                raise BenchmarkFileError(f"{where}: dialogue {dialogue.id!r} uses images {missing} not in 'images'")
            out.append(DialogueSample(dialogue=dialogue, images=images, key=f"{p.name}:{n}"))
        return out
    import itertools

    from chatumm_kit.data.shards import read_samples

    return list(itertools.islice(read_samples(path), max_dialogues))
