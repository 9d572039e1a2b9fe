"""benchmarks/bench_synth.py runs and reports its figures (quick mode)."""

import importlib.util
import json
from pathlib import Path


def test_bench_synth_quick_reports_rule_and_http_throughput(capsys):
    path = Path(__file__).parents[2] / "benchmarks" / "bench_synth.py"
    spec = importlib.util.spec_from_file_location("bench_synth", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--json", "--latency-ms", "5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["rule_dialogues_per_s"] > 0 and result["http_concurrency8_speedup"] > 0
    rows = result["rows"]
    # both concurrencies wrote every dialogue with the same number of real HTTP calls (answers were all valid)
    assert rows["http_c1"]["dialogues"] == rows["http_c8"]["dialogues"] == 8
    assert rows["http_c1"]["calls"] == rows["http_c8"]["calls"] > 8
