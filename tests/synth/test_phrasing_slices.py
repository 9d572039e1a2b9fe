"""The two held-out wording slices (issue 18): recomposed sentences use only training words, the unseen-vocabulary
slice holds the sentences with new words, and the eval recipe makes both."""

import random

import pytest

from chatumm_kit.config import load_recipe
from chatumm_kit.synth.shapes_phrasing import (
    FAMILIES,
    RECOMPOSED,
    RECOMPOSED_DISTRACTORS,
    ShapesPhrasing,
    template_words,
    training_vocabulary,
)


def test_every_recomposed_sentence_uses_only_training_words_and_none_is_a_training_sentence():
    vocab = training_vocabulary(seed=0)
    assert {"delete", "reshape"}.isdisjoint(vocab) and {"remove", "turn", "picture"} <= vocab
    train, rec = ShapesPhrasing(split="train"), ShapesPhrasing(split="recomposed")
    for family in FAMILIES:
        templates = rec.templates(family)
        assert templates, family
        for t in templates:
            assert template_words(t) <= vocab, (family, t, template_words(t) - vocab)
            assert t not in train.templates(family), (family, t)
    for family, templates in RECOMPOSED.items():  # every authored template is checked, at the recipes' seed
        assert family in FAMILIES and all(template_words(t) <= vocab for t in templates), family
    # authored sentences are really used (not only the held-out ones that happen to fit)
    assert set(RECOMPOSED["edit.remove"]) <= set(rec.templates("edit.remove"))


def test_unseen_vocabulary_slice_holds_the_sentences_with_new_words():
    vocab = training_vocabulary(seed=0)
    unseen = ShapesPhrasing(split="unseen_vocab")
    assert unseen.templates("edit.remove") == ("Delete {obj}.",)
    assert unseen.templates("edit.reshape") == ("Reshape {obj} into {a_shape}.",)
    with_new_words = [f for f in FAMILIES if any(not template_words(t) <= vocab for t in unseen.templates(f))]
    assert len(with_new_words) >= 10
    held = ShapesPhrasing(split="heldout")
    for f in FAMILIES:  # families without a new-word sentence keep their held-out sentences
        assert set(unseen.templates(f)) <= set(held.templates(f))


def test_recomposed_distractors_answer_correctly():
    rec = ShapesPhrasing(split="recomposed")
    assert set(rec.templates("distractor")) == set(RECOMPOSED_DISTRACTORS)
    seen = {}
    rng = random.Random(0)
    for _ in range(200):
        q, a = rec.distractor(rng)
        seen[q.split()[0]] = (q, a)
        if q.startswith("What is") and "times" in q:
            x, y = int(q.split()[2]), int(q.split()[4].rstrip("?"))
            assert a == str(x * y)
        if q.startswith("What number comes after"):
            assert a == str(int(q.split()[-1].rstrip("?")) + 1)
    assert len(seen) >= 3


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="recomposed"):
        ShapesPhrasing(split="recombined")


def test_eval_recipe_makes_both_slices():
    cfg = load_recipe("shapes/eval", [])
    assert cfg.phrasing.split == "recomposed" and cfg.heldout.pool.phrasing.split == "recomposed"
    assert cfg.heldout_unseen_vocab.pool.phrasing.split == "unseen_vocab"
    assert cfg.heldout_unseen_vocab.output_dir != cfg.heldout.output_dir
    a, b = cfg.heldout.pool.seeds, cfg.heldout_unseen_vocab.pool.seeds
    assert a[1] <= b[0] or b[1] <= a[0]  # the slices draw disjoint task seeds
