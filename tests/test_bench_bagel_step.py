"""benchmarks/bench_bagel_step.py runs its whole path (recipe system, meta-device plan, FSDP2 on a one-process mesh,
AdamW steps) on a tiny BAGEL-shaped model on CPU and reports the keys the GPU run is read by."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from _multiprocess import free_port

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_bagel_step.py"


def test_tiny_cpu_run_reports_mfu_peak_memory_and_the_plan(tmp_path):
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--steps", "2", "--warmup", "0", "--json"]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"mfu", "peak_mem_gib", "plan_mem_gib"} <= result.keys()
    assert result["mfu"] is None  # no GPU peak on CPU
    assert result["peak_mem_gib"] > 0 and 0 < result["plan_mem_gib"] < result["peak_mem_gib"]  # RSS holds torch too
    assert result["tokens"] > 100 and result["tokens_per_s"] > 0 and result["tflops"] > 0
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert "chatumm plan predicts" in proc.stdout
