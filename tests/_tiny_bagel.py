"""A tiny BAGEL release folder written key by key from SPEC §5 (independent of the kit's exporter).

Sizes differ from BAGEL-7B everywhere, and ``head_dim`` (6) is not ``hidden / heads`` (8) and is absent from
``llm_config.json``, so a loader that assumed 7B constants or derived sizes wrongly cannot load it. The JSON is
misleading on purpose where SPEC §5 says loaders must force settings: ``tie_word_embeddings: true``, no ``qk_norm``,
and SigLIP depth 3 (the file holds 2 layers: depth − 1). The ViT and latent grids are 4 per side (16-pixel images);
``make_tiny_bagel(..., side=8)`` makes them 8 (32×32 images, ShapesChat's size: training recipes, chat and the
ShapesChat benchmark run on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.convert.flux_vae import save_flux_vae

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 32, 2, 4, 2, 6, 48, 320
VIT_HIDDEN, VIT_CONFIG_LAYERS, VIT_HEADS, VIT_MLP, PATCH, VIT_SIDE = 16, 3, 2, 24, 4, 4
LATENT_CHANNELS, LATENT_PATCH, LATENT_SIDE, FREQ_DIM = 4, 2, 4, 16
VIT_LAYERS = VIT_CONFIG_LAYERS - 1  # SPEC §5: BAGEL uses the penultimate layer
TEXTS = ["draw a red circle", "what colour is it", "it is red", "make it blue", "a blue square"]

LLM_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": HIDDEN,
    "intermediate_size": MLP,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000.0,
    "vocab_size": VOCAB,
    "tie_word_embeddings": True,  # wrong on purpose: BAGEL is untied and the loader must force it
    "use_sliding_window": False,
}
VIT_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": VIT_HIDDEN,
    "intermediate_size": VIT_MLP,
    "num_hidden_layers": VIT_CONFIG_LAYERS,
    "num_attention_heads": VIT_HEADS,
    "patch_size": PATCH,
    "image_size": PATCH * VIT_SIDE,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}


def mae_sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed 2-D table, written from its formula in numpy: column half first, then row half; each half is
    ``[sin(p·ω), cos(p·ω)]`` with ``ω_i = 1 / 10000^(i / (d/2))``."""

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    flat = np.arange(side * side)
    cols, rows = flat % side, flat // side
    table = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def tiny_flux_autoencoder() -> AutoencoderKL:
    """FLUX's architecture at toy size: 2 levels (2× downsample), 4 latent channels, 32 GroupNorm groups."""
    torch.manual_seed(1)
    ae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 32],
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ae


