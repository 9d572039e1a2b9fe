"""benchmarks/bench_bagel_chat.py plays its three forced turns through `chatumm chat` on a tiny BAGEL-shaped kit
folder on CPU and reports the timings the GPU run (benchmarks/gpu_checks.sh) is read by."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_bagel_chat.py"


def test_tiny_cpu_run_answers_t2i_edit_and_vqa_and_times_the_steps(tmp_path):
    argv = [sys.executable, str(BENCH), "--device", "cpu", "--tiny", "--dtype", "float32", "--steps", "2"]
    argv += ["--tokens", "3", "--work", str(tmp_path), "--json"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["intents"] == [["image", "end"], ["image", "end"], ["text", "end"]]
    assert result["image_sizes"][:2] == [[32, 32], [24, 32]]  # T2I at --image-size; the edit at the photo's size
    assert result["euler_steps"] == 2 * 2 and result["text_tokens"] == 3 + 2  # im_s, 3 tokens, im_e
    assert result["t2i_euler_step_ms"] > 0 and result["edit_euler_step_ms"] > 0 and result["text_token_ms"] > 0
    assert "user images enter as: vit (bagel_release" in result["chat_log"][0]  # a converted release's default
    assert (tmp_path / "kit" / "chatumm_provenance.json").is_file()
    assert "Euler step (t2i)" in proc.stdout
