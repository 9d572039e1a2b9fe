"""MoT backbone benchmark: MoT layer vs a dense single-expert layer, and flex vs dense-SDPA attention.

CPU (default), printed side by side as ratios from one run (this machine is noisy; ARCHITECTURE "performance"):

1. forward + backward of one MoT layer (``MoTBackbone`` with ``num_layers=1``: per-forward routing, permuted mask,
   both experts, final norms) vs a plain dense Qwen2-style layer of the same width built from the same
   ``layers.py`` parts, on the same packed batch (half und, half gen tokens; dense GCA mask); repeats interleaved,
   median reported. Target: MoT / dense ≤ 1.15×.
2. attention only (forward; torch's flex attention has no CPU backward): flex ``BlockMask`` vs SDPA with the dense
   bool mask on the same packed batch. Flex runs ``torch.compile``d on CPU (compile time reported separately) and,
   for reference, eager (which materialises the full score matrix).

``--gpu`` (CUDA only): bf16, compiled flex, 2 MoT layers at BAGEL-7B width on an 8k-token packed batch:
forward + backward time, TFLOP/s and MFU, beside the same layers run dense (every token routed to one expert).

Run:
    python benchmarks/bench_mot.py [--repeats 7] [--threads 1] [--json]
    python benchmarks/bench_mot.py --gpu [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from chatumm_kit.components.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from chatumm_kit.components.mot import MoTBackbone, MoTConfig

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


# ------------------------------------------------------------------------------------------ the packed batch


def packed_stream(seq_len: int, *, text: int, image: int) -> dict[str, torch.Tensor]:
    """Dialogue-like packing: docs of [text (causal, und) | clean VAE (full, gen) | noised VAE (noise, gen) |
    text (causal, und)], repeated to ``seq_len``; half the tokens are und, half gen when ``text == image``.

    Returns per-token ``doc``, ``split``, ``bidir``, ``noise``, ``is_gen`` and ``pos`` tensors ``[L]``.
    """
    doc_len = 2 * text + 2 * image
    pattern = [(text, 0, False), (image, 1, True), (image, 2, True), (text, 0, False)]  # (len, mode, gen)
    doc, split, mode, gen, pos = [], [], [], [], []
    s = 0
    for d in range(-(-seq_len // doc_len)):
        p = 0
        for n, m, g in pattern:
            doc += [d] * n
            split += [s] * n
            mode += [m] * n
            gen += [g] * n
            pos += list(range(p, p + n)) if m == 0 else [p] * n
            p += n if m == 0 else (1 if m == 1 else 0)
            s += 1
    t = {k: torch.tensor(v[:seq_len]) for k, v in dict(doc=doc, split=split, mode=mode, pos=pos).items()}
    t["is_gen"] = torch.tensor(gen[:seq_len])
    t["bidir"], t["noise"] = t["mode"] > 0, t["mode"] == 2
    return t


def gca_dense(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense ``[L, L]`` Generalized Causal Attention mask (SPEC §3) from per-token tables."""
    n = s["doc"].numel()
    idx = torch.arange(n)
    same_doc = s["doc"][:, None] == s["doc"][None, :]
    same_split = s["split"][:, None] == s["split"][None, :]
    allowed = (idx[None, :] <= idx[:, None]) | (same_split & s["bidir"][:, None])
    return same_doc & allowed & ~(s["noise"][None, :] & ~same_split)


def gca_block_mask(s: dict[str, torch.Tensor], device: str):
    doc, split, bidir, noise = (s[k].to(device) for k in ("doc", "split", "bidir", "noise"))

    def mask_mod(b, h, q, k):
        same_split = split[q] == split[k]
        return (doc[q] == doc[k]) & ((k <= q) | (same_split & bidir[q])) & ~(noise[k] & ~same_split)

    n = doc.numel()
    return create_block_mask(mask_mod, None, None, n, n, device=device)


# ------------------------------------------------------------------------------------------ dense baseline


