"""Bad samples never stop training: a shard mixing every bad kind trains to the end, each skip counted by reason; data
that cannot make a batch stops the run within seconds with one line; damaged shards are reported as truncated."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from _bad_data import bad_mix, flip_header_byte, good_samples, write_tar

from chatumm_kit.cli import main
from chatumm_kit.data.shards import ShardRef, iter_shard, read_samples
from chatumm_kit.data.skips import DataHealth


def _data_dir(trained_checkpoint: Path) -> Path:
    return trained_checkpoint.parents[2] / "data"  # the session fixture's prepared shards and tokenizer


def _printed_metrics(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^\s+(data/\S+): ([0-9.]+)$", out, flags=re.M)}


def test_a_shard_of_every_bad_kind_trains_to_the_end_counting_each(
    tmp_path, capsys, trained_checkpoint, train_recipe
) -> None:
    data = _data_dir(trained_checkpoint)
    samples, expected, n_good = bad_mix(good_samples(data / "train", 6))
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_tar(bad_dir / "mixed-000000.tar", samples)
    recipe = train_recipe(
        tmp_path / "train.yaml",
        out=tmp_path / "run",
        data=data,
        overrides=[
            f"data.train_sources=[{{name: bad, shards: '{bad_dir}'}}]",
            "+data.max_health_examples=64",
            "data.max_image_side=16",  # every image is reduced while decoding (the 16-bit one included)
            "trainer.max_steps=-1",
            "+trainer.max_epochs=1",
            "trainer.callbacks=[{_component_: lightning.pytorch.callbacks.ModelCheckpoint, dirpath: "
            f"'{tmp_path}/run/checkpoints', save_last: true}}, "
            "{_component_: chatumm_kit.training.callbacks.DataHealthLogger, every_n_steps: 1}]",
        ],
    )
    assert main(["train", str(recipe)]) == 0
    metrics = _printed_metrics(capsys.readouterr().out)
    counts = {k[len("data/skip/") :]: int(v) for k, v in metrics.items() if k.startswith("data/skip/")}
    assert counts == expected
    assert metrics["data/samples_ok"] == n_good  # the good ones and the 16-bit PNG all trained
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("resampled", [False, True], ids=["one-pass", "resampled"])
def test_no_sample_fits_the_budget_stops_within_seconds_with_one_line(
    tmp_path, capsys, trained_checkpoint, train_recipe, resampled
) -> None:
    data = _data_dir(trained_checkpoint)
    overrides = ["data.token_budget=16", "trainer.max_steps=50"]
    if resampled:
        overrides += ["+data.resampled=true", "+data.batches_per_epoch=10"]
    recipe = train_recipe(tmp_path / "train.yaml", out=tmp_path / "run", data=data, overrides=overrides)
    start = time.perf_counter()
    assert main(["train", str(recipe)]) == 1
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: train data") and "over_length" in line, line
    shortest = int(re.search(r"shortest sample needs (\d+) tokens", line).group(1))
    assert shortest > 16 and "token_budget 16" in line
    assert took < 30, took


def test_a_shard_of_empty_dialogues_stops_the_run(tmp_path, capsys, trained_checkpoint, train_recipe) -> None:
    data = _data_dir(trained_checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tar(empty / "e-000000.tar", [{"json": b'{"id": "d%d", "turns": []}' % i} for i in range(5)])
    recipe = train_recipe(
        tmp_path / "train.yaml",
        out=tmp_path / "run",
        data=data,
        overrides=[f"data.train_sources=[{{name: e, shards: '{empty}'}}]", "trainer.max_steps=5"],
    )
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no batch from the 5 sample(s)" in err[0] and "malformed_json 5" in err[0], err


@pytest.mark.parametrize("indexed", [False, True], ids=["no-index", "index"])
def test_a_flipped_byte_in_a_tar_header_is_reported_as_truncation(tmp_path, trained_checkpoint, indexed) -> None:
    members = good_samples(_data_dir(trained_checkpoint) / "train", 6)
    path = write_tar(tmp_path / "s-000000.tar", members)
    per_sample = len(members[0])
    assert per_sample >= 2
    flip_header_byte(path, member_index=3 * per_sample + 1)  # the second member of the 4th sample
    health = DataHealth()
    ref = ShardRef(str(path), num_samples=6 if indexed else None)
    keys = [raw.key for raw in iter_shard(ref, health=health)]
    assert keys == ["000000", "000001", "000002"]
    assert health.counts == {"truncated_shard": 1}
    message = health.examples[0].message
    assert "damaged tar header" in message and "after 3 complete samples" in message
    assert "sample '000003' lost" in message
    assert ("index lists 6" in message) == indexed
    # and never as a sample without its JSON
    assert len(list(read_samples([ref], health=DataHealth()))) == 3


def test_an_idle_worker_and_a_resumed_finished_epoch_do_not_stop_the_run(trained_checkpoint) -> None:
    from chatumm_kit.data.datamodule import DialogueDataModule

    data = _data_dir(trained_checkpoint)

    def module() -> DialogueDataModule:
        return DialogueDataModule(
            train_sources=[{"name": "s", "shards": str(data / "train")}],
            tokenizer=data / "tokenizer",
            vit_patch_size=8,
            vae_token_stride=8,
            max_image_side=32,
            token_budget=1024,
            num_workers=2,  # one shard: worker 1 has nothing to read
            shuffle_buffer=0,
        )

    dm = module()
    batches = [dm.consume(item) for item in dm.train_dataloader()]
    assert batches and dm.health().samples_ok == 12
    again = module()
    again.load_state_dict(dm.state_dict())  # saved after the epoch's last batch
    assert [again.consume(item) for item in again.train_dataloader()] == []  # nothing left, and no stop
