"""benchmarks/bench_sessions.py: a quick run prints the table and, last, one JSON object of its figures."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_sessions.py"
    spec = importlib.util.spec_from_file_location("bench_sessions", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sessions"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_sessions", None)


def test_quick_run_prints_the_table_then_json(bench, capsys):
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--json", "--sizes", "1", "2"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert any(line.startswith("image    2") for line in lines)
    rows = result["rows"]
    assert [(r["reply"], r["sessions"]) for r in rows] == [("text", 1), ("text", 2), ("image", 1), ("image", 2)]
    for r in rows:
        assert r["one_by_one_s"] > 0 and r["batched_s"] > 0
        assert r["speedup"] == pytest.approx(r["one_by_one_s"] / r["batched_s"])
        assert result["speedup"][r["reply"]][str(r["sessions"])] == r["speedup"]
    assert rows[0]["steps_per_reply"] == result["text_tokens"] + 2 and rows[2]["steps_per_reply"] == 2
