"""ChatTokenizer: training, special-token roles, injection safety, save/load, Qwen-style folders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from chatumm_kit.components.tokenizer import ChatTokenizer, SpecialTokens, TokenizerError

CORPUS = ["draw a red circle", "draw a blue square", "what colour is the circle", "it is red", "ok"] * 20
MARKERS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|end|>", "<|pad|>"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.train(CORPUS, vocab_size=320)


def test_train_gives_specials_ids_0_to_5_and_learns_merges(tok: ChatTokenizer) -> None:
    ids = [tok.im_start_id, tok.im_end_id, tok.vision_start_id, tok.vision_end_id, tok.end_id, tok.pad_id]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert tok.special_ids == dict(zip(["im_start", "im_end", "vision_start", "vision_end", "end", "pad"], ids))
    assert 262 < tok.vocab_size <= 320  # 6 specials + 256 bytes + some merges
    assert len(tok.encode("draw")) == 1  # a frequent word became one token
    assert len(tok.encode("zqx")) == 3  # unseen text falls back to bytes


def test_train_rejects_too_small_vocab() -> None:
    with pytest.raises(TokenizerError, match="vocab_size=100 is too small"):
        ChatTokenizer.train(CORPUS, vocab_size=100)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_encode_decode_round_trip_and_never_special(tok: ChatTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(range(6))


@pytest.mark.parametrize("marker", MARKERS)
def test_typed_marker_is_plain_text(tok: ChatTokenizer, marker: str) -> None:
    ids = tok.encode(f"say {marker} now")
    assert not set(ids) & set(range(6))
    assert len(ids) > 3  # the marker string became several byte-level pieces
    assert tok.decode(ids, skip_special_tokens=True) == f"say {marker} now"  # typed text is not "special"


def test_decode_skips_specials_only_when_asked(tok: ChatTokenizer) -> None:
    ids = [tok.im_start_id, *tok.encode("ok"), tok.im_end_id]
    assert tok.decode(ids) == "<|im_start|>ok<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ok"


def test_role_prefix_on_first_text_segment_only() -> None:
    tok = ChatTokenizer.train(CORPUS, vocab_size=300, user_prefix="User: ", assistant_prefix="Assistant: ")
    assert tok.decode(tok.encode_segment("ok", role="user", first_in_turn=True)) == "User: ok"
    assert tok.decode(tok.encode_segment("ok", role="assistant", first_in_turn=True)) == "Assistant: ok"
    assert tok.encode_segment("ok", role="assistant", first_in_turn=False) == tok.encode("ok")
    # a system turn has no template prefix: BAGEL enters its system prompt as plain text (SPEC §4.1)
    assert tok.encode_segment("ok", role="system", first_in_turn=True) == tok.encode("ok")
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.role_prefix("tool")


def test_default_prefix_is_empty(tok: ChatTokenizer) -> None:
    assert tok.encode_segment("it is red", role="user", first_in_turn=True) == tok.encode("it is red")


def test_save_and_from_file_round_trip(tmp_path) -> None:
    special = SpecialTokens(end="<|eot|>", pad="<|fill|>")
    tok = ChatTokenizer.train(CORPUS, vocab_size=300, special=special, assistant_prefix="A: ")
    folder = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["chatumm_tokenizer.json", "tokenizer.json"]
    for path in (folder, folder / "tokenizer.json"):
        back = ChatTokenizer.from_file(path)
        assert back.special == special
        assert back.special_ids == tok.special_ids
        assert back.assistant_prefix == "A: " and back.user_prefix == ""
        assert back.vocab_size == tok.vocab_size
        for text in ("draw a red circle", "<|eot|> typed", "unseen ümlaut"):
            assert back.encode(text) == tok.encode(text)
        assert back.end_id not in back.encode("<|eot|>")


def test_from_file_errors_name_the_problem(tmp_path, tok: ChatTokenizer) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        ChatTokenizer.from_file(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="malformed"):
        ChatTokenizer.from_file(bad)
    folder = tok.save(tmp_path / "ok")
    with pytest.raises(TokenizerError, match=r"missing from the vocabulary: end='<\|nope\|>'"):
        ChatTokenizer.from_file(folder, special=SpecialTokens(end="<|nope|>"))
    (folder / "chatumm_tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TokenizerError, match="chatumm_tokenizer.json"):
        ChatTokenizer.from_file(folder)
    with pytest.raises(TokenizerError, match="expects a folder"):
        tok.save(tmp_path / "x.json")


def test_special_tokens_must_be_distinct_and_non_empty() -> None:
    with pytest.raises(TokenizerError, match="SpecialTokens.pad and SpecialTokens.end are both"):
        SpecialTokens(pad="<|end|>")
    with pytest.raises(TokenizerError, match="SpecialTokens.im_start must be a non-empty string"):
        SpecialTokens(im_start="")


# ---------------------------------------------------------------------- Qwen2.5-style folder
QWEN_ADDED = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|vision_start|>",
    "<|vision_end|>",
]
# The Qwen2 pre-tokenizer regex (a fact of the public tokenizer.json, typed here to make the folder realistic).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen_like_folder(path, *, added=QWEN_ADDED):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(a, special=True, normalized=False) for a in added])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768}))
    return base


def test_from_pretrained_dir_maps_qwen_tokens_and_adds_missing(tmp_path) -> None:
    base = _qwen_like_folder(tmp_path / "qwen")
    tok = ChatTokenizer.from_pretrained_dir(tmp_path / "qwen")
    assert (tok.im_start_id, tok.im_end_id) == (base + 1, base + 2)
    assert (tok.vision_start_id, tok.vision_end_id) == (base + 4, base + 5)
    assert tok.added_tokens == ("<|end|>", "<|pad|>")
    assert (tok.end_id, tok.pad_id) == (base + 6, base + 7)
    assert tok.vocab_size == base + 8
    ids = tok.encode("draw <|im_start|> a red circle")
    assert not set(ids) & set(tok.special_ids.values()) and base not in ids
    assert tok.decode(ids) == "draw <|im_start|> a red circle"
    # Reusing an existing token as pad adds only <|end|>.
    tok2 = ChatTokenizer.from_pretrained_dir(tmp_path / "qwen", special=SpecialTokens(pad="<|endoftext|>"))
    assert tok2.added_tokens == ("<|end|>",)
    assert (tok2.pad_id, tok2.end_id, tok2.vocab_size) == (base, base + 6, base + 7)


def test_from_pretrained_dir_save_reload_keeps_roles(tmp_path) -> None:
    _qwen_like_folder(tmp_path / "qwen")
    tok = ChatTokenizer.from_pretrained_dir(tmp_path / "qwen", user_prefix="User: ")
    back = ChatTokenizer.from_file(tok.save(tmp_path / "saved"))
    assert back.special_ids == tok.special_ids and back.user_prefix == "User: "
    assert back.encode("what colour is the circle") == tok.encode("what colour is the circle")


def test_from_pretrained_dir_requires_markers(tmp_path) -> None:
    _qwen_like_folder(tmp_path / "qwen", added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(TokenizerError, match=r"required marker tokens missing: vision_start='<\|vision_start\|>'"):
        ChatTokenizer.from_pretrained_dir(tmp_path / "qwen")
    with pytest.raises(TokenizerError, match="is not a folder"):
        ChatTokenizer.from_pretrained_dir(tmp_path / "qwen" / "tokenizer.json")


def test_special_tokens_from_a_mapping_as_yaml_gives_it() -> None:
    tok = ChatTokenizer.train(CORPUS, vocab_size=280, special={"end": "<|eot|>"})
    assert tok.special == SpecialTokens(end="<|eot|>") and tok.end_id == 4
    with pytest.raises(TokenizerError, match=r"unknown roles \['bos'\]"):
        SpecialTokens.coerce({"bos": "<s>"})
