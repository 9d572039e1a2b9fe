"""LoRA vs full fine-tuning on the same MoT model and batch, in one run (issue 15).

Both variants train the same backbone — a :class:`~chatumm_kit.components.mot.MoTBackbone` with both experts — on
the same packed sequence: half the tokens routed to the understanding expert (next-token CE through ``lm_head``),
half to the generation expert (MSE to a fixed target, as the flow loss), one causal document. *full* trains every
weight; *lora* puts :class:`~chatumm_kit.training.adapters.LoraSpec` adapters (rank 16, both experts, q/k/v/o and
gate/up/down) on it and freezes the rest. Reported per variant: trainable parameters, AdamW state bytes after a
step, peak training memory and the median step time (forward + backward + AdamW); and the ratios lora / full.

* CPU (default): a small model (hidden 256, 4 layers, 1 024 tokens), fp32. Peak memory is the peak resident set of a
  fresh process per variant minus its resident set before the first step (CPU allocators have no peak counter).
  Step times interleave the two variants ``--repeats`` times in this process (machine-load drift hits both alike).
* ``--device cuda``: BAGEL-7B-MoT's widths (hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab 152064) cut to
  ``--layers`` (default 2) layers, bf16 weights (adapters fp32), 4 096 tokens, SDPA; peak memory from
  ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_lora.py [--json] [--quick] [--repeats 5] [--device cuda --layers 2]

Example:
    >>> result = main(["--json", "--repeats", "1"])       # doctest: +SKIP
    >>> result["lora_optimizer_bytes_ratio"] < 0.2        # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.training.adapters import LoraSpec, apply_lora, parameter_counts

CPU_SIZES = dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                 intermediate_size=768)  # fmt: skip
BAGEL_7B = dict(vocab_size=152064, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                intermediate_size=18944, rope_theta=1e6)  # fmt: skip
QUICK_SIZES = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=192)  # fmt: skip
SPEC = LoraSpec(rank=16, alpha=32, experts="both")


class Holder(nn.Module):
    """The backbone under the name a ChatUMM gives it, so :class:`LoraSpec`'s targets (``backbone.layers...``) fit."""

    def __init__(self, backbone: MoTBackbone) -> None:
        super().__init__()
        self.backbone = backbone


@dataclass
class Setting:
    device: str
    sizes: dict[str, Any]
    tokens: int
    dtype: torch.dtype


def setting(device: str, layers: int, *, quick: bool = False) -> Setting:
    if device == "cuda":
        return Setting("cuda", {**BAGEL_7B, "num_layers": layers}, 4096, torch.bfloat16)
    return Setting("cpu", QUICK_SIZES, 256, torch.float32) if quick else Setting("cpu", CPU_SIZES, 1024, torch.float32)


def build(variant: str, s: Setting) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    with torch.device(s.device):
        model = Holder(MoTBackbone(**s.sizes, attn_backend="sdpa"))
    if variant == "lora":
        apply_lora(model, SPEC)  # freezes the base; adapters stay fp32 when the base is cast below
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad or variant == "full":
                p.data = p.data.to(s.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5)