class DenseLayer(nn.Module):
    """Plain single-expert Qwen2-style layer + final norm: the baseline the MoT layer is compared with."""

    def __init__(self, cfg: MoTConfig) -> None:
        super().__init__()
        d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h, self.hkv, self.hd = h, hkv, hd
        self.ln1, self.ln2, self.final = RMSNorm(d), RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v = nn.Linear(d, h * hd), nn.Linear(d, hkv * hd), nn.Linear(d, hkv * hd)
        self.o = nn.Linear(h * hd, d, bias=False)
        self.qn, self.kn = RMSNorm(hd), RMSNorm(hd)
        self.mlp = SwiGLU(dim=d, hidden_dim=cfg.intermediate_size)
        self.rotary = RotaryEmbedding(head_dim=hd, theta=cfg.rope_theta)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.ln1(x)
        q = self.qn(self.q(y).view(n, self.h, self.hd))
        k = self.kn(self.k(y).view(n, self.hkv, self.hd))
        v = self.v(y).view(n, self.hkv, self.hd)
        cos, sin = self.rotary(pos)
        q, k = apply_rotary(q, k, cos[:, None], sin[:, None])
        a = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True
        )
        x = x + self.o(a[0].transpose(0, 1).reshape(n, -1))
        x = x + self.mlp(self.ln2(x))
        return self.final(x)


# ------------------------------------------------------------------------------------------ timing helpers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, callable], *, repeats: int, warmup: int = 2, device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each fn, alternating their order every repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def tiny_config(hidden: int, *, layers: int = 1) -> MoTConfig:
    heads = hidden // 64
    return MoTConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads // 2 if heads % 2 == 0 else heads,
        head_dim=64,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
    )


# ------------------------------------------------------------------------------------------ CPU benchmarks


