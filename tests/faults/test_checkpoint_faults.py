"""Damaged checkpoints: each gives one line naming it and the newest readable one beside it; ``resume_from=last``
falls back to that one and says so; a folder resolves to its newest checkpoint; ``last`` with nothing to resume is an
error unless ``last_or_fresh``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from chatumm_kit.cli import main


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":  # bytes flipped inside the pickled part: a checksum-less corruption
        at = data.find(b"data.pkl") + 60
        path.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at : at + 30]) + data[at + 30 :])
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")


@pytest.fixture
def run_copy(tmp_path, trained_checkpoint, train_recipe):
    """A copy of the session's 2-step run (``last.ckpt`` and ``epoch=0-step=2.ckpt``) and a recipe training it on."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parents[1], run)
    recipe = train_recipe(tmp_path / "train.yaml", out=run, data=trained_checkpoint.parents[2] / "data")
    return run, recipe


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.parametrize("kind", ["truncated", "flipped", "zero", "text"])
def test_resume_from_last_falls_back_to_the_newest_readable_checkpoint(run_copy, capsys, kind) -> None:
    run, recipe = run_copy
    last, intact = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch=0-step=2.ckpt"
    damage(last, kind)
    assert main(["train", str(recipe), "resume_from=last", "trainer.max_steps=3"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1, err
    assert str(last) in err[0] and f"resuming from {intact}" in err[0] and "weights_only=False" not in err[0]
    assert _step(run / "checkpoints" / "epoch=0-step=3.ckpt") == 3  # resumed at step 2, trained one more


@pytest.mark.parametrize("kind", ["truncated", "flipped", "zero", "text"])
def test_a_damaged_checkpoint_named_explicitly_is_one_line_with_the_one_beside_it(run_copy, capsys, kind) -> None:
    run, recipe = run_copy
    last = run / "checkpoints" / "last.ckpt"
    damage(last, kind)
    assert main(["train", str(recipe), f"resume_from={last}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and "weights_only=False" not in err[0], err
    assert f"the newest readable checkpoint beside it is {run / 'checkpoints' / 'epoch=0-step=2.ckpt'}" in err[0]
    # chat names the same in one line
    (run / "hi.jsonl").write_text('{"user": "hi"}\n')
    assert main(["chat", str(last), "--script", str(run / "hi.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and "epoch=0-step=2.ckpt" in err[0], err


def test_resume_from_a_folder_takes_its_newest_checkpoint(run_copy) -> None:
    run, recipe = run_copy
    assert main(["train", str(recipe), f"resume_from={run / 'checkpoints'}", "trainer.max_steps=3"]) == 0
    assert _step(run / "checkpoints" / "epoch=0-step=3.ckpt") == 3


def test_last_with_nothing_to_resume_is_an_error_unless_asked_to_start_fresh(
    tmp_path, capsys, trained_checkpoint, train_recipe
) -> None:
    data = trained_checkpoint.parents[2] / "data"
    unprepared = train_recipe(tmp_path / "new.yaml", out=tmp_path / "fresh", data=tmp_path / "no_data_yet")
    assert main(["train", str(unprepared), "resume_from=last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint in" in err[0] and "resume_from=last_or_fresh" in err[0], err
    assert not (tmp_path / "no_data_yet").exists()  # refused before the prepare steps ran
    recipe = train_recipe(tmp_path / "train.yaml", out=tmp_path / "fresh", data=data)
    assert main(["train", str(recipe), "resume_from=last_or_fresh"]) == 0
    assert "starting fresh" in capsys.readouterr().out
    assert _step(tmp_path / "fresh" / "checkpoints" / "last.ckpt") == 2
