"""DialogueDataModule: exactly-once epochs across ranks × workers, exact resume, bad data counted, resampled mixing,
YAML construction, and a Lightning fit → checkpoint → resume round trip."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from test_shards import make_sample, write_bad_shards

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config.instantiate import instantiate
from chatumm_kit.config.validate import validate_recipe
from chatumm_kit.data.datamodule import DialogueDataModule, _round_robin_after
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, Role, TextSegment, Turn
from chatumm_kit.data.shards import DialogueShardWriter
from chatumm_kit.data.streaming import SourceSpec, StreamBatch, assign_shards

WORDS = "look at this answer now draw it the a red blue circle square".split()


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4, vocab_size=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source a: 8 shards x 5 samples; source b: 4 shards x 4 samples. Image sides 8/16/24 → varied lengths."""
    root = tmp_path_factory.mktemp("shards")
    for name, n, per in (("a", 40, 5), ("b", 16, 4)):
        with DialogueShardWriter(directory=root / name, max_samples_per_shard=per) as w:
            for i in range(n):
                w.write(make_sample(i, side=8 * (1 + i % 3), seed=ord(name)))
    return {"a": root / "a" / "index.json", "b": root / "b" / "index.json", "root": root}


ALL_KEYS = {f"a/shard-{i // 5:06d}.tar/{i % 5:06d}" for i in range(40)} | {
    f"b/shard-{i // 4:06d}.tar/{i % 4:06d}" for i in range(16)
}


def make_dm(tok: ChatTokenizer, data: dict[str, Path], **kw) -> DialogueDataModule:
    args = dict(
        train_sources=[SourceSpec(name="a", shards=str(data["a"])), {"name": "b", "shards": str(data["b"])}],
        tokenizer=tok,
        vit_patch_size=8,
        vae_token_stride=8,
        max_image_side=32,
        token_budget=200,
        overflow_size=2,
        num_workers=0,
        shuffle_buffer=8,
        seed=3,
    )
    args.update(kw)
    dm = DialogueDataModule(**args)
    dm.setup("fit")
    return dm


def sample_id(key: str) -> str:
    return key.rsplit("#", 1)[0]


def run_epoch(dm: DialogueDataModule, *, stop_after: int | None = None) -> list[str]:
    """Consume batches like a training loop; returns the sample ids in order."""
    out: list[str] = []
    for i, item in enumerate(dm.train_dataloader()):
        if stop_after is not None and i == stop_after:
            break  # the loader has prefetched more; those batches were never consumed
        assert isinstance(item, StreamBatch)
        batch = dm.consume(item)
        assert isinstance(batch, PackedBatch) and batch.seq_len == 200
        out.extend(sample_id(k) for k in batch.sample_keys)
    return out


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(tok, data) -> None:
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        dm = make_dm(tok, data, rank=rank, world_size=2, num_workers=2)
        seen[rank] = run_epoch(dm)
        workers = {int(w) for w in dm.state_dict()["ranks"][str(rank)]["positions"]}
        assert workers == {0, 1}  # both workers of this rank delivered batches
    both = seen[0] + seen[1]
    assert len(both) == len(set(both)) == len(ALL_KEYS)
    assert set(both) == ALL_KEYS
    assert seen[0] and seen[1]


def test_shard_deal_is_a_partition_and_epochs_reshuffle(tok, data) -> None:
    dm = make_dm(tok, data)
    sources = dm.train_stream.sources
    slots = assign_shards(sources, num_slots=4, seed=3, epoch=0, shuffle=True)
    dealt = [ref.path for slot in slots for _, ref in slot]
    assert sorted(dealt) == sorted(r.path for s in sources for r in s.shards) and all(len(s) == 3 for s in slots)
    first, second = run_epoch(dm), run_epoch(dm)
    assert set(first) == set(second) == ALL_KEYS and len(first) == len(second) == len(ALL_KEYS)
    assert first != second  # epoch 1 draws a new order from the seed
    assert run_epoch(make_dm(tok, data)) == first  # … and the same seed gives the same order again


@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_resume_mid_epoch_continues_with_exactly_the_rest(tok, data, stop_after: int) -> None:
    dm = make_dm(tok, data)
    head = run_epoch(dm, stop_after=stop_after)
    state = dm.state_dict()
    pos = state["ranks"]["0"]["positions"]["0"]
    assert pos["low"] + len(pos["done_above"]) == len(head)
    resumed = make_dm(tok, data)
    resumed.load_state_dict(state)
    tail = run_epoch(resumed)
    assert not set(head) & set(tail)
    assert sorted(head + tail) == sorted(ALL_KEYS)
    assert resumed.last_epoch_health["train"].samples_ok == len(ALL_KEYS)  # restored counts + new ones


