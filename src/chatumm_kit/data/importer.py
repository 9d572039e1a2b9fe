"""Your dialogues in, shards out: :func:`import_dialogues` (``chatumm data import``).

Reads a JSONL file (``.jsonl`` or ``.jsonl.gz``) of dialogues in the kit's, LLaVA's or OpenAI's layout
(:mod:`chatumm_kit.data.import_formats`) plus the images it references (:mod:`chatumm_kit.data.image_files`), and
writes indexed webdataset shards with :class:`~chatumm_kit.data.shards.DialogueShardWriter` (atomic shard writes,
``index.json``), ready for :class:`~chatumm_kit.data.datamodule.DialogueDataModule`.

* **Streaming.** One line is read, checked, its images decoded and the sample written before the next line is read:
  memory does not grow with the file.
* **Every line accounted for.** A line that fails (bad JSON, a schema problem, a missing or undecodable image) is
  skipped and reported with its line number, the turn and the field; the others import. Every error goes to
  ``import_errors.jsonl`` in the output folder as it happens, and ``import_report.json`` holds the counts and the
  first errors. Blank lines are counted, not errors.
* **Images** get the keys ``img0, img1, ...`` in order of first appearance (a reference used twice — the picture a
  later turn edits again — is one image). Each dialogue's ``meta["import"]`` records the source file, line, layout
  and the original reference of each key.
* **CFG dropout marks** follow a :class:`~chatumm_kit.data.droppable.DroppablePolicy` (default: the user turns
  answered with a generated image; see that module for why). The drop *rates* are a training setting
  (``data.drop_rates`` of a recipe), not stored in the shards.

Example:
    >>> report = import_dialogues("chats.jsonl", images="photos", out="data/chats")   # doctest: +SKIP
    >>> report.imported, report.skipped                                               # doctest: +SKIP
    (998, 2)
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatumm_kit.data.dialogue import DialogueError, DialogueSample, ImageSegment
from chatumm_kit.data.droppable import DroppablePolicy, mark_droppable
from chatumm_kit.data.image_files import ImageReadError, describe_ref, read_image
from chatumm_kit.data.import_formats import DialogueImportError, ImportFormat, ParsedDialogue, parse_line
from chatumm_kit.data.shards import INDEX_NAME, DialogueShardWriter, ShardFormatError

__all__ = ["ImportReport", "import_dialogues", "REPORT_NAME", "ERRORS_NAME", "DEFAULT_MAX_IMAGE_SIDE"]

logger = logging.getLogger(__name__)

REPORT_NAME = "import_report.json"
ERRORS_NAME = "import_errors.jsonl"
# Twice BAGEL's largest view side (VAE ≤ 1024, SPEC §4.1): headroom for other sizing policies, no 50-megapixel PNGs.
DEFAULT_MAX_IMAGE_SIDE = 2048


@dataclass
class ImportReport:
    """What an import did. Every non-blank line is either imported or skipped with an error in the errors file.

    Attributes:
        source: the JSONL file read.
        out: the shard folder written.
        lines: lines read (blank ones included).
        blank_lines: empty or whitespace-only lines (ignored).
        imported: dialogues written to shards.
        skipped: lines that failed; each has an entry in ``errors_file``.
        images: images written (after de-duplication within each dialogue).
        turns: turns written.
        droppable_segments: segments marked droppable in what was written.
        formats: layout → dialogues imported in it.
        shards: shard files finalised by this run.
        errors_file: path of the JSONL holding one ``{line, turn, field, reason}`` per skipped line.
        first_errors: the first few errors (the rest are in ``errors_file``).
        settings: the import settings, for the record.
    """

    source: str
    out: str
    lines: int = 0
    blank_lines: int = 0
    imported: int = 0
    skipped: int = 0
    images: int = 0
    turns: int = 0
    droppable_segments: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    errors_file: str = ""
    first_errors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few human lines: counts, then the first errors."""
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())) or "none"
        lines = [
            f"imported {self.imported} dialogue(s) ({fmts}; {self.turns} turns, {self.images} images, "
            f"{self.droppable_segments} droppable segments) into {len(self.shards)} shard(s) in {self.out}",
            f"read {self.lines} line(s): {self.imported} imported, {self.skipped} skipped, {self.blank_lines} blank",
        ]
        if self.skipped:
            lines.append(f"skipped lines (all {self.skipped} in {self.errors_file}):")
            lines.extend(f"  {DialogueImportError(**_error_kwargs(e))}" for e in self.first_errors)
            if self.skipped > len(self.first_errors):
                lines.append(f"  ... and {self.skipped - len(self.first_errors)} more")
        return "\n".join(lines)


def _error_kwargs(e: dict[str, Any]) -> dict[str, Any]:
    return {"reason": e["reason"], "line": e["line"], "turn": e["turn"], "field": e["field"]}


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        yield from enumerate(f, start=1)