def make_batch(s: Setting) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    n, half = s.tokens, s.tokens // 2
    return {
        "ids": torch.randint(0, s.sizes["vocab_size"], (n,), generator=g).to(s.device),
        "positions": torch.arange(n, device=s.device),
        "und": torch.arange(half, device=s.device),
        "gen": torch.arange(half, n, device=s.device),
        "target": torch.randn(n - half, s.sizes["hidden_size"], generator=g).to(s.device, s.dtype),
    }


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    mot: MoTBackbone = model.backbone
    doc = torch.zeros_like(batch["ids"])
    with torch.autocast(batch["ids"].device.type, dtype=torch.bfloat16, enabled=batch["ids"].is_cuda):
        hidden = mot.embed_tokens(batch["ids"])
        out = mot(hidden, position_ids=batch["positions"], und_indices=batch["und"], gen_indices=batch["gen"],
                  attn_mask=mot.causal_mask(doc))  # fmt: skip
        und = batch["und"]
        logits = mot.lm_head(out[und[:-1]]).float()
        loss = F.cross_entropy(logits, batch["ids"][und[1:]]) + F.mse_loss(out[batch["gen"]].float(),
                                                                            batch["target"].float())  # fmt: skip
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(variant: str, s: Setting) -> int:
    """Peak training memory of one variant, bytes (see the module docstring)."""
    if s.device == "cuda":
        torch.cuda.empty_cache()
        model, opt = build(variant, s)
        batch = make_batch(s)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step(model, opt, batch)
        _sync("cuda")
        peak = torch.cuda.max_memory_allocated()
        del model, opt
        return peak
    cmd = [sys.executable, __file__, "--memory-probe", variant] + (["--quick"] if s.sizes is QUICK_SIZES else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def _probe(variant: str, *, quick: bool) -> int:
    """Child process: RSS growth from just before the first step to the peak over two steps (bytes)."""
    s = setting("cpu", 0, quick=quick)
    model, opt = build(variant, s)
    batch = make_batch(s)
    before = _rss_now()
    for _ in range(2):
        step(model, opt, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return max(peak - before, 0)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(s: Setting, repeats: int) -> dict[str, Any]:
    built = {v: build(v, s) for v in ("full", "lora")}
    batch = make_batch(s)
    times: dict[str, list[float]] = {"full": [], "lora": []}
    for model, opt in built.values():  # warm-up (allocations, optimizer state)
        step(model, opt, batch)
    for r in range(repeats):
        for v in ("full", "lora") if r % 2 == 0 else ("lora", "full"):
            model, opt = built[v]
            _sync(s.device)
            t0 = time.perf_counter()
            step(model, opt, batch)
            _sync(s.device)
            times[v].append(time.perf_counter() - t0)
    rows = {}
    for v, (model, opt) in built.items():
        counts = parameter_counts(model)
        rows[v] = {"trainable_params": counts.trainable, "total_params": counts.total,
                   "optimizer_bytes": optimizer_bytes(opt), "step_s": statistics.median(times[v])}  # fmt: skip
    del built
    for v in rows:
        rows[v]["peak_memory_bytes"] = measure_memory(v, s)
    full, lora = rows["full"], rows["lora"]
    return {
        "device": s.device,
        "model": {**s.sizes, "tokens": s.tokens, "dtype": str(s.dtype)},
        "lora_spec": asdict(SPEC),
        "full": full,
        "lora": lora,
        "lora_trainable_ratio": lora["trainable_params"] / full["trainable_params"],
        "lora_optimizer_bytes_ratio": lora["optimizer_bytes"] / full["optimizer_bytes"],
        "lora_peak_memory_ratio": lora["peak_memory_bytes"] / max(full["peak_memory_bytes"], 1),
        "lora_step_time_ratio": lora["step_s"] / full["step_s"],
    }


def _table(result: dict[str, Any]) -> str:
    full, lora = result["full"], result["lora"]
    lines = [f"LoRA vs full fine-tuning ({result['device']}, {result['model']['num_layers']} layers, "
             f"hidden {result['model']['hidden_size']}, {result['model']['tokens']} tokens)",  # fmt: skip
             f"{'':22}{'full':>16}{'lora':>16}{'lora/full':>12}"]  # fmt: skip
    for key, fmt in (("trainable_params", "{:,}"), ("optimizer_bytes", "{:,}"), ("peak_memory_bytes", "{:,}"),
                     ("step_s", "{:.4f}")):  # fmt: skip
        ratio = lora[key] / max(full[key], 1e-12)
        lines.append(f"{key:22}{fmt.format(full[key]):>16}{fmt.format(lora[key]):>16}{ratio:>12.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model (cuda)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a smaller CPU model (tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--memory-probe", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(_probe(args.memory_probe, quick=args.quick))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    result = run(setting(args.device, args.layers, quick=args.quick), args.repeats)
    print(_table(result))
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
