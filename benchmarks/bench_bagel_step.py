"""A few FSDP2 bf16 training steps of the BAGEL recipe on a BAGEL-7B-shaped model cut to a few layers (issue 13).

The system is the ``bagel_7b/sft_chat_fsdp`` recipe's ``ChatUMMSystem`` (its optimizer, freezing, fp32
``master_dtype``) with the model replaced by BAGEL-7B's architecture — Qwen2.5-7B MoT widths, SigLIP so400m, FLUX
VAE — with ``--layers`` decoder layers (and as many ViT layers), random weights. The model is first built on the
meta device for ``chatumm plan``'s prediction (:func:`chatumm_kit.training.plan.plan_training`), then built on the
device, sharded with the recipe's FSDP2 plan (bf16 compute, fp32 reduce, activation checkpointing per layer) on a
one-process mesh, and trained ``--steps`` steps (after ``--warmup``) on packed dialogues of real-size images
(user photo in, generated image out: ViT + clean VAE + noised VAE views) filling ``--tokens``.

Reported: step time, tokens/s, achieved TFLOP/s and MFU (useful FLOPs of the decoder, lm_head on CE positions and the
ViT; recompute not counted; attention pairs counted from the mask, as ``bench_train.step_flops`` does) against the
device's dense bf16 peak (``--peak-tflops``, default H100/H200 989), peak memory (``max_memory_allocated``) beside
the plan's per-device total for the same model, tokens and layout.

``--device cpu --tiny`` runs the same path on a tiny BAGEL-shaped model on CPU (gloo, fp32: FSDP2 bf16 needs CUDA),
so a test can smoke it; its MFU is ``null`` and its peak memory the process's max RSS.

    python benchmarks/bench_bagel_step.py [--device cuda] [--layers 2] [--tokens 8192] [--steps 5] [--json]
    python benchmarks/bench_bagel_step.py --device cpu --tiny --steps 2 --json

Example:
    >>> result = main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--json"])  # doctest: +SKIP
    >>> sorted(k for k in ("mfu", "peak_mem_gib", "plan_mem_gib") if k in result)                 # doctest: +SKIP
    ['mfu', 'peak_mem_gib', 'plan_mem_gib']
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import step_flops  # noqa: E402  (the one FLOP rule of the decoder)

from chatumm_kit.components.mot import GEN_SUFFIX  # noqa: E402
from chatumm_kit.components.tokenizer import ChatTokenizer  # noqa: E402
from chatumm_kit.config import instantiate, load_recipe  # noqa: E402
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn  # noqa: E402
from chatumm_kit.data.packing import CFGDropRates, Packer  # noqa: E402
from chatumm_kit.data.view_sizing import ViewRule, ViewSizing  # noqa: E402
from chatumm_kit.training.losses import objective  # noqa: E402
from chatumm_kit.training.plan import GIB, RunShape, plan_training  # noqa: E402
from chatumm_kit.training.strategies import FSDP2Plan, apply_fsdp2  # noqa: E402

RECIPE = "bagel_7b/sft_chat_fsdp"
PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def bagel_7b_spec(layers: int) -> dict[str, Any]:
    """BAGEL-7B-MoT's architecture (SPEC §5) with ``layers`` decoder and ViT layers."""
    from chatumm_kit.components.vae import FLUX_VAE_KWARGS

    return {
        "_component_": "chatumm_kit.convert.bagel.chatumm_bagel",
        "backbone": dict(vocab_size=152064, hidden_size=3584, num_layers=layers, num_heads=28, num_kv_heads=4,
                         head_dim=128, intermediate_size=18944, rope_theta=1e6, attn_backend="flex"),
        "vit": dict(patch_size=14, hidden=1152, num_layers=layers, num_heads=16, mlp_dim=4304, max_patches_per_side=70,
                    llm_hidden=3584),
        "vae": dict(hidden=3584, autoencoder_kwargs=dict(FLUX_VAE_KWARGS), max_latent_side=64),
    }  # fmt: skip


def tiny_spec(layers: int) -> dict[str, Any]:
    """A BAGEL-shaped model small enough for a CPU smoke run (32-pixel images)."""
    ae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return {
        "_component_": "chatumm_kit.convert.bagel.chatumm_bagel",
        "backbone": dict(vocab_size=512, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                         intermediate_size=128, attn_backend="sdpa"),
        "vit": dict(patch_size=4, hidden=32, num_layers=layers, num_heads=2, mlp_dim=64, max_patches_per_side=8,
                    llm_hidden=64),
        "vae": dict(hidden=64, autoencoder_kwargs=ae, max_latent_side=8),
    }  # fmt: skip


def packed_batch(*, tokens: int, image_size: tuple[int, int], view_sizing: ViewSizing):
    """Dialogues (a photo in, a generated image out) packed until ``tokens`` would overflow; returns the batch. Views
    are sized by ``view_sizing`` (the recipe's ``ViewSizing.bagel`` preset for the 7B shape)."""
    tok = ChatTokenizer.train(["draw the same scene at night", "what is in this photo"] * 20, vocab_size=300)
    g = torch.Generator().manual_seed(0)
    packer = Packer(tokenizer=tok, view_sizing=view_sizing, drop_rates=CFGDropRates(text=0.0, vit=0.0, vae=0.0))
    samples: list[DialogueSample] = []
    batch = None
    while True:
        i = len(samples)
        d = Dialogue(id=f"d{i}", turns=[
            Turn(role=Role.USER, segments=[ImageSegment(image="in"), TextSegment(text="what is in this photo")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="a street; here it is at night"),
                                                ImageSegment(image="out")])])  # fmt: skip
        images = {k: torch.randint(0, 256, (3, *image_size), dtype=torch.uint8, generator=g) for k in ("in", "out")}
        sample = DialogueSample(dialogue=d, images=images, key=f"d{i}")
        trial = packer.pack([*samples, sample])
        if trial.seq_len > tokens and batch is not None:
            return batch
        samples.append(sample)
        batch = trial


