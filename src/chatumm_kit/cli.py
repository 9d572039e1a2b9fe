"""The ``chatumm`` command line.

Every command is one entry of :data:`COMMANDS`: a one-line help, a function that declares its arguments and a
function that runs it and returns the exit code. A new command (``synth``, ``chat``, ``eval``, ``convert``) is a new
entry; nothing else changes.

Example:
    >>> main(["validate", "shapes/chat_tiny", "trainer.max_steps=5"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chatumm_kit.config import (
    RecipeError,
    allow_list_from_args,
    load_recipe,
    recipes_root,
    to_yaml,
    using_allow_list,
    validate_recipe,
)

if TYPE_CHECKING:
    from chatumm_kit.inference.sampler import SamplerConfig

__all__ = ["Command", "COMMANDS", "main"]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe file, or a shipped recipe name such as shapes/chat_tiny")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value (add) or ~key (delete)")


def check_recipe(cfg) -> str:
    """Apply the checks of the command that would run ``cfg`` (the same function ``train``/``synth``/``eval``
    call before building anything); returns the kind found."""
    if "trainer" in cfg or "system" in cfg:
        from chatumm_kit.training.run import check_train_recipe

        check_train_recipe(cfg)
        return "train"
    if "synth" in cfg:
        from chatumm_kit.synth.pipeline import check_synth_recipe

        check_synth_recipe(cfg)
        return "synth"
    if "heldout" in cfg or "models" in cfg:
        from chatumm_kit.eval.cli import check_eval_recipe

        check_eval_recipe(cfg)
        return "eval"
    validate_recipe(cfg)
    return "recipe"


def _run_validate(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides, defaults={"resume_from": None} if _is_train(args) else None)
    kind = check_recipe(cfg)
    print(f"ok: {args.recipe} ({kind} recipe)")
    return 0


def _is_train(args: argparse.Namespace) -> bool:
    """Whether the recipe file is a training recipe (``resume_from`` is then a key it always understands)."""
    cfg = load_recipe(args.recipe)
    return "trainer" in cfg or "system" in cfg


def _run_print(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def _run_ls(args: argparse.Namespace) -> int:
    root = recipes_root()
    for path in sorted(root.rglob("*.yaml")):
        first = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{str(path.relative_to(root).with_suffix('')):40s} {first}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides, defaults={"resume_from": None})
    from chatumm_kit.data.streaming import DataStallError
    from chatumm_kit.training.run import run_training  # heavy imports only when training

    try:
        run_training(cfg)  # checks the whole recipe (check_train_recipe) before the first prepare step
    except DataStallError as e:  # the data cannot make a batch: one line, not a traceback or a silent spin
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    from chatumm_kit.synth.pipeline import SynthAborted, run_synth

    try:
        report = run_synth(cfg)  # checks the whole recipe (check_synth_recipe) before building anything
    except SynthAborted as e:  # the backend failed; finished shards are kept and a rerun resumes
        print(f"error: {e}", file=sys.stderr)
        return 1
    if report.written == 0:
        top = ", ".join(f"{k} {v}" for k, v in report.failures.most_common(3)) or "no candidate was made"
        print(f"error: synth wrote 0 dialogues ({report.attempted} dropped: {top}); see report.json", file=sys.stderr)
        return 1
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a ChatUMMSystem checkpoint (.ckpt file or sharded folder), a kit folder (chatumm convert bagel-to-kit) "
        "or a BAGEL release folder",
    )
    p.add_argument("--script", help="a JSON-lines dialogue script to play instead of chatting interactively")
    p.add_argument("--out", default="chat_out", help="where generated images (and replies.jsonl) go")
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="generated image size (default: square at the training data's VAE view cap, e.g. 1024 for BAGEL "
        "sizing, 32 for ShapesChat); a reply to an image keeps that image's size",
    )
    p.add_argument(
        "--preset", help="named sampler settings, e.g. bagel_t2i or bagel_edit (BAGEL's published ones); flags override"
    )
    p.add_argument("--steps", type=int, help="Euler steps per generated image (default 50; see --step-convention)")
    p.add_argument(
        "--step-convention",
        choices=("euler_steps", "bagel_timesteps"),
        help="what --steps counts: Euler steps (default), or BAGEL's num_timesteps (grid points = steps + 1)",
    )
    p.add_argument("--shift", type=float, help="timestep shift of the sampling grid (default 3.0)")
    p.add_argument("--cfg-text", type=float, help="text guidance scale (default 4.0)")
    p.add_argument("--cfg-image", type=float, help="image guidance scale (default 1.5)")
    p.add_argument(
        "--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help="guide while LO < t <= HI (default 0.4 1)"
    )
    p.add_argument(
        "--cfg-renorm",
        choices=("none", "global", "channel", "text_channel"),
        help="velocity renorm after guidance (default global)",
    )
    p.add_argument("--cfg-renorm-min", type=float, help="lower clamp of the renorm factor (default 0)")
    p.add_argument(
        "--cfg-skip-rule", choices=("kit", "bagel"), help="bagel: no guidance at all at text scale 1 (default kit)"
    )
    p.add_argument(
        "--mode",
        choices=("auto", "text", "image", "edit", "think", "think_text", "think_image", "think_edit"),
        default="auto",
        help="task of every reply: auto = the model predicts it; text (VQA), image (text-to-image), edit (output "
        "takes the edited image's size) force it, as a converted BAGEL needs; think_text / think_image / think_edit "
        "reason inside <think> </think> first (BAGEL's think mode), think lets the predicted intent pick the output",
    )
    p.add_argument("--system", help="a system prompt the conversation starts with")
    p.add_argument("--think-image-prompt", help="system prompt of think mode before an image (default BAGEL's)")
    p.add_argument("--think-text-prompt", help="system prompt of think mode before a text answer (default BAGEL's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy text decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of text and intents (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="cap per text segment (default 64)")
    p.add_argument("--max-segments", type=int, default=4, help="segments per reply at most (default 4)")
    p.add_argument(
        "--view-sizing",
        choices=("bagel", "capped"),
        help="how every upload's two views (and generated images) are sized: bagel = VAE 512-1024/16, ViT "
        "224-980/14 (SPEC §4.1); capped = both views shrink to the larger --image-size side; default: the training "
        "data's policy stored in the checkpoint, else capped",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights were saved")
    p.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda or cuda:1 (default cpu)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "float64"),
        help="cast the loaded weights to this dtype (default: as stored)",
    )
    p.add_argument("--adapter", help="a LoRA adapter folder (peft layout) to run unmerged on top of the checkpoint")
    p.add_argument(
        "--user-image-views",
        choices=("vae+vit", "vit"),
        help="the views an uploaded image enters as: vit = the ViT view only, as BAGEL's understanding mode (the "
        "default for converted BAGEL weights not trained by the kit); vae+vit = the kit's training layout (the "
        "default for checkpoints). image and edit replies always get VAE + ViT",
    )


def chat_sampler_config(args: argparse.Namespace) -> SamplerConfig:
    """The :class:`SamplerConfig` of ``chatumm chat``'s flags: ``--preset`` (or the defaults), then every flag given.

    Example:
        >>> ns = argparse.Namespace(preset="bagel_edit", steps=10, seed=0)
        >>> cfg = chat_sampler_config(ns)
        >>> (cfg.cfg_renorm, cfg.num_steps, cfg.step_convention)
        ('text_channel', 10, 'bagel_timesteps')
    """
    import dataclasses

    from chatumm_kit.inference.sampler import SamplerConfig
    from chatumm_kit.inference.sampler_presets import sampler_preset

    flags = {
        "num_steps": "steps",
        "step_convention": "step_convention",
        "shift": "shift",
        "cfg_text_scale": "cfg_text",
        "cfg_image_scale": "cfg_image",
        "cfg_interval": "cfg_interval",
        "cfg_renorm": "cfg_renorm",
        "renorm_min": "cfg_renorm_min",
        "cfg_skip_rule": "cfg_skip_rule",
        "seed": "seed",
    }
    given = {field: getattr(args, flag, None) for field, flag in flags.items()}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}
    preset = getattr(args, "preset", None)
    base = sampler_preset(preset) if preset else SamplerConfig()
    return dataclasses.replace(base, **given)


def _run_chat(args: argparse.Namespace) -> int:
    """``chatumm chat``: load the checkpoint, build the session, hand it to the chat loop of
    :mod:`chatumm_kit.inference.chat_loop` (interactive on stdin, or ``--script``)."""
    import dataclasses
    from pathlib import Path

    from chatumm_kit.inference.chat_loop import interactive, play_script
    from chatumm_kit.inference.session import ChatSession, SessionConfig, check_reply_options, user_image_views_for
    from chatumm_kit.training.loading import (
        checkpoint_view_sizing,
        is_model_folder,
        load_checkpoint,
        load_model_folder,
    )

    # Settings and the script are checked before the (slow) checkpoint load: a typo costs one line, not a minute.
    try:
        sampler = chat_sampler_config(args)
        respond_kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_segments": args.max_segments,
            "mode": args.mode,
        }
        check_reply_options(**respond_kwargs)
        if args.image_size:
            SessionConfig(image_size=tuple(args.image_size))
        prompts = {"think_image_prompt": args.think_image_prompt, "think_text_prompt": args.think_text_prompt}
        think_prompts = {k: v for k, v in prompts.items() if v is not None}
        SessionConfig(**think_prompts)  # an empty prompt fails here, before the load
        if args.system is not None and not args.system:
            raise ValueError("--system: the system prompt is empty")
        if args.script and not Path(args.script).is_file():
            raise ValueError(f"no such script file: {args.script}")
        import torch

        dtype = getattr(torch, args.dtype) if args.dtype else None
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
        if is_model_folder(args.checkpoint):  # a converted model, not a training checkpoint
            loaded = load_model_folder(args.checkpoint, device=device, dtype=dtype)
        else:
            loaded = load_checkpoint(
                args.checkpoint, use_ema=False if args.no_ema else None, device=args.device, dtype=dtype
            )
        if args.adapter:
            from chatumm_kit.training.adapters import load_adapter

            load_adapter(loaded.model, args.adapter).eval()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # every upload is sized by the policy: the flag's, else the training data's (SPEC §4.1)
    given = getattr(args, "view_sizing", None)
    if given is not None:
        sizing = given
    elif is_model_folder(args.checkpoint):  # BAGEL's own sizing when the model's strides are BAGEL's (14 / 16)
        bagel_strides = (loaded.model.vit_patch_size, loaded.model.vae_token_stride) == (14, 16)
        sizing = "bagel" if bagel_strides else None
    else:
        sizing = checkpoint_view_sizing(args.checkpoint, model=loaded.model)
    sizing = None if sizing == "capped" else sizing
    image_size = tuple(args.image_size) if args.image_size else (None if sizing else (32, 32))
    views = args.user_image_views or user_image_views_for(loaded.weights_origin)
    print(f"user images enter as: {views} ({loaded.weights_origin.value} weights; --user-image-views to change)")
    try:
        config = SessionConfig.for_model(
            loaded.model, image_size=image_size, view_sizing=sizing, user_image_views=views
        )
        config = dataclasses.replace(config, **think_prompts)
        session = ChatSession(model=loaded.model, tokenizer=loaded.tokenizer, config=config, system=args.system)
    except ValueError as e:  # e.g. --view-sizing bagel on a model whose ViT patch is not 14
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.script:
        try:
            defaults = {k: v for k, v in respond_kwargs.items() if k != "mode"}
            replies, failed = play_script(
                session, args.script, out=out, sampler=sampler, mode=args.mode, respond_defaults=defaults
            )
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"replies: {replies}" + (f" ({failed} script line(s) failed, see above)" if failed else ""))
        return 2 if failed else 0
    interactive(session, sampler=sampler, out=out, lines=sys.stdin, write=sys.stdout, respond_kwargs=respond_kwargs)
    return 0


def _delegated(help_line: str, module: str) -> Command:
    """A command implemented in ``module`` (``add_arguments(parser)`` and ``run(args) -> int``), imported lazily so
    ``chatumm --help`` stays fast."""

    def load():
        import importlib

        return importlib.import_module(module)

    return Command(help_line, lambda p: load().add_arguments(p), lambda a: load().run(a))


COMMANDS: dict[str, Command] = {
    "train": Command("train a recipe: chatumm train RECIPE [key=value ...]", _recipe_args, _run_train),
    "validate": Command("check a recipe without building anything", _recipe_args, _run_validate),
    "print": Command("print a recipe with overrides applied and interpolations resolved", _recipe_args, _run_print),
    "ls": Command("list the recipes shipped with the kit", lambda p: None, _run_ls),
    "synth": Command("synthesise conversational dialogues into shards: chatumm synth RECIPE", _recipe_args, _run_synth),
    "convert": _delegated(
        "convert checkpoints: chatumm convert KIND SOURCE OUTPUT (BAGEL, Qwen2, SigLIP, FLUX VAE)",
        "chatumm_kit.convert.cli",
    ),
    "chat": Command("chat with a trained model: chatumm chat CHECKPOINT [--script FILE]", _chat_args, _run_chat),
    "data": _delegated(
        "dialogue data tools: chatumm data import JSONL --images DIR --out SHARDS_DIR", "chatumm_kit.data.import_cli"
    ),
    "adapter": _delegated(
        "LoRA adapters: chatumm adapter export CHECKPOINT OUT | merge BASE_KIT ADAPTER OUT [--to bagel|kit]",
        "chatumm_kit.training.adapter_cli",
    ),
    "plan": _delegated(
        "memory plan of a training recipe on the meta device: chatumm plan RECIPE [key=value ...]",
        "chatumm_kit.training.plan_cli",
    ),
    "eval": _delegated("run the multi-turn context-tracking benchmark: chatumm eval ...", "chatumm_kit.eval.cli"),
    "diagnose-edits": _delegated(
        "where a benchmark report's models lose their edits: chatumm diagnose-edits REPORT [--json]",
        "chatumm_kit.eval.edit_diagnosis_cli",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``chatumm`` parser. ``only``: give just that command its arguments (the others keep their help line) —
    a delegated command imports its module to declare them, so ``main`` builds only the one it runs; ``""`` builds
    none (``chatumm --help``); ``None`` builds all."""
    parser = argparse.ArgumentParser(
        prog="chatumm", description="chatumm_kit: conversational unified multimodal models"
    )
    trust = parser.add_argument_group(
        "what recipes may build",
        "A recipe builds only the callables on the kit's allow-list (README: Recipes cannot run code). "
        "These options widen it for one command, nested recipes of prepare steps included.",
    )
    trust.add_argument(
        "--allow",
        action="append",
        metavar="DOTTED",
        help="also allow this one callable, exactly as written (e.g. mylab.models.MyNet); repeatable",
    )
    trust.add_argument(
        "--allow-root",
        action="append",
        metavar="PACKAGE",
        help="also allow every public callable defined under this package (e.g. mylab); repeatable",
    )
    trust.add_argument(
        "--trust-recipe",
        action="store_true",
        help="allow ANY public callable: the recipe can then run arbitrary code, like a Python script you run",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if only is None or only == name:
            cmd.add_arguments(p)
    return parser


def chosen_command(argv: Sequence[str]) -> str:
    """The command ``argv`` names (the first word that is one, skipping the values of ``--allow`` and
    ``--allow-root``), or ``""``."""
    words = iter(argv)
    for word in words:
        if word in ("--allow", "--allow-root"):
            next(words, None)
        elif word in COMMANDS:
            return word
        elif not word.startswith("-"):
            break
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=chosen_command(argv))  # imports only what the chosen command needs
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with using_allow_list(allow_list_from_args(args)):
            return COMMANDS[args.command].run(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
