"""Benchmark: the kit's interval-arithmetic BlockMask vs compiled ``create_block_mask``, plus packing efficiency.

Builds realistic packed split tables (several dialogues of short text splits and image views of 16–4096 tokens,
FULL and NOISE) and prints, side by side in one run (this machine is noisy, so compare ratios):

* build time of ``MaskBuilder.block_mask``, of ``create_block_mask(..., _compile=True)`` (after a warm-up call)
  and of the dense ``[L, L]`` mask;
* bytes held by each result's tensors; the speedup; whether the two BlockMasks are bit-identical;
* packing efficiency (real tokens / token budget) of the kit's ``TokenBudgetBatcher`` (greedy, first-fit over an
  overflow buffer) on dialogue-length samples; a small simulation of the same stands in if it is missing.

Usage:
    python benchmarks/bench_masks.py                 # 8k, 32k, 128k
    python benchmarks/bench_masks.py --quick --json  # 8k, 32k; last stdout line is one JSON object
    python benchmarks/bench_masks.py --sizes 4096 16384
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from chatumm_kit.components.masks import MaskBuilder
from chatumm_kit.components.splits import AttnMode, Modality, SplitTable

DENSE_LIMIT_BYTES = 2 * 1024**3  # skip the dense mask above ~2 GiB of bools
BLOCK_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


@dataclass
class SizeResult:
    """One sequence length's measurements (seconds and bytes)."""

    seq_len: int
    n_splits: int
    n_docs: int
    kit_s: float
    create_block_mask_s: float
    dense_s: float | None
    kit_bytes: int
    create_block_mask_bytes: int
    dense_bytes: int
    speedup: float
    identical: bool
    sparsity_pct: float


def realistic_table(seq_len: int, *, seed: int = 0) -> SplitTable:
    """A packed sequence of dialogues, turn by turn: text splits of 8–200 tokens, user images (clean VAE + ViT)
    and generated images (noised VAE + clean VAE + ViT, SPEC §2 order) of 16–4096 tokens per view, most small;
    a padding split with a document of its own fills the tail."""
    rng = random.Random(seed)
    rows: list[tuple[int, int, int, int, int]] = []
    pos, doc = 0, 0

    def add(length: int, mode: AttnMode, modality: Modality) -> None:
        nonlocal pos
        length = min(length, seq_len - pos)
        if length > 0:
            rows.append((pos, length, mode, doc, modality))
            pos += length

    def image_tokens() -> int:
        side = rng.choices([4, 8, 16, 32, 64], weights=[2, 3, 3, 2, 1], k=2)
        return side[0] * side[1]  # markers v_s/v_e included in the count

    while pos < seq_len:
        end = pos + int(rng.lognormvariate(math.log(6000), 0.6))
        while pos < min(end, seq_len):
            add(rng.randint(8, 200), AttnMode.CAUSAL, Modality.TEXT)  # user text
            if rng.random() < 0.3:  # user image: clean VAE then ViT
                add(image_tokens(), AttnMode.FULL, Modality.VAE_CLEAN)
                add(image_tokens(), AttnMode.FULL, Modality.VIT)
            add(rng.randint(8, 200), AttnMode.CAUSAL, Modality.TEXT)  # assistant text
            if rng.random() < 0.3:  # generated image: noised VAE, its clean copy, ViT; then more text
                n = image_tokens()
                add(n, AttnMode.NOISE, Modality.VAE_NOISED)
                add(n, AttnMode.FULL, Modality.VAE_CLEAN)
                add(image_tokens(), AttnMode.FULL, Modality.VIT)
                add(rng.randint(8, 200), AttnMode.CAUSAL, Modality.TEXT)
        doc += 1
        if seq_len - pos < 64:  # tail too short for a dialogue: padding
            add(seq_len - pos, AttnMode.CAUSAL, Modality.PAD)
    return SplitTable.from_rows(rows)


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Minimum wall time over ``repeats`` calls (min is the least disturbed by other load)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def block_mask_bytes(bm: BlockMask) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(bm, n) for n in BLOCK_FIELDS) if t is not None)