def _model_flops(model, batch) -> float:
    """Useful FLOPs of one step: decoder (``bench_train.step_flops``), lm_head on CE positions, the ViT's matmuls."""
    cfg = model.backbone.config
    expert = sum(p.numel() for n, p in model.backbone.layers.named_parameters() if GEN_SUFFIX not in n)
    decoder = step_flops(cfg, batch.splits, expert_params=expert)
    head = 6.0 * cfg.hidden_size * cfg.vocab_size * int(batch.ce_indices.numel())
    vit = 6.0 * sum(p.numel() for p in model.vit.parameters()) * int(batch.vit_patches.shape[0])
    return decoder + head + vit


def _init_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device(args.device)
    spec = tiny_spec(args.layers) if args.tiny else bagel_7b_spec(args.layers)
    cfg = load_recipe(RECIPE)
    node = {**OmegaConf.to_container(cfg.system, resolve=True), "model": spec}
    node.pop("init_from", None)
    strategy = cfg.trainer.strategy
    mixed = strategy.mixed_precision if device.type == "cuda" else None  # bf16 FSDP2 needs CUDA
    if args.tiny:  # BAGEL's rule at the tiny model's size: ViT patch 4 and VAE stride 4, 8 per side
        sizing = ViewSizing(
            vit=ViewRule(min_side=8, max_side=32, stride=4), vae=ViewRule(min_side=16, max_side=32, stride=4)
        )
    else:
        sizing = instantiate(cfg.data.view_sizing, path="data.view_sizing")  # the recipe's ViewSizing.bagel
    image_size = (32, 24) if args.tiny else (args.image_height, args.image_width)
    batch = packed_batch(tokens=args.tokens, image_size=image_size, view_sizing=sizing)

    meta_system = instantiate(node, path="system")
    with torch.device("meta"):
        meta_system.configure_model()
    shape = RunShape(strategy="fsdp2", devices=1, tokens=batch.seq_len,
                     compute_dtype="bfloat16" if mixed else "float32",
                     activation_checkpointing=bool(strategy.activation_checkpointing),
                     ce_fraction=batch.ce_indices.numel() / batch.seq_len)  # fmt: skip
    plan = plan_training(meta_system.model, shape)

    _init_process_group(device)
    torch.manual_seed(0)
    system = instantiate(node, path="system")
    with device:
        system.configure_model()  # random init, on the device; master_dtype fp32 as the recipe says
    model = system.model.train()
    mesh = init_device_mesh(device.type, (1,))
    apply_fsdp2(model, device_mesh=mesh,
                plan=FSDP2Plan(mixed_precision=mixed, activation_checkpointing=bool(strategy.activation_checkpointing)))  # fmt: skip
    optimizer = system.configure_optimizers()["optimizer"]
    batch = batch.to(device)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        out = model(batch, generator=generator)
        terms = objective(out, ce_weight=1.0, mse_weight=1.0)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        return float(terms.total.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync()
    dt = (time.perf_counter() - start) / max(args.steps, 1)
    flops = _model_flops(model, batch)
    peak_tflops = args.peak_tflops if device.type == "cuda" else None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / GIB
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "layers": args.layers,
        "tiny": bool(args.tiny),
        "params": plan.total_params,
        "tokens": batch.seq_len,
        "step_s": dt,
        "tokens_per_s": batch.seq_len / dt,
        "tflops": flops / dt / 1e12,
        "mfu": flops / dt / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_mem_gib": peak_mem,
        "plan_mem_gib": plan.total_gib,
        "plan_weights_gib": plan.weight_bytes / GIB,
        "plan_activations_gib": plan.activation_bytes / GIB,
        "losses": losses,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny BAGEL-shaped model (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=2, help="decoder (and ViT) layers (default 2)")
    ap.add_argument("--tokens", type=int, default=8192, help="packed tokens per step, at most (default 8192)")
    ap.add_argument("--image-height", type=int, default=512, help="image height in pixels (default 512)")
    ap.add_argument("--image-width", type=int, default=512, help="image width in pixels (default 512)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2; flex compiles here)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="device dense bf16 peak, TFLOP/s")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    args = ap.parse_args(argv)
    if args.tiny and args.tokens == 8192:
        args.tokens = 512
    result = run(args)
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no GPU peak)"
    rows = [
        ("device", result["device"]),
        ("model", f"{'tiny' if args.tiny else 'BAGEL-7B'}-shaped, {args.layers} layers, {result['params']:,} params"),
        ("tokens / step", f"{result['tokens']:,}"),
        ("step time", f"{result['step_s'] * 1e3:.1f} ms"),
        ("tokens / s", f"{result['tokens_per_s']:,.0f}"),
        ("achieved", f"{result['tflops']:.2f} TFLOP/s, MFU {mfu}"),
        ("peak memory", f"{result['peak_mem_gib']:.2f} GiB (chatumm plan predicts {result['plan_mem_gib']:.2f} GiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
