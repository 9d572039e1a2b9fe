"""``chatumm data``: dialogue data tools. ``chatumm data import JSONL --images DIR --out SHARDS_DIR``.

``import`` reads a JSONL of dialogues (the kit's layout, LLaVA ``conversations`` or OpenAI ``messages``; see
:mod:`chatumm_kit.data.import_formats`) and the images it references, and writes indexed shards
(:func:`chatumm_kit.data.importer.import_dialogues`). It prints a summary; bad lines are listed with their line
number, turn and field, and skipped. Exit code 0 when at least one dialogue was imported, 2 when none was or the
input cannot be read.

Example:
    $ chatumm data import chats.jsonl --images photos/ --out data/chats
    imported 998 dialogue(s) (llava 998; 4012 turns, 1210 images, 2420 droppable segments) into 1 shard(s) ...
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def _import(args: argparse.Namespace) -> int:
    from chatumm_kit.data.importer import import_dialogues
    from chatumm_kit.data.shards import ShardFormatError

    try:
        report = import_dialogues(
            args.jsonl,
            out=args.out,
            images=args.images,
            format=args.format,
            droppable=args.droppable,
            max_image_side=args.max_image_side,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            prefix=args.prefix,
            append=args.append,
        )
    except (FileNotFoundError, ShardFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"report: {args.out}/import_report.json")
    return 0 if report.imported else 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``data`` sub-commands on ``parser``."""
    from chatumm_kit.data.droppable import DroppablePolicy
    from chatumm_kit.data.import_formats import ImportFormat
    from chatumm_kit.data.importer import DEFAULT_MAX_IMAGE_SIDE

    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "import",
        help="a JSONL of dialogues + an image folder -> indexed shards",
        description="Import dialogues (kit, LLaVA or OpenAI layout, one JSON object per line) into shards.",
    )
    p.add_argument("jsonl", help="the dialogues, one JSON object per line (.jsonl or .jsonl.gz)")
    p.add_argument("--images", help="folder that relative image paths resolve against (default: the JSONL's folder)")
    p.add_argument("--out", required=True, help="shard folder to write (index.json, shard-NNNNNN.tar, the report)")
    p.add_argument(
        "--format",
        choices=[f.value for f in ImportFormat],
        default=ImportFormat.AUTO.value,
        help="input layout (default auto: per line, by its 'turns' / 'conversations' / 'messages' key)",
    )
    p.add_argument(
        "--droppable",
        choices=[d.value for d in DroppablePolicy],
        default=DroppablePolicy.IMAGE_REPLIES.value,
        help="which user segments CFG dropout may remove in training (default image-replies: the user turns "
        "answered with a generated image); marks in the input are kept",
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=DEFAULT_MAX_IMAGE_SIDE,
        help=f"shrink larger images to this long side before storing (default {DEFAULT_MAX_IMAGE_SIDE}; 0 keeps all)",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="dialogues per shard (default 1000)")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png", help="image encoding in the shards")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--append", action="store_true", help="add to a folder that already holds shards")
    p.set_defaults(data_run=_import)


def run(args: argparse.Namespace) -> int:
    return args.data_run(args)