def test_resume_keeps_samples_waiting_in_the_packer_buffer(tok, data) -> None:
    # Find a cut where a later sample was emitted while an older one still waited in the overflow buffer:
    # those waiting samples must come back after the resume (counting them consumed at read time would lose them).
    for stop_after in range(1, 12):
        dm = make_dm(tok, data)
        head = run_epoch(dm, stop_after=stop_after)
        state = dm.state_dict()
        if state["ranks"]["0"]["positions"]["0"]["done_above"]:
            break
    else:
        pytest.fail("no cut with samples waiting in the packer buffer; make the test data more varied")
    resumed = make_dm(tok, data)
    resumed.load_state_dict(state)
    tail = run_epoch(resumed)
    assert sorted(head + tail) == sorted(ALL_KEYS) and not set(head) & set(tail)


def test_resume_with_two_workers_and_prefetched_batches(tok, data) -> None:
    dm = make_dm(tok, data, num_workers=2)
    head = run_epoch(dm, stop_after=5)
    state = dm.state_dict()
    assert set(state["ranks"]["0"]["positions"]) == {"0", "1"}
    resumed = make_dm(tok, data, num_workers=2)
    resumed.load_state_dict(state)
    tail = run_epoch(resumed)
    assert sorted(head + tail) == sorted(ALL_KEYS) and not set(head) & set(tail)


def test_position_is_ignored_when_the_setup_changed(tok, data, caplog) -> None:
    dm = make_dm(tok, data)
    run_epoch(dm, stop_after=2)
    state = dm.state_dict()
    other = make_dm(tok, data, seed=4)
    other.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="chatumm_kit.data.datamodule"):
        assert sorted(run_epoch(other)) == sorted(ALL_KEYS)
    assert "data position not restored" in caplog.text and "'seed': (3, 4)" in caplog.text


def test_bad_samples_stream_through_counted_by_reason(tok, data, tmp_path, caplog) -> None:
    expected = write_bad_shards(tmp_path / "bad")
    long_text = " ".join(WORDS * 30)
    too_long = DialogueSample(
        dialogue=Dialogue(id="long", turns=[Turn(role=Role.USER, segments=[TextSegment(text=long_text)])]),
        images={},
    )
    with DialogueShardWriter(directory=tmp_path / "bad", prefix="long") as w:
        w.write(too_long)
        w.write(make_sample(99))
    dm = make_dm(tok, data, train_sources=[{"name": "bad", "shards": str(tmp_path / "bad" / "*.tar")}])
    with caplog.at_level(logging.WARNING, logger="chatumm_kit.data.datamodule"):
        got = run_epoch(dm)
    health = dm.last_epoch_health["train"]
    assert health.counts == {**expected, "over_length": 1}
    # Good ones: 3 in shard 0, one before each cut, and the short one of the "long" shard.
    assert len(got) == health.samples_ok == 6
    assert "over_length: 1" in caplog.text and "truncated_shard: 2" in caplog.text
    assert health.metrics()["data/skip/corrupt_image"] == 1.0
    over = [e for e in health.examples if e.reason == "over_length"]
    assert over and "tokens > cap 200" in over[0].message


def test_resampled_mode_mixes_by_weight_with_fixed_epoch_length(tok, data) -> None:
    sources = [
        {"name": "a", "shards": str(data["a"]), "weight": 1.0},
        {"name": "b", "shards": str(data["b"]), "weight": 3.0},
    ]
    dm = make_dm(tok, data, train_sources=sources, resampled=True, batches_per_epoch=12)
    loader = dm.train_dataloader()
    assert len(loader) == 12
    items = [dm.consume(x) for x in loader]
    assert len(items) == 12
    keys = [k for b in items for k in b.sample_keys]
    share_b = sum(k.startswith("b/") for k in keys) / len(keys)
    assert 0.6 <= share_b <= 0.9  # weight 3:1 → 0.75
    # Resume inside a resampled epoch: the rest of the 12 batches, no ordinal consumed twice.
    head_dm = make_dm(tok, data, train_sources=sources, resampled=True, batches_per_epoch=12)
    head = [k for _, x in zip(range(5), head_dm.train_dataloader()) for k in head_dm.consume(x).sample_keys]
    resumed = make_dm(tok, data, train_sources=sources, resampled=True, batches_per_epoch=12)
    resumed.load_state_dict(head_dm.state_dict())
    rest = [resumed.consume(x) for x in resumed.train_dataloader()]
    assert len(rest) == 7
    tail = [k for b in rest for k in b.sample_keys]
    assert not set(head) & set(tail)  # keys carry the ordinal: the same draw is never delivered twice


