"""benchmarks/scaling_curve.py: the per-size logit-linear fit recovers a known trend and the compute at which it
reaches the targets; unfinished runs are left out; a readable table and, last, one JSON object."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml


def _module():
    path = Path(__file__).parent.parent / "benchmarks" / "scaling_curve.py"
    spec = importlib.util.spec_from_file_location("scaling_curve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(root, hidden, steps, params, vqa, attr, *, done=True):
    run = root / f"h{hidden}_s{steps}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "eval").mkdir()
    recipe = {"system": {"model": {"hidden_size": hidden, "num_layers": 2}}, "trainer": {"max_steps": steps},
              "data": {"token_budget": 1000}}  # fmt: skip
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.save({"global_step": steps if done else steps // 2}, run / "checkpoints" / "last.ckpt")
    (run / "params.json").write_text(json.dumps({"params": params}))
    headline = {"history_vqa_acc_d2plus": vqa, "history_vqa_acc_d2plus_ci95": [vqa - 0.04, vqa + 0.04],
                "history_vqa_acc_d2plus_n": 400, "history_attr_acc_d2plus": attr,
                "history_attr_acc_d2plus_ci95": [attr - 0.04, attr + 0.04], "history_attr_acc_d2plus_n": 400}  # fmt: skip
    (run / "eval" / "eval_report.json").write_text(json.dumps({"headline": headline}))


def test_fit_recovers_a_known_trend_and_the_target_compute(tmp_path, capsys):
    sc = _module()
    # logit(acc) = -12 + 1.0 · log10(C) (VQA) and -14 + 1.0 · log10(C) (attr), C = 6 · N · steps · 1000
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for hidden, params in ((32, 100_000), (64, 300_000)):
        for steps in (100, 300, 900):
            lc = math.log10(6 * params * steps * 1000)
            _run(tmp_path, hidden, steps, params, sigmoid(-12 + lc), sigmoid(-14 + lc))
    # last.ckpt of an unfinished schedule (written at step 450 of 900): its compute is that of 450 steps
    _run(tmp_path, 96, 900, 900_000, 0.5, 0.5, done=False)
    result = sc.main(["--root", str(tmp_path), "--json", "--plot", str(tmp_path / "curve.png")])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result
    assert {p["run"] for p in result["points"]} == {f"h{h}_s{s}" for h in (32, 64, 96) for s in (100, 300, 900)
                                                    if h != 96 or s == 900}  # fmt: skip
    partial = next(p for p in result["points"] if p["run"] == "h96_s900")
    assert (partial["steps"], partial["schedule_steps"]) == (450, 900) and partial["flops"] == 6 * 900_000 * 450_000
    for size in ("h32_l2", "h64_l2"):
        vqa, attr = result["fits"]["vqa"][size], result["fits"]["attr"][size]
        assert vqa["slope"] == pytest.approx(1.0, abs=1e-6) and attr["slope"] == pytest.approx(1.0, abs=1e-6)
        assert vqa["target_log10_flops"] == pytest.approx(12 + math.log(9), abs=1e-6)  # logit(0.9) = ln 9
        assert attr["target_log10_flops"] == pytest.approx(14 + math.log(4), abs=1e-6)  # logit(0.8) = ln 4
        lo, hi = vqa["target_range"]
        assert lo < vqa["target_log10_flops"] < hi
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("vqa    h32_l2") for line in out)


def test_a_falling_trend_never_reaches_the_target():
    sc = _module()
    fit = sc.fit_with_target([1.0, 2.0, 3.0], [0.5, 0.4, 0.3], [0.01, 0.01, 0.01], 0.9, draws=50)
    assert fit.slope < 0 and fit.target_log10_flops is None
