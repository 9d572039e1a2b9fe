"""`ChatUMM`: the components composed into one conversational unified model (SPEC §2–4).

One packed sequence goes in (:class:`~chatumm_kit.components.batch.PackedBatch`); the model

1. embeds text and markers with the token table, ViT views with the ViT encoder, and VAE views with the VAE latent
   head (clean views at ``t = 0``, noised views at a sampled ``t``, one per image);
2. runs the Mixture-of-Transformers backbone under the Generalized-Causal-Attention mask built once per batch;
3. reads text logits at the CE positions and velocities at the noised-latent positions.

Loss terms come back as *sums* with their token counts, so the training system can normalise by the global
count across ranks (SPEC §4: every token weighs the same however the packing fell).

Example:
    >>> model = chatumm_tiny(vocab_size=512)                # doctest: +SKIP
    >>> out = model(batch)                                  # doctest: +SKIP
    >>> loss = out.ce_sum / out.ce_count + out.mse_sum / out.mse_count  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.masks import DocumentMask, MaskBuilder
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.vae import VAELatentHead
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.flow import noise_latents, sample_train_timesteps, velocity_target

__all__ = ["ChatUMM", "ChatUMMOutput", "FlowInputs"]


@dataclass
class FlowInputs:
    """The noise draw of one forward pass, per noised VAE view and per noised token.

    Attributes:
        timesteps: ``[n_noised_views]`` one ``t`` per generated image.
        noise: ``[N_mse, 4C]`` ``ε`` for every noised latent token, in ``batch.mse_indices`` order.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor


@dataclass
class ChatUMMOutput:
    """What one forward pass returns.

    Attributes:
        logits: ``[N_ce, V]`` text logits at ``batch.ce_indices``.
        ce_sum: summed cross-entropy over the CE positions (scalar).
        ce_count: number of CE positions.
        velocity: ``[N_mse, 4C]`` predicted velocities at ``batch.mse_indices``.
        velocity_target: ``[N_mse, 4C]`` ``ε − x0`` for the same tokens.
        mse_sum: summed per-token MSE (mean over the 4C channels, summed over tokens; scalar).
        mse_count: number of noised latent tokens.
        flow: the timesteps and noise used.
    """

    logits: torch.Tensor
    ce_sum: torch.Tensor
    ce_count: int
    velocity: torch.Tensor
    velocity_target: torch.Tensor
    mse_sum: torch.Tensor
    mse_count: int
    flow: FlowInputs

    @property
    def ce_loss(self) -> torch.Tensor:
        """Mean CE over this batch's CE positions (0 when there are none)."""
        return self.ce_sum / max(self.ce_count, 1)

    @property
    def mse_loss(self) -> torch.Tensor:
        """Mean flow-matching MSE over this batch's noised tokens (0 when there are none)."""
        return self.mse_sum / max(self.mse_count, 1)


