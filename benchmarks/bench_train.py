"""Training throughput: packed batches (the kit) vs one dialogue per step, same model, same dialogues (issue 7).

Real (non-padding) tokens per second of forward + backward + AdamW step, loss from
:func:`chatumm_kit.training.losses.objective`, for ``chatumm_tiny`` and a small ChatUMM on ShapesChat dialogues
synthesised by the ``shapes/synth`` pipeline (32×32 images, ViT patch 8, VAE token stride 8, no CFG dropout):

* *packed* — :class:`~chatumm_kit.data.packing.TokenBudgetBatcher` lays several dialogues into one 2 048-token
  sequence; one optimizer step per packed batch; the model builds each batch's attention mask in its forward;
* *unpacked* — each dialogue packed alone (``Packer.pack([sample])``, no padding); one optimizer step per dialogue.

Both loops see exactly the same dialogues, hence the same real tokens (asserted). Warm-up steps are excluded from
the timing; the two loops are interleaved ``--repeats`` times (alternating which goes first, so drift in machine
load hits both alike) and the median rate is kept. The ratio packed / unpacked is the figure of merit.

With CUDA, ``--gpu`` adds the 7B-shaped step: ``chatumm_bagel_7b``'s MoT backbone widths with only 2 layers, bf16,
flex attention (compiled) on an 8 192-token packed sequence of two documents (text, noised + clean VAE view, ViT
view, text), reporting tokens/s, TFLOP/s and MFU against the H100 dense bf16 peak.

    python benchmarks/bench_train.py [--quick] [--json] [--threads 1] [--repeats 3] [--gpu]

Example:
    >>> result = main(["--quick", "--json"])           # doctest: +SKIP
    >>> result["packed_vs_unpacked_speedup"] > 0        # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.masks import MaskBuilder
from chatumm_kit.components.mot import GEN_SUFFIX, MoTBackbone, MoTConfig
from chatumm_kit.components.splits import AttnMode, Modality, SplitTable
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import load_recipe
from chatumm_kit.data.dialogue import DialogueSample
from chatumm_kit.data.packing import CFGDropRates, Packer, TokenBudgetBatcher
from chatumm_kit.data.shards import read_samples
from chatumm_kit.model import ChatUMM
from chatumm_kit.presets import build_model
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.training.losses import objective
from chatumm_kit.training.prepare import dialogue_texts

BUDGET = 2048
"""Tokens per packed batch (the ``shapes/chat_tiny`` recipe's ``token_budget``)."""

SMALL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 768,
         "vit_hidden": 128}  # fmt: skip
"""The "small" model: ``chatumm_tiny`` with these overrides (~8 M parameters)."""

H100_BF16_PEAK = 989e12
"""H100 SXM dense bf16 tensor-core peak, FLOP/s (the MFU denominator)."""


# ---------------------------------------------------------------------------------------------- data