def test_constructs_from_a_yaml_recipe(tok, data, tmp_path) -> None:
    tok_dir = tok.save(tmp_path / "tok")
    cfg = OmegaConf.create(
        f"""
        data:
          _component_: chatumm_kit.data.datamodule.DialogueDataModule
          train_sources:
            - {{name: a, shards: "{data["a"]}", weight: 2}}
            - {{name: b, shards: ["{data["root"]}/b/shard-00000{{0..1}}.tar", "{data["root"]}/b/shard-000003.tar"]}}
          val_sources: [{{name: a, shards: "{data["a"]}"}}]
          tokenizer: {tok_dir}
          drop_rates: {{text: 0.0, vit: 0.5, vae: 0.5}}
          vit_patch_size: 8
          vae_token_stride: 8
          max_image_side: 32
          token_budget: 200
          num_workers: 0
        """
    )
    validate_recipe(cfg)
    dm = instantiate(cfg.data)
    assert dm.train_sources[0] == SourceSpec(name="a", shards=str(data["a"]), weight=2.0)
    assert dm.drop_rates.vit == 0.5
    dm.setup("fit")
    assert [len(s.shards) for s in dm.train_stream.sources] == [8, 3]
    val = [dm.consume(x) for x in dm.val_dataloader()]
    assert sum(len(b.sample_keys) for b in val) == 40 and dm.health("val").samples_ok == 40


