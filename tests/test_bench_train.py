"""benchmarks/bench_train.py: quick mode reports positive packed/unpacked rates; the GPU step's plumbing and FLOP
accounting run on CPU with a tiny backbone."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chatumm_kit.components.mot import MoTConfig

KEYS = (
    "packed_vs_unpacked_speedup",
    "tiny_tokens_per_s",
    "tiny_unpacked_tokens_per_s",
    "small_packed_vs_unpacked_speedup",
    "small_tokens_per_s",
    "small_unpacked_tokens_per_s",
)


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses resolve their module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_train", None)


def test_quick_run_prints_json_with_positive_rates(bench, capsys):
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--json"])
    finally:
        torch.set_num_threads(threads)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in KEYS:
        assert last[key] > 0, key
        assert last[key] == pytest.approx(result[key])
    tiny, small = result["rows"]
    assert (tiny["model"], small["model"]) == ("tiny", "small") and small["params"] > 5 * tiny["params"]
    # one step per dialogue unpacked, several dialogues per packed step, over the same dialogues
    assert tiny["unpacked_steps"] == tiny["dialogues"] == 16 and tiny["packed_steps"] < tiny["dialogues"]
    assert small["dialogues"] == 6 and 0 < small["real_tokens"] < tiny["real_tokens"]
    assert 0.5 < tiny["packing_efficiency"] <= 1.0
    assert tiny["speedup"] == pytest.approx(tiny["packed_tokens_per_s"] / tiny["unpacked_tokens_per_s"])


def test_packed_layout_attended_pairs_match_the_generalized_causal_rule(bench):
    table = bench.packed_layout(512)  # two documents: text 32 | noised 64 | clean 64 | ViT 64 | text 32
    e = 32
    # text causal; noised sees the text before it and itself; clean does not see the noised view; ViT sees
    # text + clean + itself; the reply text sees everything clean before it, causally within itself
    per_doc = e * (e + 1) // 2 + 2 * e * 3 * e + 2 * e * 3 * e + 2 * e * 5 * e + e * 5 * e + e * (e + 1) // 2
    cfg = MoTConfig(vocab_size=8, hidden_size=8, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4,
                    intermediate_size=16)  # fmt: skip
    flops = bench.step_flops(cfg, table, expert_params=100)
    assert flops == 6 * 100 * 512 + 12 * 2 * 4 * (2 * per_doc) * 3


def test_backbone_step_runs_on_cpu_with_a_tiny_backbone(bench):
    cfg = MoTConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                    intermediate_size=64, attn_backend="flex")  # fmt: skip
    out = bench.backbone_step(cfg, device="cpu", dtype=torch.float32, seq_len=256, steps=1, warmup=1)
    assert out["tokens_per_s"] > 0 and out["tflops"] > 0 and 0 < out["mfu"] < 1
    assert out["tokens_per_s"] == pytest.approx(256 / (out["step_ms"] / 1e3))
    sdpa = bench.backbone_step(replace(cfg, attn_backend="sdpa"), device="cpu", dtype=torch.float32, seq_len=256,
                               steps=1, warmup=1)  # fmt: skip
    assert sdpa["tokens_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_reports_mfu(bench):
    out = bench.backbone_step(bench.bagel_7b_config(2), device="cuda", dtype=torch.bfloat16, steps=3, warmup=2)
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1
