"""benchmarks/bench_chat.py: a quick run prints the cached-vs-recompute table and, last, one JSON object of its
figures; the benchmark's dialogue has the promised shape."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from chatumm_kit.data.dialogue import Role


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_chat.py"
    spec = importlib.util.spec_from_file_location("bench_chat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_chat"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_chat", None)


def test_dialogue_has_eight_exchanges_with_an_image_and_text_per_user_turn(bench):
    turns = bench.shapes_dialogue()
    assert [role for role, _ in turns] == [Role.USER, Role.ASSISTANT] * 8
    for role, parts in turns:
        kinds = [type(p) for p in parts]
        if role is Role.USER:
            assert kinds == [torch.Tensor, str] and parts[0].shape == (3, 32, 32)
        else:
            assert str in kinds
    assert any(isinstance(p, torch.Tensor) for role, parts in turns if role is Role.ASSISTANT for p in parts)


def test_quick_run_prints_the_table_then_json(bench, capsys):
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--json", "--tokens", "2", "--steps", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert any(line.lstrip().startswith("8 ") for line in lines)
    scalars = [
        "turn8_recompute_over_cached",
        "turn8_recompute_over_cached_image",
        "cfg3_over_cfg1",
        "cfg1_ms",
        "cfg3_ms",
        "cached_growth_turn8_over_turn1",
        "cached_growth_turn8_over_turn1_image",
        "cached_growth_turn8_over_turn1_outside_attention",
        "cached_growth_turn8_over_turn1_image_outside_attention",
        "think_image_ms",
        "think_over_image",
    ]
    for key in scalars:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["turns"] == list(range(1, 9))
    history = result["history_tokens"]
    assert history[0] == 0 and all(a < b for a, b in zip(history, history[1:]))
    for key in ["cached_text_ms", "recompute_text_ms", "ratio_text", "cached_image_ms", "recompute_image_ms"]:
        assert len(result[key]) == 8 and all(math.isfinite(v) and v > 0 for v in result[key]), key
    assert result["turn8_recompute_over_cached"] == pytest.approx(
        result["recompute_text_ms"][-1] / result["cached_text_ms"][-1]
    )
    assert result["turn8_recompute_over_cached_image"] == result["ratio_image"][-1]
    assert isinstance(result["target_met"], bool)
    assert any("think at turn 8" in line for line in lines)
    for kind in ("text", "image"):  # cached attention is part of the turn (the meter wraps only the growth runs)
        g = result["cached_growth_ms"][kind]
        assert 0 < g["turn1_attention_ms"] < g["turn1_turn_ms"] and 0 < g["turn8_attention_ms"] < g["turn8_turn_ms"]