def test_bad_arguments_are_named(tok, data) -> None:
    with pytest.raises(ValueError, match=r"train_sources\[0\]: a source needs keys name, shards"):
        make_dm(tok, data, train_sources=[{"name": "a", "shard": "x"}])
    with pytest.raises(ValueError, match="needs at least one shard per rank"):
        make_dm(tok, data, train_sources=[{"name": "b", "shards": str(data["b"])}], rank=0, world_size=5)
    with pytest.raises(ValueError, match="batches_per_epoch needs resampled=True"):
        make_dm(tok, data, batches_per_epoch=3)
    with pytest.raises(ValueError, match="weight must be > 0"):
        SourceSpec(name="a", shards="x", weight=0)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[list[str]] = []

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, PackedBatch)  # the datamodule unwrapped the StreamBatch
        self.batches.append([sample_id(k) for k in batch.sample_keys])
        return (self.w - batch.input_ids.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def test_lightning_fit_checkpoint_resume_is_exact(tok, data, tmp_path) -> None:
    # A mid-epoch checkpoint written by ModelCheckpoint after step 3 (Lightning has prefetched step 4's batch by
    # then; it must not count), then a resumed fit to the end of the epoch.
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first = _Recorder()
    _trainer(max_steps=5, callbacks=[ckpt_cb]).fit(first, datamodule=make_dm(tok, data))
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    assert ckpt.exists() and "DialogueDataModule" in torch.load(ckpt, weights_only=False)
    head = [k for b in first.batches[:3] for k in b]
    second = _Recorder()
    _trainer(max_epochs=1, enable_checkpointing=False).fit(second, datamodule=make_dm(tok, data), ckpt_path=ckpt)
    tail = [k for b in second.batches for k in b]
    assert head and tail and not set(head) & set(tail)
    assert sorted(head + tail) == sorted(ALL_KEYS)


# --------------------------------------------------------------------------------------------- exact resume
DROP = {"text": 0.5, "vit": 0.5, "vae": 0.5}  # make_sample's "now draw it" is droppable: one draw per sample


def checksum(batch: PackedBatch) -> int:
    """Order-sensitive sum of the input ids: differs when a CFG draw or the packing order differs."""
    ids = batch.input_ids.long()
    return int((ids * torch.arange(1, ids.numel() + 1)).sum())


def batch_trace(dm: DialogueDataModule, *, stop_after: int | None = None) -> list[tuple[list[str], int]]:
    """(sample keys, checksum) of each consumed batch of one epoch (keys keep their ordinal)."""
    out = []
    for i, item in enumerate(dm.train_dataloader()):
        if i == stop_after:
            break
        batch = dm.consume(item)
        out.append((list(batch.sample_keys), checksum(batch)))
    return out


def test_resume_at_every_cut_replays_the_uninterrupted_batches_exactly(tok, data) -> None:
    # Same batches (grouping, order, CFG draws) whether or not the epoch was cut, wherever the cut falls: while
    # samples wait in the packer's buffer, and in the tail the packer packs first-fit decreasing after the stream
    # ended. Old failure: the resumed packer started empty (other groupings) and the CFG generator restarted.
    full = batch_trace(make_dm(tok, data, drop_rates=DROP, overflow_size=8))
    undropped = batch_trace(make_dm(tok, data, overflow_size=8))
    assert [k for k, _ in undropped] == [k for k, _ in full]  # dropout never changes the grouping …
    assert sum(a != b for (_, a), (_, b) in zip(full, undropped)) >= len(full) // 3  # … but it did drop
    kinds = set()
    for cut in range(1, len(full)):
        head_dm = make_dm(tok, data, drop_rates=DROP, overflow_size=8)
        head = batch_trace(head_dm, stop_after=cut)
        state = head_dm.state_dict()
        pos = state["ranks"]["0"]["positions"]["0"]
        kinds.add((bool(pos["waiting"]), pos["ended"]))
        resumed = make_dm(tok, data, drop_rates=DROP, overflow_size=8)
        resumed.load_state_dict(state)
        assert head + batch_trace(resumed) == full, f"cut after batch {cut}"
    assert {(True, False), (True, True)} <= kinds  # cuts with a buffer mid-stream and in the tail were tried


class _TraceRecorder(L.LightningModule):
    """Records (sample keys, input-id checksum) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.trace: list[tuple[list[str], int]] = []
        self.val_batches = 0

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self.trace.append((list(batch.sample_keys), checksum(batch)))
        return (self.w - batch.input_ids.float().mean()) ** 2

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        self.val_batches += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_trains_on_exactly_the_uninterrupted_batches(tok, data, tmp_path, num_workers: int) -> None:
    # ModelCheckpoint after step 3 (Lightning — and with workers, the DataLoader — has prefetched beyond it), a
    # validation pass at the same step, CFG dropout on: the resumed fit must see the very batches the uninterrupted
    # one saw after step 3. The overflow buffer outlasts the epoch, so each worker reads its whole stream before its
    # first batch and packs it first-fit decreasing (like tests/systems/test_unified.py); with 2 workers, step 3
    # came from worker 0, so worker 1 is due first after the resume.
    kw = dict(
        num_workers=num_workers,
        drop_rates=DROP,
        overflow_size=64,
        val_sources=[{"name": "b", "shards": str(data["b"])}],
    )
    val = dict(val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    full = _TraceRecorder()
    _trainer(max_epochs=1, callbacks=[ckpt_cb], **val).fit(full, datamodule=make_dm(tok, data, **kw))
    assert full.val_batches > 0 and len(full.trace) > 6
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)["DialogueDataModule"]["ranks"]["0"]
    assert all(p["waiting"] and p["ended"] for p in saved["positions"].values())  # a tail with samples waiting
    assert saved["last_worker"] == 0
    resumed = _TraceRecorder()
    _trainer(max_epochs=1, enable_checkpointing=False, **val).fit(
        resumed, datamodule=make_dm(tok, data, **kw), ckpt_path=ckpt
    )
    assert resumed.trace == full.trace[3:]


def _loader_order(lengths: dict[int, int], start: dict[int, int]) -> list[tuple[int, int]]:
    """(worker, batch index) in a DataLoader's order: round-robin from worker 0 over workers with batches left."""
    nxt, out = dict(start), []
    while any(nxt[w] < n for w, n in lengths.items()):
        for w in sorted(lengths):
            if nxt[w] < lengths[w]:
                out.append((w, nxt[w]))
                nxt[w] += 1
    return out


def test_round_robin_resumes_after_the_last_consumed_worker() -> None:
    # Workers that end at different times, one with no batch at all: at every cut, a fresh loader's order
    # (round-robin from worker 0 over what is left) reordered after the last consumed worker = the uninterrupted rest.
    lengths = {0: 5, 1: 2, 2: 4, 3: 0, 4: 3}
    full = _loader_order(lengths, {w: 0 for w in lengths})
    reordered = 0
    for cut in range(1, len(full)):
        done = {w: sum(1 for x, _ in full[:cut] if x == w) for w in lengths}
        fresh = [
            SimpleNamespace(position=SimpleNamespace(worker=w), tag=(w, i)) for w, i in _loader_order(lengths, done)
        ]
        resumed = [x.tag for x in _round_robin_after(iter(fresh), after=full[cut - 1][0])]
        assert resumed == full[cut:], f"cut after {cut}"
        reordered += [x.tag for x in fresh] != full[cut:]
    assert reordered >= 6  # most cuts need the reorder: a fresh loader starts again at worker 0