def make_dialogues(n: int, folder: Path) -> tuple[list[DialogueSample], ChatTokenizer]:
    """Synthesise ``n`` ShapesChat dialogues into ``folder`` with the shipped ``shapes/synth`` recipe, read them
    back and train a 512-token BPE on their text (the ``shapes/chat_tiny`` vocabulary size)."""
    overrides = [
        f"output_dir={folder}",
        f"synth.num_dialogues={n}",
        f"synth.shard_size={min(500, n)}",  # a chunk of 500 candidates for 24 dialogues would waste most of them
        "+synth.progress=false",
        "+synth.report_png=false",
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # keep the table readable (run_synth prints where files went)
        run_synth(load_recipe("shapes/synth", overrides))
    index = folder / "index.json"
    samples = list(read_samples(index))
    tokenizer = ChatTokenizer.train(dialogue_texts(str(index)), vocab_size=512)
    return samples, tokenizer


def make_packer(tokenizer: ChatTokenizer) -> Packer:
    """The ``shapes/chat_tiny`` packer settings, without CFG dropout so both loops see identical tokens."""
    return Packer(tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32,
                  drop_rates=CFGDropRates.disabled())  # fmt: skip


# ---------------------------------------------------------------------------------------------- CPU loops


def train_rate(model: ChatUMM, batches: Sequence[PackedBatch], *, warmup: int) -> float:
    """Real tokens per second of one forward + backward + AdamW step per batch, over all of ``batches``.

    ``warmup`` untimed steps (on the first batches) come first, so allocator growth and AdamW's lazy state do not
    count; the timed pass then steps on every batch once.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)  # the flow-matching draws

    def step(batch: PackedBatch) -> None:
        loss = objective(model(batch, generator=gen)).total  # SPEC §4: CE + MSE, token-normalised
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(b.num_real_tokens for b in batches) / (time.perf_counter() - start)


@dataclass
class Row:
    """One model's packed vs unpacked figures (rates are medians over the repeats, real tokens/s)."""

    model: str
    params: int
    dialogues: int
    real_tokens: int
    packed_steps: int
    unpacked_steps: int
    packing_efficiency: float
    packed_tokens_per_s: float
    unpacked_tokens_per_s: float
    packed_runs: list[float]
    unpacked_runs: list[float]

    @property
    def speedup(self) -> float:
        return self.packed_tokens_per_s / self.unpacked_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def measure_model(
    name: str, spec: dict[str, Any], samples: Sequence[DialogueSample], tokenizer: ChatTokenizer, *,
    repeats: int, warmup: int,
) -> Row:  # fmt: skip
    """Packed vs unpacked training rate of the model ``chatumm_tiny(**spec)`` on ``samples``."""
    packer = make_packer(tokenizer)
    samples = [s for s in samples if packer.measure(s) <= BUDGET]  # the batcher would skip longer ones
    batcher = TokenBudgetBatcher(packer=packer, token_budget=BUDGET, max_sample_tokens=BUDGET)
    packed = list(batcher(samples))
    singles = [packer.pack([s]) for s in samples]
    real = sum(b.num_real_tokens for b in singles)
    if sum(b.num_real_tokens for b in packed) != real or batcher.stats.samples != len(samples):
        raise RuntimeError(f"{name}: packed and unpacked loops would not train on the same tokens")
    model = build_model(
        {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size, **spec}
    ).train()
    packed_runs: list[float] = []
    unpacked_runs: list[float] = []
    for r in range(repeats):  # interleaved, alternating order: load drift hits both loops alike
        order = [(packed, packed_runs), (singles, unpacked_runs)]
        for batches, runs in order if r % 2 == 0 else order[::-1]:
            runs.append(train_rate(model, batches, warmup=warmup))
    return Row(
        model=name,
        params=sum(p.numel() for p in model.parameters()),
        dialogues=len(samples),
        real_tokens=real,
        packed_steps=len(packed),
        unpacked_steps=len(singles),
        packing_efficiency=batcher.stats.efficiency,
        packed_tokens_per_s=statistics.median(packed_runs),
        unpacked_tokens_per_s=statistics.median(unpacked_runs),
        packed_runs=packed_runs,
        unpacked_runs=unpacked_runs,
    )


# ---------------------------------------------------------------------------------------------- GPU step


def packed_layout(seq_len: int, *, num_docs: int = 2) -> SplitTable:
    """A packed sequence of ``num_docs`` equal documents, each ``text | noised VAE | clean VAE | ViT | text`` in
    the proportions ``1/8 | 1/4 | 1/4 | 1/4 | 1/8`` (a generation turn then a reply): half the tokens per expert."""
    doc_len = seq_len // num_docs
    if doc_len * num_docs != seq_len or doc_len % 8:
        raise ValueError(f"packed_layout: seq_len={seq_len} must split into {num_docs} documents of a multiple of 8")
    e = doc_len // 8
    parts = [(e, AttnMode.CAUSAL, Modality.TEXT), (2 * e, AttnMode.NOISE, Modality.VAE_NOISED),
             (2 * e, AttnMode.FULL, Modality.VAE_CLEAN), (2 * e, AttnMode.FULL, Modality.VIT),
             (e, AttnMode.CAUSAL, Modality.TEXT)]  # fmt: skip
    rows, start = [], 0
    for doc in range(num_docs):
        for length, mode, modality in parts:
            rows.append((start, length, mode, doc, modality))
            start += length
    return SplitTable.from_rows(rows)


def step_flops(config: MoTConfig, table: SplitTable, *, expert_params: int) -> float:
    """Useful FLOPs of one forward + backward of the backbone layers on ``table`` (recompute not counted).

    Matmuls: ``6 · P · L`` with ``P`` the parameters one token meets (one expert per layer). Attention: per
    attended (query, key) pair and layer, ``QKᵀ`` and ``PV`` cost ``2 · H · hd`` each forward, twice that backward:
    ``12 · H · hd`` — counting only the pairs the mask allows (what flex attention computes, up to block edges).
    """
    pairs = int(MaskBuilder().dense(table).sum())
    attn = 12 * config.num_heads * config.head_dim * pairs * config.num_layers
    return 6.0 * expert_params * table.seq_len + attn


def backbone_step(
    config: MoTConfig, *, device: torch.device | str, dtype: torch.dtype, seq_len: int = 8192, steps: int = 10,
    warmup: int = 3,
) -> dict[str, float]:  # fmt: skip
    """Time forward + backward + AdamW of ``MoTBackbone(config)`` on a :func:`packed_layout` sequence.

    Returns tokens/s, achieved TFLOP/s (:func:`step_flops` / step time) and MFU against :data:`H100_BF16_PEAK`.
    Embedding and ``lm_head`` are left out (random hidden states in, a scalar of the output out): with 2 of 28
    layers they would dominate a step they barely touch in the full model.
    """
    device = torch.device(device)
    with device:  # initialise on the device: 2 B fp32 parameters would take a while on the host
        mot = MoTBackbone.from_config(config)
    mot = mot.to(dtype=dtype).train()
    for module in (mot.embed_tokens, mot.lm_head):
        module.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in mot.parameters() if p.requires_grad], lr=1e-5)
    table = packed_layout(seq_len)
    builder = MaskBuilder()
    token_modality = table.modalities[table.token_split_ids()]
    is_gen = (token_modality == Modality.VAE_NOISED) | (token_modality == Modality.VAE_CLEAN)
    und, gen = (~is_gen).nonzero()[:, 0].to(device), is_gen.nonzero()[:, 0].to(device)
    pos = torch.arange(seq_len, device=device)
    hidden = torch.randn(seq_len, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        flex = config.attn_backend == "flex"
        mask = builder.block_mask(table, device=device) if flex else builder.documents(table, device=device)
        out = mot(hidden, position_ids=pos, und_indices=und, gen_indices=gen, attn_mask=mask)
        opt.zero_grad(set_to_none=True)
        out.float().pow(2).mean().backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):  # includes compiling flex attention for this shape
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - start) / steps
    expert = sum(p.numel() for n, p in mot.layers.named_parameters() if GEN_SUFFIX not in n)
    flops = step_flops(config, table, expert_params=expert)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"tokens_per_s": seq_len / dt, "tflops": flops / dt / 1e12, "mfu": flops / dt / H100_BF16_PEAK,
            "step_ms": dt * 1e3, "peak_mem_gib": peak}  # fmt: skip


