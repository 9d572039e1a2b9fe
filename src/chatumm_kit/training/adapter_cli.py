"""``chatumm adapter``: LoRA adapters in and out (see :mod:`chatumm_kit.training.adapters`).

Sub-commands:

* ``export CHECKPOINT OUT_DIR`` — the adapter of a LoRA training checkpoint (EMA weights when saved) alone, in
  ``peft``'s layout (``adapter_model.safetensors`` + ``adapter_config.json``).
* ``merge BASE ADAPTER_DIR OUT_DIR`` — load the adapter onto a converted base (a kit folder written by
  ``chatumm convert bagel-to-kit``), fold it into the weights, and write a BAGEL release folder (``--to bagel``, the
  ``kit-to-bagel`` exporter) or a kit folder (``--to kit``).

Example:
    $ chatumm adapter export runs/bagel_7b/lora_chat/checkpoints/last.ckpt runs/bagel_7b/lora_chat/adapter
    $ chatumm adapter merge runs/bagel_7b/kit runs/bagel_7b/lora_chat/adapter runs/bagel_7b/BAGEL-lora-chat
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="write a LoRA checkpoint's adapter alone (peft layout)")
    export.add_argument("checkpoint", help="a ChatUMMSystem checkpoint trained with system.adapter")
    export.add_argument("out", help="the adapter folder to write")
    export.add_argument("--no-ema", action="store_true", help="the raw weights even if EMA weights were saved")
    export.add_argument("--base", default=None, help="recorded as base_model_name_or_path (e.g. the kit folder)")
    merge = sub.add_parser("merge", help="merge an adapter into a converted base and export it")
    merge.add_argument("base", help="a kit folder (chatumm convert bagel-to-kit) the adapter was trained on")
    merge.add_argument("adapter", help="an adapter folder (chatumm adapter export)")
    merge.add_argument("out", help="the folder to write")
    merge.add_argument("--to", choices=("bagel", "kit"), default="bagel", help="BAGEL release folder or kit folder")


def _export(args: argparse.Namespace) -> int:
    from chatumm_kit.training.adapters import has_adapter, parameter_counts, save_adapter
    from chatumm_kit.training.loading import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, use_ema=False if args.no_ema else None)
    if not has_adapter(loaded.model):
        print(f"error: {args.checkpoint} was not trained with system.adapter (no LoRA in it)", file=sys.stderr)
        return 2
    out = save_adapter(loaded.model, args.out, base=args.base)
    n = parameter_counts(loaded.model).trainable
    print(f"wrote {out} ({n:,} adapter parameters, {'EMA' if loaded.ema else 'raw'} weights)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import export_bagel, load_kit_folder, save_kit_folder
    from chatumm_kit.convert.provenance import WeightsOrigin, write_weights_origin
    from chatumm_kit.training.adapters import load_adapter, merge_adapter

    kit = load_kit_folder(args.base)
    model = merge_adapter(load_adapter(kit.module, args.adapter))
    if args.to == "bagel":
        out = export_bagel(model, args.out, tokenizer=kit.tokenizer)
    else:
        out = save_kit_folder(model, kit.spec, args.out, tokenizer=kit.tokenizer)
    write_weights_origin(out, WeightsOrigin.KIT_TRAINED)  # the adapter was trained by the kit
    print(f"wrote {out} ({args.to} folder, adapter {args.adapter} merged into {args.base})")
    return 0


def run(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import BagelConversionError
    from chatumm_kit.training.adapters import AdapterError

    try:
        return {"export": _export, "merge": _merge}[args.adapter_command](args)
    except (FileNotFoundError, AdapterError, BagelConversionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()


def _main() -> int:  # pragma: no cover - `python -m chatumm_kit.training.adapter_cli`
    parser = argparse.ArgumentParser(prog="chatumm adapter")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
