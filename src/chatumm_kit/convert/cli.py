"""``chatumm convert``: checkpoint conversion between foreign layouts and the kit's model folder.

Sub-commands (each ``SOURCE OUTPUT``):

* ``bagel-to-kit`` — a BAGEL release folder -> kit folder (``model.safetensors`` + ``model.json`` model spec +
  tokenizer). ``model.json`` is what a recipe puts under ``system.model``; ``model.safetensors`` its ``init_from``.
* ``kit-to-bagel`` — a kit ChatUMM folder, or a training checkpoint of ``ChatUMMSystem`` (a ``*.ckpt`` file or a
  sharded FSDP2 folder; ``--ema`` takes its EMA weights) -> BAGEL release folder (``llm_config.json``,
  ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``, tokenizer). This is how a fine-tuned model is
  released: ``load_bagel`` reads the folder back to the same logits.
* ``qwen2-to-kit`` — a Qwen2/2.5 HF folder -> kit folder holding a ``MoTBackbone`` (both experts = the checkpoint).
* ``siglip-to-kit`` — a SigLIP HF folder -> kit folder holding a ``ViTEncoder`` (fresh connector).
* ``flux-to-diffusers`` — a FLUX ``ae.safetensors`` -> a diffusers ``AutoencoderKL`` folder (``save_pretrained``).

A kit folder of one component stores ``{"_component_": "<class path>", **constructor arguments}`` in ``model.json``,
so a recipe can instantiate it. The lead registers the command as ``COMMANDS["convert"] = Command(help,
add_arguments, run)`` in ``chatumm_kit/cli.py``.

Example:
    $ chatumm convert bagel-to-kit /ckpt/BAGEL-7B-MoT /ckpt/bagel_kit --dtype bfloat16
    $ chatumm convert kit-to-bagel /ckpt/bagel_kit /ckpt/BAGEL-copy
    $ chatumm convert kit-to-bagel runs/bagel_7b/sft_chat_fsdp/checkpoints/last.ckpt /ckpt/BAGEL-chat --ema
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatumm_kit.convert.provenance import WeightsOrigin, read_weights_origin, write_weights_origin

__all__ = ["DTYPES", "add_arguments", "run"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _component_spec(module: nn.Module) -> dict[str, Any]:
    """``{"_component_": class path, **hparams}`` for a kit component that saved its hyperparameters."""
    cls = type(module)
    return {"_component_": f"{cls.__module__}.{cls.__qualname__}", **dict(module.hparams)}


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPES[args.dtype] if args.dtype else None


def _say(out: Path, what: str, module: nn.Module) -> None:
    n = sum(p.numel() for p in module.parameters())
    print(f"wrote {out} ({what}, {n:,} parameters)")


def _read_vae(path: str):
    from diffusers import AutoencoderKL

    from chatumm_kit.convert.flux_vae import load_flux_vae

    p = Path(path)
    if p.is_dir():  # a local diffusers folder (never a hub id: the path must exist)
        return AutoencoderKL.from_pretrained(str(p))
    if p.is_file():
        return load_flux_vae(p)
    raise FileNotFoundError(f"--vae {path}: neither an ae.safetensors file nor a diffusers AutoencoderKL folder")


def _bagel_to_kit(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import load_bagel, save_kit_folder

    vae = _read_vae(args.vae) if args.vae else None
    loaded = load_bagel(args.source, vae=vae, dtype=_dtype(args), attn_backend=args.attn_backend)
    out = save_kit_folder(loaded.model, loaded.model_spec, args.output, tokenizer=loaded.tokenizer)
    write_weights_origin(out, read_weights_origin(args.source))  # BAGEL's release, unless the folder says otherwise
    _say(out, "ChatUMM, chatumm_kit.convert.bagel.chatumm_bagel", loaded.model)
    return 0


def _kit_to_bagel(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import SPEC_FILE, BagelConversionError, export_bagel, load_kit_folder
    from chatumm_kit.model import ChatUMM

    source = Path(args.source)
    if (source / SPEC_FILE).is_file():  # a kit folder
        if args.ema:
            raise BagelConversionError(f"{source}: --ema applies to training checkpoints, not to a kit folder")
        kit = load_kit_folder(source, dtype=_dtype(args))
        module, tokenizer, what = kit.module, kit.tokenizer, "kit folder"
        origin = read_weights_origin(source)
    else:  # a ChatUMMSystem training checkpoint: a *.ckpt file or a sharded (FSDP2) checkpoint folder
        from chatumm_kit.training.checkpoints import is_sharded_checkpoint
        from chatumm_kit.training.loading import load_checkpoint

        if not (source.is_file() or is_sharded_checkpoint(source)):
            raise FileNotFoundError(
                f"{source}: neither a kit folder (missing {SPEC_FILE}) nor a training checkpoint (a *.ckpt file or a "
                "sharded checkpoint folder)"
            )

        loaded = load_checkpoint(source, use_ema=bool(args.ema))
        module, tokenizer = loaded.model, loaded.tokenizer
        if _dtype(args) is not None:
            module.to(_dtype(args))
        what = "EMA weights" if loaded.ema else "raw weights"
        origin = WeightsOrigin.KIT_TRAINED
    if not isinstance(module, ChatUMM):
        raise BagelConversionError(
            f"{args.source}: holds a {type(module).__name__}, not a ChatUMM; only a whole model exports to BAGEL"
        )
    out = export_bagel(module, args.output, tokenizer=tokenizer)
    write_weights_origin(out, origin)
    _say(out, f"BAGEL release folder from the {what}", module)
    return 0


def _qwen2_to_kit(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import save_kit_folder
    from chatumm_kit.convert.qwen2 import load_qwen2_folder

    overrides = {} if args.qk_norm is None else {"qk_norm": args.qk_norm}
    backbone = load_qwen2_folder(args.source, dtype=_dtype(args) or torch.float32, **overrides)
    out = save_kit_folder(backbone, _component_spec(backbone), args.output)
    _say(out, "MoTBackbone", backbone)
    return 0


def _siglip_to_kit(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.bagel import save_kit_folder
    from chatumm_kit.convert.siglip import load_siglip_vit

    vit = load_siglip_vit(
        args.source,
        llm_hidden=args.llm_hidden,
        drop_last_layer=args.drop_last_layer,
        max_patches_per_side=args.max_patches_per_side,
        config_name=args.config_name,
        dtype=_dtype(args),
    )
    out = save_kit_folder(vit, _component_spec(vit), args.output)
    _say(out, "ViTEncoder", vit)
    return 0


def _flux_to_diffusers(args: argparse.Namespace) -> int:
    from chatumm_kit.convert.flux_vae import load_flux_vae

    ae = load_flux_vae(args.source, norm_num_groups=args.norm_num_groups, dtype=_dtype(args))
    out = Path(args.output)
    ae.save_pretrained(str(out), safe_serialization=True)
    _say(out, "diffusers AutoencoderKL", ae)
    return 0


def _io(p: argparse.ArgumentParser, source: str, output: str, *, dtype: bool = True) -> None:
    p.add_argument("source", help=source)
    p.add_argument("output", help=output)
    if dtype:
        p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``convert`` sub-commands on ``parser``."""
    sub = parser.add_subparsers(dest="convert_kind", metavar="KIND", required=True)

    p = sub.add_parser("bagel-to-kit", help="BAGEL release folder -> kit folder (weights + model spec)")
    _io(p, "BAGEL release folder", "kit folder to write")
    p.add_argument(
        "--vae", help="VAE when the folder has no ae.safetensors: an ae.safetensors file or a diffusers folder"
    )
    p.add_argument("--attn-backend", choices=("flex", "sdpa"), default="flex", help="written into the model spec")
    p.set_defaults(convert_run=_bagel_to_kit)

    p = sub.add_parser("kit-to-bagel", help="kit ChatUMM folder or training checkpoint -> BAGEL release folder")
    _io(p, "kit folder (model.json + model.safetensors) or ChatUMMSystem checkpoint", "BAGEL release folder to write")
    p.add_argument("--ema", action="store_true", help="a checkpoint's EMA weights (default: its raw weights)")
    p.set_defaults(convert_run=_kit_to_bagel)

    p = sub.add_parser("qwen2-to-kit", help="Qwen2/2.5 HF folder -> kit MoTBackbone folder")
    _io(p, "Qwen2 HF folder (config.json + safetensors)", "kit folder to write")
    p.add_argument(
        "--qk-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force q/k RMS-norm on/off (default: whether the checkpoint has q/k-norm weights)",
    )
    p.set_defaults(convert_run=_qwen2_to_kit)

    p = sub.add_parser("siglip-to-kit", help="SigLIP HF folder -> kit ViTEncoder folder")
    _io(p, "SigLIP HF folder (config.json + safetensors)", "kit folder to write")
    p.add_argument("--llm-hidden", type=int, required=True, help="connector output width (the LLM hidden size)")
    p.add_argument("--drop-last-layer", action="store_true", help="use depth - 1 layers (BAGEL's penultimate layer)")
    p.add_argument(
        "--max-patches-per-side", type=int, default=None, help="position grid side (default: the checkpoint's)"
    )
    p.add_argument("--config-name", default="config.json", help="config file in the folder (BAGEL: vit_config.json)")
    p.set_defaults(convert_run=_siglip_to_kit)

    p = sub.add_parser(
        "flux-to-diffusers", help="FLUX ae.safetensors (original layout) -> diffusers AutoencoderKL folder"
    )
    _io(p, "ae.safetensors file", "diffusers folder to write")
    p.add_argument(
        "--norm-num-groups", type=int, default=32, help="GroupNorm groups (not stored in the file; FLUX: 32)"
    )
    p.set_defaults(convert_run=_flux_to_diffusers)


def run(args: argparse.Namespace) -> int:
    """Run the chosen sub-command; 0 on success, 2 (with ``error: ...`` on stderr) when the input does not convert."""
    try:
        return args.convert_run(args)
    except (ValueError, FileNotFoundError) as err:  # the converters' errors are ValueError subclasses naming the fault
        print(f"error: {err}", file=sys.stderr)
        return 2
