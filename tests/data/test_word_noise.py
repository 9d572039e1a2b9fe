"""WordNoise: which words it may touch, what it leaves alone, and that the stream's draws survive a resume."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf
from test_datamodule import batch_trace, data, make_dm, tok  # noqa: F401  (fixtures)
from test_shards import make_sample

from chatumm_kit.config.instantiate import instantiate
from chatumm_kit.config.validate import validate_recipe
from chatumm_kit.data.dialogue import Role, TextSegment
from chatumm_kit.data.shapes import world_words
from chatumm_kit.data.word_noise import WordNoise

SENTENCE = "Remember the one with a red circle? Now delete the 2 blue squares in the top left."


def test_kept_words_and_numbers_survive_every_corruption() -> None:
    noise = WordNoise(turn_prob=1.0, replace=0.7, drop=0.3, keep=world_words())
    content = {"the", "one", "a", "red", "circle?", "2", "blue", "squares", "top", "left."}
    for seed in range(50):
        out = noise.corrupt(SENTENCE, random.Random(seed)).split()
        assert content <= set(out), out
        # every free word was replaced or dropped (replace + drop = 1): no original filler word is left
        assert not {"Remember", "with", "Now", "delete", "in"} & set(out), out


def test_rates_are_the_advertised_ones() -> None:
    noise = WordNoise(turn_prob=1.0, replace=0.2, drop=0.1, keep=())
    rng = random.Random(0)
    words = ["word"] * 20000
    out = noise.corrupt(" ".join(words), rng).split()
    dropped = 1 - len(out) / len(words)
    replaced = sum(w != "word" for w in out) / len(words)
    assert dropped == pytest.approx(0.1, abs=0.01) and replaced == pytest.approx(0.2, abs=0.01)


def test_capitals_and_punctuation_are_kept_and_text_never_empties() -> None:
    noise = WordNoise(turn_prob=1.0, replace=1.0, drop=0.0, keep=())
    out = noise.corrupt("Delete it, (please)!", random.Random(1)).split()
    assert out[0][0].isupper() and out[0][1:].islower() and out[1].endswith(",")
    assert out[2].startswith("(") and out[2].endswith(")!")
    assert WordNoise(turn_prob=1.0, replace=0.0, drop=1.0).corrupt("gone entirely", random.Random(0)) == "gone"


def test_only_user_text_changes() -> None:
    sample = make_sample(3)
    noisy = WordNoise(turn_prob=1.0, replace=1.0, drop=0.0)(sample, random.Random(0))
    for before, after in zip(sample.dialogue.turns, noisy.dialogue.turns):
        texts = [(a.text, b.text) for a, b in zip(before.segments, after.segments) if isinstance(a, TextSegment)]
        if before.role == Role.USER:
            assert all(x != y for x, y in texts)
            assert [type(s) for s in before.segments] == [type(s) for s in after.segments]
            assert all(a.droppable == b.droppable for a, b in zip(before.segments, after.segments))
        else:
            assert after == before
    assert noisy.images is sample.images and noisy.dialogue.meta == sample.dialogue.meta
    assert sample.dialogue.turns[0].segments[0].text == "look at this 3"  # the input is not modified


@pytest.mark.parametrize(
    "kwargs, message",
    [({"replace": 1.5}, "replace"), ({"replace": 0.6, "drop": 0.6}, r"replace \+ drop"), ({"keep": "red"}, "keep")],
)
def test_bad_settings_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        WordNoise(**kwargs)


def test_stream_corrupts_training_text_deterministically_across_resume(tok, data) -> None:  # noqa: F811
    noise = WordNoise(turn_prob=1.0, replace=0.5, drop=0.0, keep=("look", "at"))
    full = batch_trace(make_dm(tok, data, word_noise=noise, overflow_size=8))
    clean = batch_trace(make_dm(tok, data, overflow_size=8))
    assert sum(a != b for (_, a), (_, b) in zip(full, clean)) >= len(full) // 2  # it did corrupt
    assert batch_trace(make_dm(tok, data, word_noise=noise, overflow_size=8)) == full  # same draws every time
    for cut in (1, len(full) // 2):
        head_dm = make_dm(tok, data, word_noise=noise, overflow_size=8)
        head = batch_trace(head_dm, stop_after=cut)
        resumed = make_dm(tok, data, word_noise=noise, overflow_size=8)
        resumed.load_state_dict(head_dm.state_dict())
        assert head + batch_trace(resumed) == full, f"cut after batch {cut}"


def test_validation_is_never_corrupted(tok, data) -> None:  # noqa: F811
    src = [{"name": "a", "shards": str(data["a"])}]
    noise = WordNoise(turn_prob=1.0, replace=1.0, drop=0.0)
    noisy, plain = (make_dm(tok, data, val_sources=src, word_noise=n) for n in (noise, None))
    ids = [[dm.consume(x).input_ids for x in dm.val_dataloader()] for dm in (noisy, plain)]
    assert len(ids[0]) == len(ids[1]) and all((a == b).all() for a, b in zip(*ids))
    with pytest.raises(ValueError, match="word_noise"):
        make_dm(tok, data, word_noise={"replace": 0.2})


def test_a_recipe_builds_it_with_the_world_words(tok, data, tmp_path) -> None:  # noqa: F811
    cfg = OmegaConf.create(
        f"""
        data:
          _component_: chatumm_kit.data.datamodule.DialogueDataModule
          train_sources: [{{name: a, shards: "{data["a"]}"}}]
          tokenizer: {tok.save(tmp_path / "tok")}
          word_noise:
            _component_: chatumm_kit.data.word_noise.WordNoise
            turn_prob: 0.5
            keep: {{_component_: chatumm_kit.data.shapes.world_words}}
        """
    )
    validate_recipe(cfg)
    dm = instantiate(cfg.data)
    assert dm.word_noise == WordNoise(turn_prob=0.5, keep=world_words())
    assert {"red", "circles", "top"} <= dm.word_noise.keep
