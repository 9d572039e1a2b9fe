"""Training throughput: packed batches (the kit) vs one dialogue per step, same model, same dialogues, one run.

Real (non-padding) tokens per second of forward + backward + AdamW step for ``chatumm_tiny`` and a small ChatUMM on
ShapesChat dialogues: *packed* lays several dialogues into one token-budget sequence (``TokenBudgetBatcher``);
*unpacked* steps on each dialogue alone (``Packer.pack([sample])``). Warm-up steps are excluded; the two loops are
interleaved ``--repeats`` times and the median is kept (this machine is noisy). With a CUDA GPU, ``--gpu`` adds one
7B-width MoT layer stack step in bf16 with flex attention and its MFU.

    python benchmarks/bench_train.py [--quick] [--json] [--threads 1] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import load_recipe
from chatumm_kit.data.packing import CFGDropRates, Packer, TokenBudgetBatcher
from chatumm_kit.data.shards import read_samples
from chatumm_kit.presets import build_model
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.training.prepare import dialogue_texts

SMALL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 768,
         "vit_hidden": 128}  # fmt: skip


def make_samples(n: int, folder: Path):
    cfg = load_recipe("shapes/synth", [f"synth.num_dialogues={n}", f"output_dir={folder}", "+synth.progress=false"])
    run_synth(cfg)
    samples = list(read_samples(folder / "index.json"))
    tokenizer = ChatTokenizer.train(dialogue_texts(str(folder / "index.json")), vocab_size=512)
    return samples, tokenizer


def step_rate(model, batches) -> float:
    """Real tokens per second of optimizer steps over ``batches`` (after one warm-up step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        out = model(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        (out.ce_loss + out.mse_loss).backward()
        opt.step()

    step(batches[0])
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(b.num_real_tokens for b in batches) / (time.perf_counter() - start)


def measure(name: str, spec: dict, samples, tokenizer, *, budget: int, repeats: int) -> dict:
    packer = Packer(tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32,
                    drop_rates=CFGDropRates(text=0.0, vit=0.0, vae=0.0))  # fmt: skip
    batcher = TokenBudgetBatcher(packer=packer, token_budget=budget, max_sample_tokens=budget)
    packed = list(batcher(samples))
    kept = {k.split("#")[0] for b in packed for k in b.sample_keys}
    singles = [packer.pack([s]) for s in samples if s.key in kept or not kept]
    model = build_model({"preset": "chatumm_tiny", "vocab_size": tokenizer.vocab_size, **spec})
    packed_rates, single_rates = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both sides alike
        packed_rates.append(step_rate(model, packed))
        single_rates.append(step_rate(model, singles))
    p, s = statistics.median(packed_rates), statistics.median(single_rates)
    return {
        "model": name,
        "params": sum(x.numel() for x in model.parameters()),
        "packed_batches": len(packed),
        "dialogues": len(singles),
        "packing_efficiency": batcher.stats.efficiency,
        "packed_tokens_per_s": p,
        "unpacked_tokens_per_s": s,
        "speedup": p / s,
    }


def gpu_step(num_layers: int = 2, seq_len: int = 8192) -> dict:
    """One 7B-width MoT stack step (bf16, compiled flex attention, half the tokens per expert) on CUDA."""
    from chatumm_kit.components.masks import MaskBuilder
    from chatumm_kit.components.mot import MoTBackbone
    from chatumm_kit.components.splits import AttnMode, Modality, SplitTable

    dev = torch.device("cuda")
    mot = MoTBackbone(vocab_size=152064, hidden_size=3584, num_layers=num_layers, num_heads=28, num_kv_heads=4,
                      head_dim=128, intermediate_size=18944, attn_backend="flex").to(dev, torch.bfloat16)  # fmt: skip
    half = seq_len // 2
    table = SplitTable.from_rows(
        [(0, half, AttnMode.CAUSAL, 0, Modality.TEXT), (half, half, AttnMode.FULL, 0, Modality.VAE_CLEAN)]
    )
    mask = MaskBuilder().block_mask(table, device=dev)
    hidden = torch.randn(seq_len, 3584, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq_len, device=dev)
    und, gen = torch.arange(half, device=dev), torch.arange(half, seq_len, device=dev)

    def run():
        out = mot(hidden, position_ids=pos, und_indices=und, gen_indices=gen, attn_mask=mask)
        out.float().pow(2).mean().backward()

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    n = 10
    for _ in range(n):
        run()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / n
    layer_params = sum(p.numel() for p in mot.layers.parameters()) / 2  # each token uses one expert
    flops = 6 * layer_params * seq_len + 4 * 3 * num_layers * seq_len * seq_len * 3584 / 2  # matmuls + attention
    return {"gpu_tokens_per_s": seq_len / dt, "gpu_tflops": flops / dt / 1e12, "gpu_mfu": flops / dt / 989e12}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few dialogues, tiny model only")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu", action="store_true", help="also the 7B-width step (needs CUDA)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 24 if args.quick else 120
    with tempfile.TemporaryDirectory() as tmp:
        samples, tokenizer = make_samples(n, Path(tmp) / "shards")
    rows = [measure("tiny", {}, samples, tokenizer, budget=2048, repeats=1 if args.quick else args.repeats)]
    if not args.quick:
        rows.append(measure("small", SMALL, samples, tokenizer, budget=2048, repeats=args.repeats))
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), {len(samples)} ShapesChat dialogues, budget 2048")
    print(f"{'model':6s} {'params':>9s} {'batches':>7s} {'effic.':>6s} {'packed tok/s':>13s} "
          f"{'unpacked tok/s':>15s} {'packed/unpacked':>16s}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:6s} {r['params']:9d} {r['packed_batches']:7d} {r['packing_efficiency']:6.3f} "
              f"{r['packed_tokens_per_s']:13.0f} {r['unpacked_tokens_per_s']:15.0f} {r['speedup']:15.2f}x")  # fmt: skip
    result = {
        "packed_vs_unpacked_speedup": rows[0]["speedup"],
        "tiny_tokens_per_s": rows[0]["packed_tokens_per_s"],
        "rows": rows,
    }
    if len(rows) > 1:
        result["small_packed_vs_unpacked_speedup"] = rows[1]["speedup"]
        result["small_tokens_per_s"] = rows[1]["packed_tokens_per_s"]
    if args.gpu and torch.cuda.is_available():
        result.update(gpu_step())
        print(f"GPU 7B-width 2-layer step: {result['gpu_tokens_per_s']:.0f} tok/s, "
              f"{result['gpu_tflops']:.1f} TFLOP/s, MFU {result['gpu_mfu']:.1%}")  # fmt: skip
    elif args.gpu:
        print("GPU step skipped: no CUDA device")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
