"""BAGEL release folder -> ChatUMM -> BAGEL folder, on a tiny checkpoint written key by key from SPEC §5."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from _tiny_bagel import (
    FREQ_DIM,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LATENT_PATCH,
    LATENT_SIDE,
    VIT_LAYERS,
    VIT_SIDE,
    VOCAB,
    make_tiny_bagel,
    tiny_flux_autoencoder,
    write_bagel_folder,
)
from chatumm_kit.components.vae import VAELatentHead
from chatumm_kit.convert.bagel import (
    BagelConversionError,
    BagelConversionWarning,
    bagel_model_spec,
    chatumm_bagel,
    export_bagel,
    load_bagel,
    load_kit_folder,
    save_kit_folder,
)
from chatumm_kit.convert.bagel_keys import bagel_to_kit_name, kit_to_bagel_name, kit_to_bagel_state
from chatumm_kit.data.dialogue import Dialogue, DialogueSample, ImageSegment, Role, TextSegment, Turn
from chatumm_kit.data.packing import Packer
from chatumm_kit.model import FlowInputs
from chatumm_kit.presets import build_model

LM = "language_model.model."
VIT = "vit_model.vision_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "release")


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_bagel(tiny.folder, attn_backend="sdpa")


def _variant(tiny, tmp_path, edit=None, *, autoencoder=True):
    """A copy of the tiny release with ``edit(tensors)`` applied to ema.safetensors."""
    tensors = {k: v.clone() for k, v in tiny.tensors.items()}
    if edit is not None:
        edit(tensors)
    return write_bagel_folder(
        tmp_path / "variant", tensors, autoencoder=tiny.autoencoder if autoencoder else None, tokenizer=None
    )


# ------------------------------------------------------------------------------------------------ sizes and values


def test_sizes_come_from_configs_and_shapes_not_7b_constants(loaded):
    model = loaded.model
    cfg = model.backbone.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (VOCAB, HIDDEN, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (HEADS, KV_HEADS, 5000.0)
    # head_dim 6 is not hidden / heads = 8 and not in llm_config.json: it comes from the q_norm shape
    assert cfg.head_dim == HEAD_DIM
    assert cfg.qk_norm is True  # forced: the JSON does not say so
    assert len(model.vit.layers) == VIT_LAYERS == 2  # SigLIP config depth 3, minus one
    assert model.vit.max_patches_per_side == VIT_SIDE and model.vit.patch_size == 4
    assert model.vae.max_latent_side == LATENT_SIDE and model.vae.latent_patch == LATENT_PATCH
    assert model.vae.time_embedder.freq_dim == FREQ_DIM
    assert (model.vae.scaling_factor, model.vae.shift_factor) == (0.3611, 0.1159)
    assert (
        loaded.model_spec["_component_"] == "chatumm_kit.convert.bagel.chatumm_bagel"
        and loaded.model_spec["backbone"]["head_dim"] == HEAD_DIM
    )
    assert not model.training


def test_values_land_in_the_right_places(loaded, tiny):
    m, t = loaded.model, tiny.tensors
    gen_q = m.backbone.layers[1].self_attn.q_proj_moe_gen
    assert torch.equal(gen_q.weight, t[LM + "layers.1.self_attn.q_proj_moe_gen.weight"])
    assert torch.equal(gen_q.bias, t[LM + "layers.1.self_attn.q_proj_moe_gen.bias"])
    assert not torch.equal(gen_q.weight, m.backbone.layers[1].self_attn.q_proj.weight)  # experts stay distinct
    assert torch.equal(m.backbone.layers[0].self_attn.k_norm.weight, t[LM + "layers.0.self_attn.k_norm.weight"])
    assert torch.equal(
        m.backbone.layers[1].mlp_moe_gen.down_proj.weight, t[LM + "layers.1.mlp_moe_gen.down_proj.weight"]
    )
    assert torch.equal(m.backbone.norm_moe_gen.weight, t[LM + "norm_moe_gen.weight"])
    # untied: lm_head is its own tensor even though llm_config.json claims tie_word_embeddings
    assert torch.equal(m.backbone.lm_head.weight, t["language_model.lm_head.weight"])
    assert not torch.equal(m.backbone.lm_head.weight, m.backbone.embed_tokens.weight)
    # fused ViT qkv = cat(q, k, v) of the same layer, in that order
    e = VIT + "encoder.layers.1.self_attn."
    qkv = torch.cat([t[e + "q_proj.weight"], t[e + "k_proj.weight"], t[e + "v_proj.weight"]])
    assert torch.equal(m.vit.layers[1].attn.qkv.weight, qkv)
    assert torch.equal(m.vit.layers[1].attn.qkv.bias[16:32], t[e + "k_proj.bias"])
    assert torch.equal(m.vit.layers[1].attn.proj.weight, t[e + "out_proj.weight"])
    assert torch.equal(m.vit.patch_embedding.weight, t[VIT + "embeddings.patch_embedding.weight"])  # Linear as is
    assert torch.equal(m.vit.position_embedding.weight, t[VIT + "embeddings.position_embedding.weight"])
    assert torch.equal(m.vit.connector.fc1.weight, t["connector.fc1.weight"])
    assert torch.equal(m.vae.time_embedder.mlp[2].bias, t["time_embedder.mlp.2.bias"])
    assert torch.equal(m.vae.llm2vae.weight, t["llm2vae.weight"])
    assert torch.equal(m.vae.latent_pos_embed.pos_embed, t["latent_pos_embed.pos_embed"])
    ae_file = load_file(tiny.folder / "ae.safetensors")
    assert torch.equal(m.vae.autoencoder.decoder.conv_in.weight, ae_file["decoder.conv_in.weight"])
    assert torch.equal(m.vae.autoencoder.encoder.conv_in.weight, tiny.autoencoder.encoder.conv_in.weight)


def test_loaded_model_runs_a_packed_batch(loaded):
    g = torch.Generator().manual_seed(0)
    dialogue = Dialogue(
        id="d0",
        turns=[
            Turn(role=Role.USER, segments=[TextSegment(text="make it blue"), ImageSegment(image="a")]),
            Turn(role=Role.ASSISTANT, segments=[TextSegment(text="a blue square"), ImageSegment(image="b")]),
        ],
    )
    images = {k: torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for k in "ab"}
    packer = Packer(tokenizer=loaded.tokenizer, vit_patch_size=4, vae_token_stride=4, max_image_side=16)
    batch = packer.pack([DialogueSample(dialogue=dialogue, images=images, key="d0")])
    n = int(batch.mse_token_mask.sum())
    assert n == 16  # 16 px / (2× VAE · 2 latent patch) = 4×4 tokens for the generated image
    flow = FlowInputs(timesteps=torch.full((1,), 0.5), noise=torch.randn(n, 16, generator=g))
    with torch.no_grad():
        out = loaded.model(batch, flow=flow)
    assert out.logits.shape == (batch.ce_indices.numel(), VOCAB) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.velocity).all() and out.velocity.abs().sum() > 0  # llm2vae was loaded, not zero-init
    assert torch.isfinite(out.ce_sum) and torch.isfinite(out.mse_sum)


def test_mae_sincos_tables_are_what_the_kit_computes(tiny):
    # the test writes MAE's formula independently; the kit's table must agree, so loading raises no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", BagelConversionWarning)
        load_bagel(tiny.folder, attn_backend="sdpa")


# ------------------------------------------------------------------------------------------------ round trip


def test_export_then_load_round_trips_exactly(loaded, tiny, tmp_path):
    out = export_bagel(loaded.model, tmp_path / "export", tokenizer=loaded.tokenizer)
    ema = load_file(out / "ema.safetensors")
    assert ema.keys() == tiny.tensors.keys()  # exactly the SPEC §5 layout the test wrote
    assert all(torch.equal(ema[k], v) for k, v in tiny.tensors.items())
    assert ema[VIT + "embeddings.patch_embedding.weight"].shape == (16, 48)  # Linear, not Conv2d
    ae, ae_ref = load_file(out / "ae.safetensors"), load_file(tiny.folder / "ae.safetensors")
    assert ae.keys() == ae_ref.keys() and all(torch.equal(ae[k], ae_ref[k]) for k in ae)
    assert json.loads((out / "vit_config.json").read_text())["num_hidden_layers"] == 3  # depth − 1 inverted

    again = load_bagel(out, attn_backend="sdpa")
    a, b = loaded.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert again.model_spec == loaded.model_spec
    assert (again.model.vae.scaling_factor, again.model.vae.shift_factor) == (0.3611, 0.1159)
    assert again.tokenizer.encode("draw a red circle") == loaded.tokenizer.encode("draw a red circle")


def test_kit_folder_round_trips_and_rebuilds_from_its_spec(loaded, tmp_path):
    save_kit_folder(loaded.model, loaded.model_spec, tmp_path / "kit", tokenizer=loaded.tokenizer)
    kit = load_kit_folder(tmp_path / "kit")
    a, b = loaded.model.state_dict(), kit.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert kit.spec == json.loads(json.dumps(loaded.model_spec)) and kit.tokenizer.vocab_size == 299


def test_kit_folder_with_an_old_preset_spec_still_loads(loaded, tmp_path):
    """model.json written before _component_ named the model: {"preset": "chatumm_bagel", ...}."""
    old = {"preset": "chatumm_bagel", **{k: v for k, v in loaded.model_spec.items() if k != "_component_"}}
    save_kit_folder(loaded.model, old, tmp_path / "kit")
    kit = load_kit_folder(tmp_path / "kit")
    a, b = loaded.model.state_dict(), kit.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flow_settings_are_model_spec_keys_for_every_model(loaded, tmp_path):
    """timestep_shift and sample_posterior are recipe keys of a kit folder (a converted BAGEL) as of every preset."""
    save_kit_folder(loaded.model, loaded.model_spec, tmp_path / "kit", tokenizer=loaded.tokenizer)
    kit = {"_component_": "chatumm_kit.convert.bagel.kit_folder", "path": str(tmp_path / "kit")}
    plain = build_model(kit)
    assert (plain.timestep_shift, plain.sample_posterior) == (1.0, False)
    tuned = build_model({**kit, "timestep_shift": 3.0, "sample_posterior": True})
    assert (tuned.timestep_shift, tuned.sample_posterior) == (3.0, True)
    converted = build_model({**loaded.model_spec, "timestep_shift": 2.0, "sample_posterior": True})
    assert (converted.timestep_shift, converted.sample_posterior) == (2.0, True)
    tiny = build_model({"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": 64, "sample_posterior": True})
    assert tiny.sample_posterior and build_model({"preset": "chatumm_tiny", "vocab_size": 64}).sample_posterior is False
    with torch.device("meta"):
        big = build_model(
            {"_component_": "chatumm_kit.presets.chatumm_bagel_7b", "timestep_shift": 3.0, "sample_posterior": True}
        )
    assert (big.timestep_shift, big.sample_posterior) == (3.0, True)


def test_dtype_casts_while_reading(tiny):
    model = load_bagel(tiny.folder, dtype=torch.bfloat16, attn_backend="sdpa").model
    assert model.backbone.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.vae.autoencoder.encoder.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(model.vit.connector.fc2.weight, tiny.tensors["connector.fc2.weight"].to(torch.bfloat16))


def test_7b_configs_and_shapes_give_the_preset_architecture():
    from chatumm_kit.presets import chatumm_bagel_7b, flux_autoencoder_kwargs

    llm = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 152064}  # fmt: skip
    vit = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
           "patch_size": 14, "image_size": 980, "hidden_act": "gelu_pytorch_tanh"}  # fmt: skip
    shapes = {
        LM + "embed_tokens.weight": (152064, 3584),
        LM + "layers.0.self_attn.q_norm.weight": (128,),
        VIT + "embeddings.position_embedding.weight": (4900, 1152),
        "latent_pos_embed.pos_embed": (4096, 3584),
        "vae2llm.weight": (3584, 64),
        "time_embedder.mlp.0.weight": (3584, 256),
    }
    with torch.device("meta"):
        ae = __import__("diffusers").AutoencoderKL(**flux_autoencoder_kwargs())
        spec = bagel_model_spec(
            llm_config=llm, vit_config=vit, shapes=shapes, autoencoder=ae, scaling_factor=0.3611, shift_factor=0.1159
        )
        ours = chatumm_bagel(**{k: v for k, v in spec.items() if k != "_component_"}, autoencoder=ae)
        preset = chatumm_bagel_7b()
    a, b = ours.state_dict(), preset.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    bagel = kit_to_bagel_state(ours)
    assert bagel[VIT + "embeddings.patch_embedding.weight"].shape == (1152, 588)  # SPEC §5
    assert bagel["vit_pos_embed.pos_embed"].shape == (4900, 3584)
    assert VIT + "encoder.layers.25.mlp.fc2.bias" in bagel and VIT + "encoder.layers.26.mlp.fc2.bias" not in bagel


def test_key_map_is_a_prefix_table_both_ways():
    for bagel, kit in (
        ("language_model.lm_head.weight", "backbone.lm_head.weight"),
        (LM + "layers.7.self_attn.k_norm_moe_gen.weight", "backbone.layers.7.self_attn.k_norm_moe_gen.weight"),
        ("connector.fc2.bias", "vit.connector.fc2.bias"),
        ("vit_pos_embed.pos_embed", "vit.vit_pos_embed.pos_embed"),
        ("time_embedder.mlp.0.weight", "vae.time_embedder.mlp.0.weight"),
    ):
        assert bagel_to_kit_name(bagel) == kit and kit_to_bagel_name(kit) == bagel
    assert bagel_to_kit_name(VIT + "post_layernorm.weight") is None  # the SigLIP map handles the tower


# ------------------------------------------------------------------------------------------------ errors


def test_missing_key_is_named(tiny, tmp_path):
    key = LM + "layers.1.mlp_moe_gen.up_proj.weight"
    folder = _variant(tiny, tmp_path, lambda t: t.pop(key))
    with pytest.raises(BagelConversionError, match=r"missing keys: 1 \[.*mlp_moe_gen\.up_proj\.weight"):
        load_bagel(folder, attn_backend="sdpa")


def test_unexpected_keys_are_listed_and_truncated(tiny, tmp_path):
    def add(t):
        for i in range(25):
            t[f"language_model.model.extra_{i:02d}.weight"] = torch.zeros(2)

    with pytest.raises(BagelConversionError, match=r"unexpected keys: 25 \[.*extra_00.*\(\+5 more\)") as err:
        load_bagel(_variant(tiny, tmp_path, add), attn_backend="sdpa")
    assert "extra_24" not in str(err.value) and "missing keys" not in str(err.value)


def test_vit_layer_at_config_depth_is_unexpected(tiny, tmp_path):
    def add_last_layer(t):  # SigLIP layer 2 of depth 3: BAGEL uses depth − 1 = 2 layers (0, 1)
        for k in [k for k in t if k.startswith(VIT + "encoder.layers.1.")]:
            t[k.replace("layers.1.", "layers.2.")] = t[k].clone()

    with pytest.raises(BagelConversionError, match=r"unexpected keys: 16 \[.*encoder\.layers\.2\."):
        load_bagel(_variant(tiny, tmp_path, add_last_layer), attn_backend="sdpa")


def test_shape_mismatch_is_named(tiny, tmp_path):
    key = VIT + "embeddings.patch_embedding.weight"
    folder = _variant(tiny, tmp_path, lambda t: t.__setitem__(key, torch.zeros(16, 3, 4, 4)))  # a Conv2d
    with pytest.raises(BagelConversionError, match=r"shape mismatches: 1 \[.*patch_embedding\.weight: file \[16, 3"):
        load_bagel(folder, attn_backend="sdpa")


def test_sizing_key_missing_is_named(tiny, tmp_path):
    folder = _variant(tiny, tmp_path, lambda t: t.pop("latent_pos_embed.pos_embed"))
    with pytest.raises(BagelConversionError, match=r"missing key 'latent_pos_embed.pos_embed'.*latent position grid"):
        load_bagel(folder, attn_backend="sdpa")


def test_absent_ae_needs_vae(tiny, tmp_path):
    folder = _variant(tiny, tmp_path, autoencoder=False)
    with pytest.raises(BagelConversionError, match=r"no ae\.safetensors.*Pass vae="):
        load_bagel(folder, attn_backend="sdpa")


def test_absent_ae_with_supplied_autoencoder_or_head(tiny, loaded, tmp_path):
    folder = _variant(tiny, tmp_path, autoencoder=False)
    ae = tiny_flux_autoencoder()
    model = load_bagel(folder, vae=ae, attn_backend="sdpa").model
    assert model.vae.autoencoder is ae and (model.vae.scaling_factor, model.vae.shift_factor) == (0.3611, 0.1159)
    a, b = loaded.model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a VAELatentHead brings its autoencoder and normalisation; its LLM-facing layers come from the checkpoint
    head = VAELatentHead(hidden=8, autoencoder=tiny_flux_autoencoder(), scaling_factor=2.0, shift_factor=-0.5)
    model = load_bagel(folder, vae=head, attn_backend="sdpa").model
    assert (model.vae.scaling_factor, model.vae.shift_factor) == (2.0, -0.5)
    assert model.vae.autoencoder is head.autoencoder and torch.equal(
        model.vae.vae2llm.weight, tiny.tensors["vae2llm.weight"]
    )


def test_stored_position_table_that_differs_warns_and_is_kept(tiny, tmp_path):
    def shift_rows(t):  # a row-major/column-major swap: a plausible convention mismatch
        s = VIT_SIDE
        t["vit_pos_embed.pos_embed"] = t["vit_pos_embed.pos_embed"].reshape(s, s, -1).transpose(0, 1).reshape(s * s, -1)

    folder = _variant(tiny, tmp_path, shift_rows)
    with pytest.warns(BagelConversionWarning, match=r"vit_pos_embed\.pos_embed is not the 2-D sin-cos table"):
        model = load_bagel(folder, attn_backend="sdpa").model
    assert torch.equal(model.vit.vit_pos_embed.pos_embed[1], tiny.tensors["vit_pos_embed.pos_embed"][VIT_SIDE])


def test_missing_files_are_named(tiny, tmp_path):
    folder = _variant(tiny, tmp_path)
    (folder / "vit_config.json").unlink()
    with pytest.raises(BagelConversionError, match=r"missing vit_config\.json"):
        load_bagel(folder)
    shutil.copy(tiny.folder / "vit_config.json", folder)
    (folder / "ema.safetensors").unlink()
    with pytest.raises(BagelConversionError, match=r"missing ema\.safetensors"):
        load_bagel(folder)


def test_export_warns_when_the_vae_cannot_be_recorded_and_refuses_no_qk_norm(loaded, tmp_path):
    model = build_model(loaded.model_spec)
    model.vae.scaling_factor = 1.0
    with pytest.warns(BagelConversionWarning, match=r"scaling_factor=1\.0 \(load assumes 0\.3611\)"):
        export_bagel(model, tmp_path / "a")
    spec = json.loads(json.dumps(loaded.model_spec))
    spec["backbone"]["qk_norm"] = False
    with pytest.raises(BagelConversionError, match="qk_norm=False"):
        export_bagel(build_model(spec), tmp_path / "b")