def bagel_tensors(seed: int = 0, *, side: int = VIT_SIDE) -> dict[str, torch.Tensor]:
    """Every key of SPEC §5 at the tiny sizes, random values (norms and biases too), sin-cos tables exact."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=g)

    t: dict[str, torch.Tensor] = {
        "language_model.model.embed_tokens.weight": rnd(VOCAB, HIDDEN),
        "language_model.lm_head.weight": rnd(VOCAB, HIDDEN),
    }
    lm = "language_model.model."
    for i in range(LAYERS):
        for sfx in ("", "_moe_gen"):
            a = f"{lm}layers.{i}.self_attn."
            for name, out in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
                t[f"{a}{name}_proj{sfx}.weight"] = rnd(out, HIDDEN)
                t[f"{a}{name}_proj{sfx}.bias"] = rnd(out)
            t[f"{a}o_proj{sfx}.weight"] = rnd(HIDDEN, HEADS * HEAD_DIM)
            t[f"{a}q_norm{sfx}.weight"] = 1 + rnd(HEAD_DIM)
            t[f"{a}k_norm{sfx}.weight"] = 1 + rnd(HEAD_DIM)
            m = f"{lm}layers.{i}.mlp{sfx}."
            t[m + "gate_proj.weight"], t[m + "up_proj.weight"] = rnd(MLP, HIDDEN), rnd(MLP, HIDDEN)
            t[m + "down_proj.weight"] = rnd(HIDDEN, MLP)
            t[f"{lm}layers.{i}.input_layernorm{sfx}.weight"] = 1 + rnd(HIDDEN)
            t[f"{lm}layers.{i}.post_attention_layernorm{sfx}.weight"] = 1 + rnd(HIDDEN)
    t[lm + "norm.weight"], t[lm + "norm_moe_gen.weight"] = 1 + rnd(HIDDEN), 1 + rnd(HIDDEN)

    v = "vit_model.vision_model."
    t[v + "embeddings.patch_embedding.weight"] = rnd(VIT_HIDDEN, PATCH * PATCH * 3)  # already Linear
    t[v + "embeddings.patch_embedding.bias"] = rnd(VIT_HIDDEN)
    t[v + "embeddings.position_embedding.weight"] = rnd(side**2, VIT_HIDDEN)
    for i in range(VIT_LAYERS):
        e = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{e}self_attn.{proj}.weight"], t[f"{e}self_attn.{proj}.bias"] = (
                rnd(VIT_HIDDEN, VIT_HIDDEN),
                rnd(VIT_HIDDEN),
            )
        for norm in ("layer_norm1", "layer_norm2"):
            t[f"{e}{norm}.weight"], t[f"{e}{norm}.bias"] = 1 + rnd(VIT_HIDDEN), rnd(VIT_HIDDEN)
        t[e + "mlp.fc1.weight"], t[e + "mlp.fc1.bias"] = rnd(VIT_MLP, VIT_HIDDEN), rnd(VIT_MLP)
        t[e + "mlp.fc2.weight"], t[e + "mlp.fc2.bias"] = rnd(VIT_HIDDEN, VIT_MLP), rnd(VIT_HIDDEN)
    t[v + "post_layernorm.weight"], t[v + "post_layernorm.bias"] = 1 + rnd(VIT_HIDDEN), rnd(VIT_HIDDEN)

    token_dim = LATENT_CHANNELS * LATENT_PATCH**2
    for name, (o, i) in {
        "connector.fc1": (HIDDEN, VIT_HIDDEN),
        "connector.fc2": (HIDDEN, HIDDEN),
        "time_embedder.mlp.0": (HIDDEN, FREQ_DIM),
        "time_embedder.mlp.2": (HIDDEN, HIDDEN),
        "vae2llm": (HIDDEN, token_dim),
        "llm2vae": (token_dim, HIDDEN),
    }.items():
        t[name + ".weight"], t[name + ".bias"] = rnd(o, i), rnd(o)
    t["vit_pos_embed.pos_embed"] = mae_sincos_2d(HIDDEN, side)
    t["latent_pos_embed.pos_embed"] = mae_sincos_2d(HIDDEN, side)
    return t


@dataclass
class TinyBagel:
    folder: Path
    tensors: dict[str, torch.Tensor]
    autoencoder: AutoencoderKL
    tokenizer: ChatTokenizer


def write_bagel_folder(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    autoencoder: AutoencoderKL | None,
    tokenizer: ChatTokenizer | None,
) -> Path:
    """Write a release folder: configs, ema.safetensors, ae.safetensors (if ``autoencoder``), tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llm_config.json").write_text(json.dumps(LLM_CONFIG))
    (folder / "vit_config.json").write_text(json.dumps(VIT_CONFIG))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "ema.safetensors"))
    if autoencoder is not None:
        save_flux_vae(autoencoder, folder / "ae.safetensors")
    if tokenizer is not None:
        tokenizer.save(folder)
        (folder / "chatumm_tokenizer.json").unlink()  # a Qwen2.5-style folder: tokenizer.json only
    return folder


def view_sizing_overrides(side: int = VIT_SIDE) -> list[str]:
    """Recipe overrides that swap the BAGEL recipes' ``ViewSizing.bagel`` preset for BAGEL's rule at the tiny
    release's size (ViT patch and VAE token stride 4, ``side`` tokens per side): long side at most ``4·side`` pixels
    in both views, short side at least half of it in the VAE view and a quarter in the ViT view (BAGEL: 1024 / 512
    and 980 / 224) — so small and elongated images are enlarged as under the real preset."""
    top = PATCH * side
    rules = {"vit": (top // 4, top, PATCH), "vae": (top // 2, top, LATENT_PATCH * 2)}  # 2x VAE x latent patch 2
    out = ["data.view_sizing._component_=chatumm_kit.data.view_sizing.ViewSizing"]
    for view, (low, high, stride) in rules.items():
        out += [
            f"+data.view_sizing.{view}.{k}={v}" for k, v in (("min_side", low), ("max_side", high), ("stride", stride))
        ]
    return out


def make_tiny_bagel(
    folder: Path, *, dtype: torch.dtype = torch.float32, texts: list[str] | None = None, side: int = VIT_SIDE
) -> TinyBagel:
    """A release folder with ``ema.safetensors`` stored in ``dtype`` (BAGEL's own is bf16), a tokenizer trained on
    ``texts`` (default: a few ShapesChat-like phrases) and ViT / latent grids of ``side`` per side."""
    tokenizer = ChatTokenizer.train((texts or TEXTS * 5), vocab_size=300)
    tensors = {k: v.to(dtype) for k, v in bagel_tensors(side=side).items()}
    ae = tiny_flux_autoencoder()
    write_bagel_folder(folder, tensors, autoencoder=ae, tokenizer=tokenizer)
    return TinyBagel(folder=folder, tensors=tensors, autoencoder=ae, tokenizer=tokenizer)