def bagel_7b_config(num_layers: int) -> MoTConfig:
    """``chatumm_bagel_7b``'s backbone config (built on the meta device) with ``num_layers`` layers."""
    from chatumm_kit.presets import chatumm_bagel_7b

    with torch.device("meta"):
        full = chatumm_bagel_7b()
    return replace(full.backbone.config, num_layers=num_layers)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few dialogues, one repeat (a smoke run, ~10 s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median kept (default 3)")
    ap.add_argument("--dialogues", type=int, default=None, help="dialogues synthesised (default 256; quick 16)")
    ap.add_argument("--small-dialogues", type=int, default=None, help="of those, for the small model (48; quick 6)")
    ap.add_argument("--gpu", action="store_true", help="also the 7B-shaped step (only runs when CUDA is available)")
    ap.add_argument("--gpu-layers", type=int, default=2, help="layers of the 7B-shaped backbone (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.dialogues or (16 if args.quick else 256)
    n_small = args.small_dialogues or (6 if args.quick else 48)
    repeats, warmup = (1, 1) if args.quick else (args.repeats, 2)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        samples, tokenizer = make_dialogues(n, Path(tmp) / "shards")
    rows = [
        measure_model("tiny", {}, samples, tokenizer, repeats=repeats, warmup=warmup),
        measure_model("small", SMALL, samples[:n_small], tokenizer, repeats=repeats, warmup=warmup),
    ]

    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s); {len(samples)} ShapesChat dialogues "
          f"(32x32 images), token budget {BUDGET}, median of {repeats} interleaved run(s), {warmup} warm-up step(s)")  # fmt: skip
    head = (f"{'model':6s} {'params':>9s} {'dialogues':>9s} {'real tok':>9s} {'steps p/u':>9s} {'effic.':>6s} "
            f"{'packed tok/s':>12s} {'unpacked tok/s':>14s} {'packed/unpacked':>15s}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = f"{r.packed_steps}/{r.unpacked_steps}"
        print(f"{r.model:6s} {r.params:9d} {r.dialogues:9d} {r.real_tokens:9d} {steps:>9s} {r.packing_efficiency:6.3f} "
              f"{r.packed_tokens_per_s:12.0f} {r.unpacked_tokens_per_s:14.0f} {r.speedup:14.2f}x")  # fmt: skip

    tiny, small = rows
    result: dict[str, Any] = {
        "packed_vs_unpacked_speedup": tiny.speedup,
        "tiny_tokens_per_s": tiny.packed_tokens_per_s,
        "tiny_unpacked_tokens_per_s": tiny.unpacked_tokens_per_s,
        "small_packed_vs_unpacked_speedup": small.speedup,
        "small_tokens_per_s": small.packed_tokens_per_s,
        "small_unpacked_tokens_per_s": small.unpacked_tokens_per_s,
        "threads": args.threads,
        "token_budget": BUDGET,
        "repeats": repeats,
        "rows": [r.to_dict() for r in rows],
    }
    if args.gpu and torch.cuda.is_available():
        config = replace(bagel_7b_config(args.gpu_layers), attn_backend="flex")
        gpu = backbone_step(config, device="cuda", dtype=torch.bfloat16, seq_len=8192)
        result.update({f"gpu_{k}": v for k, v in gpu.items()})
        result["gpu_device"] = torch.cuda.get_device_name()
        ckpt = "on" if config.gradient_checkpointing else "off"
        print(f"GPU {result['gpu_device']}: 7B-width MoT, {args.gpu_layers} layers, bf16, compiled flex attention, "
              f"gradient checkpointing {ckpt} (as the preset; recompute not counted), 8192 packed tokens:\n"
              f"  {gpu['step_ms']:.1f} ms/step, {gpu['tokens_per_s']:.0f} tok/s, {gpu['tflops']:.1f} TFLOP/s, "
              f"MFU {gpu['mfu']:.1%} of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s, peak {gpu['peak_mem_gib']:.1f} GiB")  # fmt: skip
    elif args.gpu:
        print("GPU step skipped: CUDA is not available")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