def identical(a: BlockMask, b: BlockMask) -> bool:
    if a.seq_lengths != b.seq_lengths or a.BLOCK_SIZE != b.BLOCK_SIZE:
        return False
    for name in BLOCK_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and (x.dtype != y.dtype or not torch.equal(x, y))):
            return False
    return True


def measure(seq_len: int, *, block_size: int, repeats: int) -> SizeResult:
    table = realistic_table(seq_len)
    builder = MaskBuilder(block_size=block_size)
    mask_mod = builder.mask_mod(table)

    builder.block_mask(table)  # warm-up
    kit_s, kit = best_time(lambda: builder.block_mask(table), repeats)

    def baseline() -> BlockMask:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return create_block_mask(
                mask_mod, None, None, seq_len, seq_len, device="cpu", BLOCK_SIZE=block_size, _compile=True
            )

    baseline()  # warm-up: compilation
    cbm_s, cbm = best_time(baseline, repeats if seq_len <= 32768 else 1)

    dense_bytes = seq_len * seq_len
    dense_s = None
    if dense_bytes <= DENSE_LIMIT_BYTES:
        dense_s, dense = best_time(lambda: builder.dense(table), max(1, repeats // 2))
        del dense
    return SizeResult(
        seq_len=seq_len,
        n_splits=len(table),
        n_docs=int(torch.unique(table.docs).numel()),
        kit_s=kit_s,
        create_block_mask_s=cbm_s,
        dense_s=dense_s,
        kit_bytes=block_mask_bytes(kit),
        create_block_mask_bytes=block_mask_bytes(cbm),
        dense_bytes=dense_bytes,
        speedup=cbm_s / kit_s,
        identical=identical(kit, cbm),
        sparsity_pct=float(kit.sparsity()),
    )


@dataclass
class PackingResult:
    """Packing efficiency = real tokens / (batches × budget)."""

    source: str
    efficiency: float
    batches: int
    samples: int


def batcher_packing(lengths: list[int], *, token_budget: int, overflow_size: int) -> PackingResult:
    """Run the kit's ``TokenBudgetBatcher`` on text-only dialogues of exactly ``lengths`` tokens.

    A byte-level tokenizer without merges makes one token per character, so each dialogue (user text + assistant
    text, each wrapped in ``im_s``/``im_e``) has a known length.
    """
    from chatumm_kit.components.tokenizer import ChatTokenizer
    from chatumm_kit.data.dialogue import Dialogue, DialogueSample, Role, TextSegment, Turn
    from chatumm_kit.data.packing import CFGDropRates, Packer, TokenBudgetBatcher

    tok = ChatTokenizer.train(["ab"], vocab_size=262, min_frequency=10**9)  # no merges: 1 token per byte
    packer = Packer(tokenizer=tok, drop_rates=CFGDropRates.disabled())

    def sample(i: int, n: int) -> DialogueSample:
        user = max(1, (n - 4) // 4)
        turns = [
            Turn(role=Role.USER, segments=[TextSegment("a" * user)]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment("b" * (n - 4 - user))]),
        ]
        return DialogueSample(dialogue=Dialogue(id=f"d{i}", turns=turns), images={}, key=f"s{i}")

    samples = [sample(i, n) for i, n in enumerate(lengths)]
    measured = packer.measure(samples[0])
    if measured != lengths[0]:
        raise RuntimeError(f"bench: dialogue of {lengths[0]} tokens measured {measured}; template changed?")
    batcher = TokenBudgetBatcher(
        packer=packer, token_budget=token_budget, max_sample_tokens=token_budget, overflow_size=overflow_size
    )
    for _ in batcher(samples):
        pass
    stats = batcher.stats
    return PackingResult("TokenBudgetBatcher", stats.efficiency, stats.batches, stats.samples)


def simulated_packing(lengths: list[int], *, token_budget: int, overflow_size: int) -> PackingResult:
    """Fallback when ``TokenBudgetBatcher`` is missing: greedy first-fit over an overflow buffer (closed batches)."""
    buffer: list[int] = []
    closed: list[int] = []
    fill = 0
    for n in lengths:
        placed = True
        while placed:  # top up the open batch first-fit from the waiting samples
            placed = False
            for i, waiting in enumerate(buffer):
                if fill + waiting <= token_budget:
                    fill += buffer.pop(i)
                    placed = True
                    break
        if fill + n <= token_budget:
            fill += n
        elif len(buffer) < overflow_size:
            buffer.append(n)
        else:
            closed.append(fill)
            fill = n
    return PackingResult("simulation", sum(closed) / (len(closed) * token_budget), len(closed), len(lengths))


def packing(lengths: list[int], *, token_budget: int, overflow_size: int) -> PackingResult:
    has_batcher = importlib.util.find_spec("chatumm_kit.data.packing") is not None and hasattr(
        importlib.import_module("chatumm_kit.data.packing"), "TokenBudgetBatcher"
    )
    run = batcher_packing if has_batcher else simulated_packing
    return run(lengths, token_budget=token_budget, overflow_size=overflow_size)


def dialogue_lengths(count: int, *, seed: int = 0) -> list[int]:
    """Lognormal dialogue lengths (median ~800 tokens) clipped to 200–3000."""
    rng = random.Random(seed)
    return [min(3000, max(200, int(rng.lognormvariate(math.log(800), 0.7)))) for _ in range(count)]


def fmt_s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:10.2f} ms"


def fmt_b(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="sequence lengths (default 8k 32k 128k)")
    parser.add_argument("--quick", action="store_true", help="8k and 32k only, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads for both sides (1: steadiest on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([8192, 32768] if args.quick else [8192, 32768, 131072])
    repeats = 3 if args.quick else 5

    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, block {args.block_size}, min of runs")
    header = (
        f"{'L':>7} {'splits':>6} {'docs':>4} | {'kit block_mask':>14} {'create_block_mask':>17} {'speedup':>8} "
        f"{'identical':>9} | {'dense mask':>22} | {'kit bytes':>10} {'cbm bytes':>10} {'dense bytes':>11} "
        f"{'sparsity':>8}"
    )
    print(header)
    print("-" * len(header))
    results: list[SizeResult] = []
    for seq_len in sizes:
        r = measure(seq_len, block_size=args.block_size, repeats=repeats)
        results.append(r)
        dense = fmt_s(r.dense_s) if r.dense_s is not None else f"skipped ({r.dense_bytes / 1024**3:.0f} GiB)"
        print(
            f"{r.seq_len:>7} {r.n_splits:>6} {r.n_docs:>4} | {fmt_s(r.kit_s):>14} {fmt_s(r.create_block_mask_s):>17} "
            f"{r.speedup:>7.1f}× {str(r.identical):>9} | {dense:>22} | {fmt_b(r.kit_bytes):>10} "
            f"{fmt_b(r.create_block_mask_bytes):>10} {fmt_b(r.dense_bytes):>11} {r.sparsity_pct:>7.1f}%"
        )

    lengths = dialogue_lengths(2000 if args.quick else 8000)
    t0 = time.perf_counter()
    pk = packing(lengths, token_budget=32768, overflow_size=32)
    print(
        f"\npacking ({pk.source}, {time.perf_counter() - t0:.1f} s): {pk.samples} dialogues of 200–3000 tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), budget 32768, overflow buffer 32 → {pk.batches} batches, "
        f"efficiency {pk.efficiency:.4f}"
    )

    by_size = {r.seq_len: r for r in results}
    summary = {
        "speedup_vs_create_block_mask_32k": by_size[32768].speedup if 32768 in by_size else None,
        "identical": all(r.identical for r in results),
        "packing_efficiency": pk.efficiency,
        "packing_source": pk.source,
        "threads": args.threads,
        "sizes": {str(r.seq_len): asdict(r) for r in results},
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
