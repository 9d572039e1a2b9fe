"""Qwen2 HF folder → MoTBackbone: logits parity with a tiny random transformers Qwen2, plus fix-ups and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatumm_kit.convert.qwen2 import QWEN2_KEY_MAP, load_qwen2_folder, map_qwen2_keys, mot_config_from_qwen2

transformers = pytest.importorskip("transformers")

VOCAB = 300


def _tiny_qwen2(tmp_path, *, tie: bool = False, shards: bool = False):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so a misplaced tensor cannot hide behind ones/zeros
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB" if shards else "5GB")
    return model


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0]


def test_logits_match_transformers(tmp_path):
    ref = _tiny_qwen2(tmp_path)
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(1))
    ours = load_qwen2_folder(tmp_path)
    assert ours.config.qk_norm is False and ours.config.rope_theta == 1e6 and ours.config.num_kv_heads == 2
    with torch.no_grad():
        got = ours.text_logits(ids)
    assert (got - _reference_logits(ref, ids)).abs().max() <= 1e-4
    # the generation expert is a copy: routing every token to it changes nothing
    with torch.no_grad():
        hidden = ours.embed_tokens(ids)
        out = ours(
            hidden,
            position_ids=torch.arange(23),
            und_indices=torch.arange(0),
            gen_indices=torch.arange(23),
            attn_mask=torch.ones(23, 23, dtype=torch.bool).tril(),
        )
    assert (ours.lm_head(out) - got).abs().max() <= 1e-5


def test_sharded_and_tied_checkpoint(tmp_path):
    ref = _tiny_qwen2(tmp_path, tie=True, shards=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_qwen2_folder(tmp_path, attn_backend="sdpa")
    assert torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()  # untied copy
    ids = torch.arange(10)
    with torch.no_grad():
        assert (ours.text_logits(ids) - _reference_logits(ref, ids)).abs().max() <= 1e-4


def test_forced_qk_norm_starts_at_one_and_is_not_identity(tmp_path):
    ref = _tiny_qwen2(tmp_path)
    ours = load_qwen2_folder(tmp_path, qk_norm=True)
    assert torch.equal(ours.layers[1].self_attn.k_norm_moe_gen.weight, torch.ones(16))
    ids = torch.arange(12)
    with torch.no_grad():
        assert (ours.text_logits(ids) - _reference_logits(ref, ids)).abs().max() > 1e-3


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    _tiny_qwen2(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_qwen2_folder(tmp_path)
    assert "model.layers.0.self_attn.rogue.weight" in str(err.value)
    assert "layers.1.mlp.up_proj.weight" in str(err.value)


def test_key_map_is_data_and_config_translation():
    mapped, unplaced = map_qwen2_keys(
        {
            "model.layers.3.self_attn.k_proj.bias": torch.zeros(1),
            "model.layers.0.post_attention_layernorm.weight": torch.zeros(1),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1),
            "something.else": torch.zeros(1),
        }
    )
    assert set(mapped) == {"layers.3.self_attn.k_proj.bias", "layers.0.post_attention_layernorm.weight"}
    assert unplaced == ["something.else"]
    assert all(isinstance(p, str) and isinstance(t, str) for p, t in QWEN2_KEY_MAP)
    cfg = mot_config_from_qwen2(
        json.loads(
            '{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,'
            ' "num_key_value_heads": 1, "intermediate_size": 16, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5}'
        ),
        attn_backend="flex",
    )
    assert (cfg.head_dim, cfg.rope_theta, cfg.rms_eps, cfg.attn_backend, cfg.qk_norm) == (4, 1e6, 1e-5, "flex", False)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        mot_config_from_qwen2({"rope_scaling": {"rope_type": "yarn"}})
