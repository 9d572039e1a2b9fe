"""benchmarks/bench_train.py runs and reports its figures (quick mode)."""

import importlib.util
from pathlib import Path


def test_bench_train_quick_reports_positive_rates(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick", "--json"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("{") and '"packed_vs_unpacked_speedup"' in last
    assert result["tiny_tokens_per_s"] > 0 and result["packed_vs_unpacked_speedup"] > 0
    row = result["rows"][0]
    # both loops saw the same dialogues, and the packed batches hold all of them
    assert row["dialogues"] == 24 and row["packed_batches"] < row["dialogues"]
    assert 0.5 < row["packing_efficiency"] <= 1.0
