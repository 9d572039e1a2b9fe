"""``chatumm convert``: every sub-command through ``add_arguments`` / ``run`` on tiny folders."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from _tiny_bagel import HIDDEN, LLM_CONFIG, make_tiny_bagel, write_bagel_folder
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.convert.bagel import load_bagel, load_kit_folder
from chatumm_kit.convert.cli import add_arguments, run
from chatumm_kit.convert.siglip import save_siglip_vit


def _convert(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="chatumm convert")
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bagel(tmp_path_factory.mktemp("cli") / "release")


def test_bagel_to_kit_and_back(tiny, tmp_path, capsys):
    kit, back = tmp_path / "kit", tmp_path / "back"
    assert _convert("bagel-to-kit", tiny.folder, kit, "--attn-backend", "sdpa") == 0
    assert "wrote" in capsys.readouterr().out
    spec = json.loads((kit / "model.json").read_text())
    assert (
        spec["_component_"] == "chatumm_kit.convert.bagel.chatumm_bagel" and spec["backbone"]["attn_backend"] == "sdpa"
    )
    weights = load_file(kit / "model.safetensors")  # kit names, autoencoder included
    assert torch.equal(weights["backbone.layers.1.mlp_moe_gen.gate_proj.weight"],
                       tiny.tensors["language_model.model.layers.1.mlp_moe_gen.gate_proj.weight"])  # fmt: skip
    assert "vae.autoencoder.decoder.conv_in.weight" in weights and (kit / "tokenizer.json").is_file()

    assert _convert("kit-to-bagel", kit, back) == 0
    ema = load_file(back / "ema.safetensors")
    assert ema.keys() == tiny.tensors.keys() and all(torch.equal(ema[k], v) for k, v in tiny.tensors.items())
    original, again = load_bagel(tiny.folder, attn_backend="sdpa"), load_bagel(back, attn_backend="sdpa")
    a, b = original.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.encode("a blue square") == original.tokenizer.encode("a blue square")


def test_bagel_to_kit_with_a_separate_vae_and_dtype(tiny, tmp_path):
    folder = write_bagel_folder(tmp_path / "no_ae", tiny.tensors, autoencoder=None, tokenizer=None)
    assert _convert("bagel-to-kit", folder, tmp_path / "k1", "--vae", tiny.folder / "ae.safetensors") == 0
    tiny.autoencoder.save_pretrained(tmp_path / "ae_diffusers")
    args = ("--vae", tmp_path / "ae_diffusers", "--dtype", "bfloat16", "--attn-backend", "sdpa")
    assert _convert("bagel-to-kit", folder, tmp_path / "k2", *args) == 0
    k1, k2 = load_kit_folder(tmp_path / "k1"), load_kit_folder(tmp_path / "k2")
    w = k2.module.vae.autoencoder.encoder.conv_in.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, k1.module.vae.autoencoder.encoder.conv_in.weight.bfloat16())
    assert k1.tokenizer is None


def test_bagel_errors_exit_2_with_the_reason(tiny, tmp_path, capsys):
    folder = write_bagel_folder(tmp_path / "no_ae", tiny.tensors, autoencoder=None, tokenizer=None)
    assert _convert("bagel-to-kit", folder, tmp_path / "out") == 2
    assert "no ae.safetensors" in capsys.readouterr().err
    assert _convert("bagel-to-kit", folder, tmp_path / "out", "--vae", tmp_path / "nowhere") == 2
    assert "--vae" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qwen2_to_kit(tiny, tmp_path):
    src = tmp_path / "qwen2"
    src.mkdir()
    config = dict(LLM_CONFIG, tie_word_embeddings=False, head_dim=6)
    (src / "config.json").write_text(json.dumps(config))
    hf = {  # the understanding expert in HF Qwen2 names (no q/k norms: plain Qwen2)
        k[len("language_model.") :]: v
        for k, v in tiny.tensors.items()
        if k.startswith("language_model.") and "_moe_gen" not in k and "_norm." not in k
    }
    save_file(hf, str(src / "model.safetensors"))
    assert _convert("qwen2-to-kit", src, tmp_path / "kit") == 0
    kit = load_kit_folder(tmp_path / "kit")
    assert isinstance(kit.module, MoTBackbone) and kit.spec["_component_"] == "chatumm_kit.components.mot.MoTBackbone"
    layer = kit.module.layers[1]
    assert kit.module.config.qk_norm is False and kit.module.config.head_dim == 6
    assert torch.equal(layer.self_attn.v_proj.bias, hf["model.layers.1.self_attn.v_proj.bias"])
    assert torch.equal(layer.mlp_moe_gen.up_proj.weight, hf["model.layers.1.mlp.up_proj.weight"])  # gen = copy of und

    assert _convert("qwen2-to-kit", src, tmp_path / "kit_qk", "--qk-norm") == 0
    qk = load_kit_folder(tmp_path / "kit_qk").module
    assert qk.config.qk_norm is True and torch.equal(qk.layers[0].self_attn.q_norm.weight, torch.ones(6))


def test_siglip_to_kit(tmp_path):
    vit = ViTEncoder(
        patch_size=4, hidden=16, num_layers=3, num_heads=2, mlp_dim=24, max_patches_per_side=4, llm_hidden=8
    )
    save_siglip_vit(vit, tmp_path / "siglip")
    argv = ("siglip-to-kit", tmp_path / "siglip", tmp_path / "kit", "--llm-hidden", HIDDEN, "--drop-last-layer")
    assert _convert(*argv) == 0
    kit = load_kit_folder(tmp_path / "kit")
    assert isinstance(kit.module, ViTEncoder) and len(kit.module.layers) == 2
    assert kit.module.connector.fc1.out_features == HIDDEN
    assert torch.equal(kit.module.layers[1].attn.qkv.weight, vit.layers[1].attn.qkv.weight)
    assert torch.equal(kit.module.patch_embedding.weight, vit.patch_embedding.weight)


def test_flux_to_diffusers(tiny, tmp_path):
    assert _convert("flux-to-diffusers", tiny.folder / "ae.safetensors", tmp_path / "ae") == 0
    ae = AutoencoderKL.from_pretrained(str(tmp_path / "ae"))
    a, b = ae.state_dict(), tiny.autoencoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ae.config.latent_channels == 4 and ae.config.norm_num_groups == 32


def test_kit_to_bagel_refuses_a_component_folder(tiny, tmp_path, capsys):
    vit = ViTEncoder(
        patch_size=4, hidden=16, num_layers=1, num_heads=2, mlp_dim=24, max_patches_per_side=4, llm_hidden=8
    )
    save_siglip_vit(vit, tmp_path / "siglip")
    assert _convert("siglip-to-kit", tmp_path / "siglip", tmp_path / "kit", "--llm-hidden", 8) == 0
    assert _convert("kit-to-bagel", tmp_path / "kit", tmp_path / "out") == 2
    assert "holds a ViTEncoder, not a ChatUMM" in capsys.readouterr().err
    assert _convert("kit-to-bagel", tmp_path / "missing", tmp_path / "out") == 2
    assert "missing model.json" in capsys.readouterr().err


def test_a_sub_command_is_required():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
