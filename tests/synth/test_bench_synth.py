"""benchmarks/bench_synth.py: quick mode runs rule and HTTP synthesis end to end and reports positive figures."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_synth.py"


def _load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_synth", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_bench_synth_quick_prints_table_and_json_line(capsys, monkeypatch):
    bench = _load_bench(monkeypatch)
    threads = torch.get_num_threads()
    result = bench.main(["--quick", "--json", "--latency-ms", "5"])
    out = capsys.readouterr().out.strip().splitlines()
    line = json.loads(out[-1])  # the LAST stdout line is the JSON object
    assert line == json.loads(json.dumps(result))
    for key in ("rule_dialogues_per_s", "http_concurrency1_dialogues_per_s", "http_concurrency8_dialogues_per_s",
                "http_concurrency8_speedup"):  # fmt: skip
        assert line[key] > 0, key
    rows = {r["name"]: r for r in line["rows"]}
    assert set(rows) == {"rule", "http_c1", "http_c8"}
    assert rows["rule"]["dialogues"] == 100 and rows["rule"]["llm_calls"] > 100  # several ops per dialogue
    # every answer echoed back was valid: both concurrencies wrote all dialogues with the same real HTTP calls
    c1, c8 = rows["http_c1"], rows["http_c8"]
    assert c1["dialogues"] == c8["dialogues"] == 8
    assert c1["llm_calls"] == c8["llm_calls"] == c1["http_requests"] == c8["http_requests"] > 8
    assert (c8["concurrency"], c1["concurrency"]) == (8, 1)
    assert line["http_concurrency8_speedup"] == c8["dialogues_per_s"] / c1["dialogues_per_s"]
    assert any(r.startswith("http_c8") for r in out) and "speed-up" in "\n".join(out)
    assert torch.get_num_threads() == threads  # main() restores the torch thread count
