"""Does the data pipeline keep up with training? DialogueDataModule throughput beside the tiny model's consumption.

Writes synthetic shards to a temporary directory (dialogues of 2–8 turns with 32×32 images), streams one epoch
through :class:`~chatumm_kit.data.datamodule.DialogueDataModule` with 2 DataLoader workers (samples/s and packed
tokens/s), then times forward + backward + optimiser step of ``chatumm_tiny`` on the same packed batches (tokens/s).
The ratio data/train above 1 means the loader outpaces training. Both run on this machine's CPU, one after the
other: in a real run they share the cores, so read the ratio as an upper bound.

Usage:
    python benchmarks/bench_data.py [--dialogues 300] [--token-budget 1024] [--workers 2] [--json]

With ``--json`` the last line is JSON: ``data_tokens_per_s``, ``train_tokens_per_s`` (null if the model is not
available), ``ratio`` and the other numbers of the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import torch

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.data.datamodule import DialogueDataModule
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.shards import DialogueShardWriter

WORDS = (
    "draw a red blue green circle square triangle small large on the left right top bottom of image what colour "
    "is it now make move remove add two one shape please and then show me where"
).split()
VIT_PATCH, VAE_STRIDE, SIDE = 8, 8, 32  # chatumm_tiny: 32×32 → 16 ViT + 16 VAE tokens


def synthetic_dialogue(i: int, rng: random.Random, g: torch.Generator) -> DialogueSample:
    """2–8 alternating turns; user turns may show an image, assistant turns answer with text or an image."""
    turns: list[Turn] = []
    images: dict[str, torch.Tensor] = {}
    for t in range(rng.randint(2, 8)):
        role = Role.USER if t % 2 == 0 else Role.ASSISTANT
        text = TextSegment(text=" ".join(rng.choices(WORDS, k=rng.randint(4, 14))))
        segs: list[TextSegment | ImageSegment] = [text]
        if rng.random() < 0.5:
            key = f"img{t}"
            images[key] = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8, generator=g)
            segs = [text, ImageSegment(image=key)] if role is Role.USER else [ImageSegment(image=key)]
        turns.append(Turn(role=role, segments=segs))
    return DialogueSample(dialogue=Dialogue(id=f"bench{i}", turns=turns), images=images)


def write_shards(directory: Path, n: int, per_shard: int) -> None:
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    with DialogueShardWriter(directory=directory, max_samples_per_shard=per_shard) as w:
        for i in range(n):
            w.write(synthetic_dialogue(i, rng, g))


def measure_data(dm: DialogueDataModule) -> tuple[dict[str, float], list[PackedBatch]]:
    """One epoch through the DataLoader; the clock starts at the first batch (worker start-up reported apart)."""
    t0 = time.perf_counter()
    batches: list[PackedBatch] = []
    t_first = 0.0
    for item in dm.train_dataloader():
        batches.append(dm.consume(item))
        if len(batches) == 1:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    rest = batches[1:]
    dt = max(t_end - t_first, 1e-9)
    samples = sum(len(b.sample_keys) for b in rest)
    tokens = sum(b.num_real_tokens for b in rest)
    return {
        "startup_s": t_first - t0,
        "batches": len(batches),
        "samples": sum(len(b.sample_keys) for b in batches),
        "data_samples_per_s": samples / dt,
        "data_tokens_per_s": tokens / dt,
        "data_budget_tokens_per_s": sum(b.token_budget for b in rest) / dt,
        "packing_efficiency": sum(b.num_real_tokens for b in batches) / max(1, sum(b.token_budget for b in batches)),
    }, batches


# ---------------------------------------------------------------------------- training consumption
# MARKED FOR THE LEAD: needs chatumm_kit.presets.chatumm_tiny and chatumm_kit.model.ChatUMM (written by others).
def measure_train_tokens_per_s(batches: list[PackedBatch], *, vocab_size: int, warmup: int = 2) -> float | None:
    """Forward + backward + AdamW step of ``chatumm_tiny`` on ``batches``; real (non-padding) tokens per second.

    Returns ``None`` (and says so) when the model is not importable.
    """
    try:
        from chatumm_kit.presets import chatumm_tiny
    except ImportError as e:
        print(f"model not available yet ({e})")
        return None
    torch.manual_seed(0)
    model = chatumm_tiny(vocab_size=vocab_size, vit_patch_size=VIT_PATCH)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(batch: PackedBatch) -> None:
        out = model(batch, generator=gen)
        loss = out.ce_loss + out.mse_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for b in batches[:warmup]:
        step(b)
    timed = batches[warmup:] or batches
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    dt = time.perf_counter() - t0
    return sum(b.num_real_tokens for b in timed) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dialogues", type=int, default=300)
    ap.add_argument("--per-shard", type=int, default=25)
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-batches", type=int, default=10, help="packed batches timed for training")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_shards(root / "shards", args.dialogues, args.per_shard)
        write_s = time.perf_counter() - t0
        corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(200)]
        tok = ChatTokenizer.train(corpus, vocab_size=400)
        dm = DialogueDataModule(
            train_sources=[{"name": "bench", "shards": str(root / "shards" / "index.json")}],
            tokenizer=tok,
            vit_patch_size=VIT_PATCH,
            vae_token_stride=VAE_STRIDE,
            max_image_side=128,
            token_budget=args.token_budget,
            num_workers=args.workers,
            shuffle_buffer=64,
        )
        dm.setup("fit")
        data, batches = measure_data(dm)
        train = measure_train_tokens_per_s(batches[: args.train_batches + 2], vocab_size=tok.vocab_size)

    ratio = data["data_tokens_per_s"] / train if train else None
    rows = [
        ("shards written", f"{args.dialogues} dialogues in {write_s:.2f} s"),
        ("loader start-up (first batch)", f"{data['startup_s']:.2f} s"),
        ("batches / samples in the epoch", f"{data['batches']} / {data['samples']}"),
        ("packing efficiency", f"{data['packing_efficiency']:.3f}"),
        (f"data: samples/s ({args.workers} workers)", f"{data['data_samples_per_s']:.1f}"),
        (f"data: packed tokens/s ({args.workers} workers)", f"{data['data_tokens_per_s']:.0f}"),
        ("train: tokens/s (chatumm_tiny fwd+bwd+step)", f"{train:.0f}" if train else "n/a"),
        ("ratio data / train", f"{ratio:.2f}x" if ratio else "n/a"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"bench_data: token_budget={args.token_budget}, 32x32 images, CPU ({torch.get_num_threads()} threads)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        print(json.dumps({**data, "train_tokens_per_s": train, "ratio": ratio, "token_budget": args.token_budget}))


if __name__ == "__main__":
    main()