class ChatUMM(nn.Module):
    """The conversational unified model: token table + ViT encoder + VAE latent head + MoT backbone.

    Args:
        backbone: the MoT decoder (holds the token embedding and ``lm_head``).
        vit: the ViT encoder with connector; its output width must equal the backbone's hidden size.
        vae: the VAE latent head (frozen autoencoder, ``vae2llm``/``llm2vae``, time and position embeddings).
        mask_builder: builds the attention mask once per batch from the split table.
        timestep_shift: training timestep shift ``s`` (SPEC §4; 1.0 by default).
    """

    def __init__(
        self,
        *,
        backbone: MoTBackbone,
        vit: ViTEncoder,
        vae: VAELatentHead,
        mask_builder: MaskBuilder | None = None,
        timestep_shift: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.vit = vit
        self.vae = vae
        self.mask_builder = mask_builder or MaskBuilder()
        self.timestep_shift = timestep_shift

    @property
    def hidden_size(self) -> int:
        return self.backbone.embed_tokens.embedding_dim

    # ------------------------------------------------------------------ inputs
    def vae_clean_tokens(self, batch: PackedBatch) -> torch.Tensor:
        """``[N_vae, 4C]`` clean patchified latents of every VAE token, each image encoded once."""
        if batch.vae_indices.numel() == 0:
            return torch.zeros(0, self.vae.token_dim, device=batch.input_ids.device)
        latents = self.vae.encode(batch.vae_images)
        return self.vae.view_tokens(latents, batch.vae_view_image)

    def draw_flow(self, batch: PackedBatch, *, generator: torch.Generator | None = None) -> FlowInputs:
        """Sample one timestep per noised view and noise for every noised token."""
        device = batch.input_ids.device
        t = sample_train_timesteps(
            batch.num_noised_views, shift=self.timestep_shift, generator=generator, device=device
        )
        n_tok = int(batch.mse_token_mask.sum())
        noise = torch.randn(n_tok, self.vae.token_dim, generator=generator, device="cpu").to(device)
        return FlowInputs(timesteps=t, noise=noise)

    def embed(self, batch: PackedBatch, flow: FlowInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[L, D]`` input embeddings; also returns the clean latents and targets of noised tokens."""
        device = batch.input_ids.device
        table = self.backbone.embed_tokens
        hidden = torch.zeros(batch.seq_len, self.hidden_size, device=device, dtype=table.weight.dtype)
        hidden = hidden.index_copy(0, batch.text_indices, table(batch.input_ids[batch.text_indices]))
        if batch.vit_indices.numel():
            vit_tokens = self.vit(batch.vit_patches, batch.vit_patch_rc, batch.vit_grid_hw)
            hidden = hidden.index_copy(0, batch.vit_indices, vit_tokens.to(hidden.dtype))
        x0 = self.vae_clean_tokens(batch)
        mask = batch.mse_token_mask
        target = velocity_target(x0[mask], flow.noise.to(x0.dtype))
        if batch.vae_indices.numel():
            # Clean views sit at t = 0 (SPEC §2); each noised view has its own t (one per image).
            view_t = torch.zeros(batch.vae_view_noised.numel(), device=device)
            view_t[batch.vae_view_noised] = flow.timesteps.to(device=device, dtype=view_t.dtype)
            t_tok = view_t[batch.vae_token_view].to(x0.dtype)
            x_t = x0.clone()
            x_t[mask] = noise_latents(x0[mask], flow.noise.to(x0.dtype), t_tok[mask])
            vae_tokens = self.vae.embed(x_t, t_tok, batch.vae_token_rc)
            hidden = hidden.index_copy(0, batch.vae_indices, vae_tokens.to(hidden.dtype))
        return hidden, x0, target

    def attention_mask(self, batch: PackedBatch) -> BlockMask | DocumentMask:
        """The GCA mask for the backbone's attention backend, built once per batch (shared by all layers).

        ``"flex"``: a ``BlockMask``. ``"sdpa"``: a ``DocumentMask`` — each document's own diagonal block, never the
        ``[L, L]`` mask, so the backbone attends document by document (SPEC §3 rule 1: documents never see each
        other, so a packed sequence costs Σ n_d² attention pairs, not L²).
        """
        if self.backbone.config.attn_backend == "flex":
            return self.mask_builder.block_mask(batch.splits, device=batch.input_ids.device)
        return self.mask_builder.documents(batch.splits, device=batch.input_ids.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self, batch: PackedBatch, *, flow: FlowInputs | None = None, generator: torch.Generator | None = None
    ) -> ChatUMMOutput:
        """Run one packed sequence; ``flow`` fixes the noise draw (tests, evaluation), else it is sampled."""
        flow = flow if flow is not None else self.draw_flow(batch, generator=generator)
        hidden, _, target = self.embed(batch, flow)
        out = self.backbone(
            hidden,
            position_ids=batch.position_ids,
            und_indices=batch.und_indices,
            gen_indices=batch.gen_indices,
            attn_mask=self.attention_mask(batch),
        )
        logits = self.backbone.lm_head(out[batch.ce_indices])
        ce_sum = F.cross_entropy(logits.float(), batch.ce_labels, reduction="sum")
        velocity = self.vae.velocity(out[batch.mse_indices])
        mse_sum = (velocity.float() - target.float()).pow(2).mean(dim=-1).sum()
        return ChatUMMOutput(
            logits=logits,
            ce_sum=ce_sum,
            ce_count=int(batch.ce_indices.numel()),
            velocity=velocity,
            velocity_target=target,
            mse_sum=mse_sum,
            mse_count=int(batch.mse_indices.numel()),
            flow=flow,
        )
