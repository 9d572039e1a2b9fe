"""benchmarks/bench_lora.py: on the same model and batch, LoRA trains a small fraction of the weights, keeps a small
fraction of the optimizer state, and the JSON line carries the ratios the issue names."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench_lora.py"


def test_quick_run_prints_a_table_and_the_ratios_as_json(capsys):
    spec = importlib.util.spec_from_file_location("bench_lora", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_lora"] = bench  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--json", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "LoRA vs full fine-tuning" in out and "optimizer_bytes" in out
    result = json.loads(out.strip().splitlines()[-1])
    full, lora = result["full"], result["lora"]
    assert lora["trainable_params"] < full["trainable_params"] / 2
    # AdamW keeps two moments per trainable weight (+ a step counter): the ratio follows the trainable counts
    assert abs(result["lora_optimizer_bytes_ratio"] - lora["trainable_params"] / full["trainable_params"]) < 0.01
    assert result["lora_optimizer_bytes_ratio"] < 0.5
    assert result["lora_step_time_ratio"] > 0 and lora["step_s"] > 0
    assert full["peak_memory_bytes"] >= 0 and "lora_peak_memory_ratio" in result
