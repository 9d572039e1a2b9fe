"""benchmarks/bench_eval.py: a quick run prints its table and, last, one JSON object; sixteen verdicts in flight beat
one at a time against a judge with a fixed latency, and every verdict parses."""

import importlib.util
import json
from pathlib import Path


def test_bench_eval_quick_run(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--json", "--turns", "32", "--latency-ms", "50"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["failed_verdicts"] == 0 and result["judged_turns"] == 32
    assert result["judge_concurrency16_speedup"] > 3  # ideal 16 (32 turns: two waves); loose for a busy machine