def bench_mot_vs_dense(hidden: int, seq_len: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = tiny_config(hidden)
    s = packed_stream(seq_len, text=64, image=64)
    mask = gca_dense(s)
    und_idx, gen_idx = (~s["is_gen"]).nonzero().flatten(), s["is_gen"].nonzero().flatten()
    mot, dense = MoTBackbone.from_config(cfg), DenseLayer(cfg)
    x = torch.randn(seq_len, hidden)

    def run_mot():  # grads set to None each step, as zero_grad() does in training (no accumulation cost)
        out = mot(x, position_ids=s["pos"], und_indices=und_idx, gen_indices=gen_idx, attn_mask=mask)
        out.square().mean().backward()
        mot.zero_grad(set_to_none=True)

    def run_dense():
        dense(x, s["pos"], mask).square().mean().backward()
        dense.zero_grad(set_to_none=True)

    t = interleaved({"dense": run_dense, "mot": run_mot}, repeats=repeats)
    return dict(hidden=hidden, tokens=seq_len, dense_s=t["dense"], mot_s=t["mot"], ratio=t["mot"] / t["dense"])


def bench_flex_vs_sdpa(seq_len: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    heads, kv_heads, hd = 8, 2, 64
    s = packed_stream(seq_len, text=64, image=64)
    dense, block = gca_dense(s), gca_block_mask(s, "cpu")
    q = torch.randn(1, heads, seq_len, hd)
    k, v = torch.randn(1, kv_heads, seq_len, hd), torch.randn(1, kv_heads, seq_len, hd)
    compiled = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    out = compiled(q, k, v, block_mask=block, enable_gqa=True)
    compile_s = time.perf_counter() - t0
    err = (out - ref).abs().max().item()
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
        "flex_compiled": lambda: compiled(q, k, v, block_mask=block, enable_gqa=True),
        "flex_eager": lambda: flex_attention(q, k, v, block_mask=block, enable_gqa=True),
    }
    t = interleaved(fns, repeats=repeats)
    return dict(
        tokens=seq_len,
        density=dense.float().mean().item(),
        block_sparsity=block.sparsity() / 100,
        sdpa_s=t["sdpa"],
        flex_s=t["flex_compiled"],
        flex_eager_s=t["flex_eager"],
        compile_s=compile_s,
        max_abs_err=err,
        ratio=t["flex_compiled"] / t["sdpa"],
        eager_ratio=t["flex_eager"] / t["sdpa"],
    )


# ------------------------------------------------------------------------------------------ GPU benchmark


def layer_flops(cfg: MoTConfig, tokens: int, attended_pairs: int) -> float:
    """Forward+backward FLOPs of ``cfg.num_layers`` layers: 6·params·tokens for matmuls, 3× the forward
    4·pairs·head_dim·heads for attention (QKᵀ and PV over the pairs the mask allows)."""
    d, h, hkv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    matmul_params = d * h * hd + 2 * d * hkv * hd + h * hd * d + 3 * d * f  # per expert; each token uses one
    per_layer = 6 * matmul_params * tokens + 3 * 4 * attended_pairs * hd * h
    return per_layer * cfg.num_layers


BAGEL_WIDTH = dict(hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944)


def bench_gpu(
    *,
    cfg: MoTConfig,
    seq_len: int = 8192,
    repeats: int = 10,
    peak_tflops: float = 989.0,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """MoT layers with compiled flex attention (peak: H100/H200 dense bf16), beside the same layers run dense."""
    torch.manual_seed(0)
    model = MoTBackbone.from_config(cfg).to(device=device, dtype=dtype)
    s = packed_stream(seq_len, text=512, image=512)
    block = gca_block_mask(s, device)
    pairs = int(gca_dense(s).sum())
    pos = s["pos"].to(device)
    x = torch.randn(seq_len, cfg.hidden_size, device=device, dtype=dtype)
    everything = torch.arange(seq_len, device=device)
    routes = {  # (und_indices, gen_indices): MoT = half/half; dense = every token through one expert
        "mot": (everything[~s["is_gen"].to(device)], everything[s["is_gen"].to(device)]),
        "dense": (everything, everything[:0]),
    }

    def step(name: str):
        und, gen = routes[name]
        out = model(x, position_ids=pos, und_indices=und, gen_indices=gen, attn_mask=block)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    t = interleaved({n: (lambda n=n: step(n)) for n in routes}, repeats=repeats, warmup=3, device=device)
    flops = layer_flops(cfg, seq_len, pairs)
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else device,
        layers=cfg.num_layers,
        tokens=seq_len,
        mot_s=t["mot"],
        dense_s=t["dense"],
        ratio=t["mot"] / t["dense"],
        mot_tflops=flops / t["mot"] / 1e12,
        mfu=flops / t["mot"] / 1e12 / peak_tflops,
        peak_tflops=peak_tflops,
    )


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine, multi-threaded timings mostly measure how often the "
        "OpenMP barriers wait for a descheduled thread, which penalises whichever side launches more ops)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--gpu", action="store_true", help="CUDA benchmark at 7B width (bf16, compiled flex)")
    args = parser.parse_args()

    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA; none is available here")
        cfg = MoTConfig(vocab_size=1024, num_layers=2, attn_backend="flex", **BAGEL_WIDTH)  # embed/lm_head unused
        r = bench_gpu(cfg=cfg, repeats=args.repeats)
        print(f"{r['device']}: {r['layers']} MoT layers @ hidden 3584, {r['tokens']} tokens, bf16, compiled flex")
        print(f"  dense fwd+bwd {r['dense_s'] * 1e3:8.1f} ms")
        print(f"  MoT   fwd+bwd {r['mot_s'] * 1e3:8.1f} ms   ratio {r['ratio']:.2f}x")
        print(f"  MoT {r['mot_tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%} of {r['peak_tflops']:.0f}")
        if args.json:
            print(json.dumps({"mot_vs_dense_time_ratio": r["ratio"], "mfu": r["mfu"], "tflops": r["mot_tflops"]}))
        return

    torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of {args.repeats}")
    print("\n1) one layer forward+backward, packed batch half und / half gen, dense GCA mask")
    print(f"{'hidden':>7} {'tokens':>7} {'dense ms':>10} {'MoT ms':>10} {'MoT/dense':>10}")
    mot_rows = [bench_mot_vs_dense(256, 1024, args.repeats), bench_mot_vs_dense(768, 512, args.repeats)]
    for r in mot_rows:
        print(
            f"{r['hidden']:>7} {r['tokens']:>7} {r['dense_s'] * 1e3:>10.1f} {r['mot_s'] * 1e3:>10.1f} {r['ratio']:>9.2f}x"
        )

    print("\n2) attention forward only (8 heads, 2 kv heads, head_dim 64), GCA mask of the same packing")
    print(
        f"{'tokens':>7} {'density':>8} {'SDPA ms':>9} {'flex ms':>9} {'flex/SDPA':>10} "
        f"{'eager flex ms':>14} {'compile s':>10} {'max err':>9}"
    )
    f = bench_flex_vs_sdpa(2048, args.repeats)
    print(
        f"{f['tokens']:>7} {f['density']:>8.3f} {f['sdpa_s'] * 1e3:>9.1f} {f['flex_s'] * 1e3:>9.1f} "
        f"{f['ratio']:>9.2f}x {f['flex_eager_s'] * 1e3:>14.1f} {f['compile_s']:>10.1f} {f['max_abs_err']:>9.1e}"
    )
    print("   flex = torch.compile(flex_attention) on CPU; eager flex materialises all scores (reference only)")
    if args.json:
        summary = {
            "mot_vs_dense_time_ratio": mot_rows[-1]["ratio"],
            "mot_vs_dense_by_hidden": {str(r["hidden"]): round(r["ratio"], 4) for r in mot_rows},
            "flex_vs_sdpa_time_ratio": f["ratio"],
            "flex_eager_vs_sdpa_time_ratio": f["eager_ratio"],
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