def _with_pixels(
    parsed: ParsedDialogue, *, line: int, source: Path, images_dir: Path, max_side: int | None
) -> DialogueSample:
    """Read every referenced image, rename the references ``img0, img1, ...`` and record the originals in meta."""
    keys: dict[str, str] = {}
    images = {}
    for ref in parsed.dialogue.image_keys:
        key = f"img{len(keys)}"
        try:
            images[key] = read_image(ref, images_dir=images_dir, max_side=max_side)
        except ImageReadError as e:
            turn, where = parsed.image_fields.get(ref, (None, None))
            raise DialogueImportError(str(e), line=line, turn=turn, field=where) from None
        keys[ref] = key
    turns = [
        dataclasses.replace(
            t,
            segments=[
                dataclasses.replace(s, image=keys[s.image]) if isinstance(s, ImageSegment) else s for s in t.segments
            ],
        )
        for t in parsed.dialogue.turns
    ]
    record = {
        "file": source.name,
        "line": line,
        "format": parsed.format.value,
        "images": {key: describe_ref(ref) for ref, key in keys.items()},
    }
    dialogue = dataclasses.replace(parsed.dialogue, turns=turns, meta={**parsed.dialogue.meta, "import": record})
    return DialogueSample(dialogue=dialogue, images=images, key=f"{source.name}:{line}")


def import_dialogues(
    source: str | Path,
    *,
    out: str | Path,
    images: str | Path | None = None,
    format: ImportFormat | str = ImportFormat.AUTO,
    droppable: DroppablePolicy | str = DroppablePolicy.IMAGE_REPLIES,
    max_image_side: int | None = DEFAULT_MAX_IMAGE_SIDE,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "shard",
    append: bool = False,
    max_listed_errors: int = 20,
) -> ImportReport:
    """Import a JSONL of dialogues into shards (see the module docstring).

    Args:
        source: the JSONL file (``.gz`` is read compressed).
        out: the shard folder (created). Refused when it already holds an ``index.json``, unless ``append``.
        images: the folder relative image paths resolve against (default: the JSONL's folder).
        format: ``auto`` (per line), ``kit``, ``llava`` or ``openai``.
        droppable: which segments to mark for CFG dropout (:class:`DroppablePolicy`); marks in the input are kept.
        max_image_side: shrink images whose long side exceeds this (``None`` or ``0``: keep every size).
        samples_per_shard: dialogues per shard (multi-GPU training wants at least ranks × workers shards).
        image_format: ``png`` (lossless) or ``jpg`` for the images inside the shards.
        prefix: shard file prefix.
        append: add shards to an existing folder (numbering continues).
        max_listed_errors: errors kept in the report itself (all of them go to the errors file).

    Returns:
        the :class:`ImportReport` (also written to ``out/import_report.json``).

    Raises:
        FileNotFoundError: ``source`` or ``images`` does not exist.
        ShardFormatError: ``out`` already holds shards and ``append`` is off, or a writer setting is invalid.
    """
    source = Path(source)
    out = Path(out)
    if not source.is_file():
        raise FileNotFoundError(f"no such JSONL file: {source}")
    images_dir = Path(images) if images is not None else source.parent
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: no such folder")
    fmt = ImportFormat(format)
    policy = DroppablePolicy(droppable)
    if (out / INDEX_NAME).exists() and not append:
        raise ShardFormatError(f"{out} already holds shards ({INDEX_NAME}); pass --append to add to them")
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport(
        source=str(source),
        out=str(out),
        errors_file=str(out / ERRORS_NAME),
        settings={
            "format": fmt.value,
            "images": str(images_dir),
            "droppable": policy.value,
            "max_image_side": max_image_side,
            "samples_per_shard": samples_per_shard,
            "image_format": image_format,
        },
    )
    writer = DialogueShardWriter(
        directory=out, prefix=prefix, max_samples_per_shard=samples_per_shard, image_format=image_format
    )
    with writer, open(out / ERRORS_NAME, "w", encoding="utf-8") as errors:
        before = len(writer.index.shards)
        for line, text in _numbered_lines(source):
            report.lines += 1
            if not text.strip():
                report.blank_lines += 1
                continue
            try:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DialogueImportError(f"not valid JSON ({e})", line=line) from None
                parsed = parse_line(data, line=line, format=fmt)
                sample = _with_pixels(
                    parsed, line=line, source=source, images_dir=images_dir, max_side=max_image_side or None
                )
                sample = dataclasses.replace(sample, dialogue=mark_droppable(sample.dialogue, policy))
                try:
                    writer.write(sample)
                except (DialogueError, ShardFormatError) as e:  # the writer's own checks; the parser ran them first
                    raise DialogueImportError(str(e), line=line) from None
            except DialogueImportError as e:
                report.skipped += 1
                errors.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
                if len(report.first_errors) < max_listed_errors:
                    report.first_errors.append(e.to_dict())
                logger.debug("skipped %s", e)
                continue
            report.imported += 1
            report.formats[parsed.format.value] = report.formats.get(parsed.format.value, 0) + 1
            report.images += len(sample.images)
            report.turns += len(sample.dialogue.turns)
            report.droppable_segments += sum(s.droppable for t in sample.dialogue.turns for s in t.segments)
    report.shards = [s.name for s in writer.index.shards[before:]]
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    return report
