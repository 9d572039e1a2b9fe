"""`ChatUMM`: the components composed into one conversational unified model (SPEC §2–4).

One packed sequence goes in (:class:`~chatumm_kit.components.batch.PackedBatch`); the model

1. embeds text and markers with the token table, ViT views with the ViT encoder, and VAE views with the VAE latent
   head (clean views at ``t = 0``, noised views at a sampled ``t``, one per image);
2. runs the Mixture-of-Transformers backbone under the Generalized-Causal-Attention mask built once per batch;
3. reads text logits at the CE positions and velocities at the noised-latent positions.

Loss terms come back as *sums* with their token counts, so the training system can normalise by the global
count across ranks (SPEC §4: every token weighs the same however the packing fell).

:meth:`ChatUMM.forward` is training. Inference (``inference/``) uses a small public surface instead of reaching into
the parts; every method runs the same code as training where training has it:

* :meth:`ChatUMM.embed_stream` — embed a chunk of clean pieces (text, markers, ViT views, clean VAE views at
  ``t = 0``), laid out by the packer's ``StreamBuilder``, into :class:`StreamInputs` (hidden states + routing);
* :meth:`ChatUMM.embed_text` — token ids → embeddings (decoding);
* :meth:`ChatUMM.embed_noised_views` — the noised VAE view of a generated image (``v_s`` + latents at ``t`` +
  ``v_e``) as :class:`StreamInputs`, and :meth:`ChatUMM.view_velocities` — its velocity from the backbone output;
* :meth:`ChatUMM.new_kv_cache`, :meth:`ChatUMM.chunk_mask`, :meth:`ChatUMM.forward_chunk` (one chunk appended to
  one cache) and :meth:`ChatUMM.forward_chunks` (several, each on its own cache, in one forward);
* :meth:`ChatUMM.logits` — hidden states → text logits; :meth:`ChatUMM.decode_latents` — latent tokens → pixels.

Example:
    >>> model = chatumm_tiny(vocab_size=512)                # doctest: +SKIP
    >>> out = model(batch)                                  # doctest: +SKIP
    >>> loss = out.ce_sum / out.ce_count + out.mse_sum / out.mse_count  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from chatumm_kit.components.batch import PackedBatch
from chatumm_kit.components.kv_cache import CacheChunk, MoTKVCache
from chatumm_kit.components.layers import grid_rc
from chatumm_kit.components.masks import DocumentMask, MaskBuilder
from chatumm_kit.components.mot import MoTBackbone
from chatumm_kit.components.splits import SplitTable
from chatumm_kit.components.vae import LatentPosterior, VAELatentHead
from chatumm_kit.components.vit import ViTEncoder
from chatumm_kit.flow import noise_latents, sample_train_timesteps, velocity_target

__all__ = ["ChatUMM", "ChatUMMOutput", "FlowInputs", "NoisedView", "StreamInputs"]


@dataclass
class FlowInputs:
    """The noise draw of one forward pass, per noised VAE view and per noised token.

    Attributes:
        timesteps: ``[n_noised_views]`` one ``t`` per generated image.
        noise: ``[N_mse, 4C]`` ``ε`` for every noised latent token, in ``batch.mse_indices`` order.
        posterior_noise: one ``[C, h, w]`` draw per image of ``batch.vae_images`` when the clean latents are sampled
            from the VAE posterior (``mean + σ·noise``, SPEC §4.1); ``None``: the posterior mean is used.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    posterior_noise: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class StreamInputs:
    """Embedded tokens of a stream chunk and their expert routing: what the backbone takes.

    Attributes:
        hidden: ``[L, D]`` input embeddings.
        is_gen: ``[L]`` bool, True for tokens of the generation expert (VAE latents), False for the understanding
            expert (text, markers, ViT tokens).
    """

    hidden: torch.Tensor
    is_gen: torch.Tensor

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


@dataclass(frozen=True)
class NoisedView:
    """The noised VAE view of an image being generated, at flow time ``t`` (SPEC §2, §4).

    Attributes:
        x_t: ``[N, p²C]`` patchified latents at time ``t`` (``N = grid[0]·grid[1]``, row-major).
        t: the time in ``[0, 1]`` (1 = pure noise).
        grid: ``(rows, cols)`` of the latent token grid.
    """

    x_t: torch.Tensor
    t: float
    grid: tuple[int, int]


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
        sample_posterior: in training mode, encode each image as a sample of the VAE posterior
            (``mean + σ·ε``, as BAGEL trains, SPEC §4.1) instead of its mean. Evaluation mode always uses the mean.
            The draws come from the step's generator after the flow draws, so runs without it are unchanged.
    """

    def __init__(
        self,
        *,
        backbone: MoTBackbone,
        vit: ViTEncoder,
        vae: VAELatentHead,
        mask_builder: MaskBuilder | None = None,
        timestep_shift: float = 1.0,
        sample_posterior: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.vit = vit
        self.vae = vae
        self.mask_builder = mask_builder or MaskBuilder()
        self.timestep_shift = timestep_shift
        self.sample_posterior = bool(sample_posterior)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size  # (not embed_tokens.embedding_dim: an adapter may wrap the table)

    # ------------------------------------------------------------------ inputs
    def vae_clean_tokens(
        self,
        batch: PackedBatch,
        *,
        flow: FlowInputs | None = None,
        latents: Sequence[LatentPosterior | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[N_vae, 4C]`` clean patchified latents of every VAE token, each image encoded once.

        Args:
            batch: the packed sequence (``vae_images`` are encoded unless ``latents`` is given).
            flow: its ``posterior_noise``, when set, samples each image's latent as ``mean + σ·noise``.
            latents: precomputed posteriors (or means) of ``batch.vae_images``, in order — e.g. cached offline with
                ``model.vae.posterior(images)``; the autoencoder is then not run.
        """
        if batch.vae_indices.numel() == 0:
            return torch.zeros(0, self.vae.token_dim, device=batch.input_ids.device)
        if latents is None:
            posteriors = self.vae.posterior(batch.vae_images)
        else:
            if len(latents) != len(batch.vae_images):
                raise ValueError(f"ChatUMM: {len(latents)} precomputed latents for {len(batch.vae_images)} images")
            posteriors = [x if isinstance(x, LatentPosterior) else LatentPosterior(mean=x) for x in latents]
            device = batch.input_ids.device
            posteriors = [
                LatentPosterior(mean=p.mean.to(device), std=None if p.std is None else p.std.to(device))
                for p in posteriors
            ]
        if flow is not None and flow.posterior_noise is not None:
            z = [p.sample(eps.to(p.mean.device)) for p, eps in zip(posteriors, flow.posterior_noise, strict=True)]
        else:
            z = [p.mean for p in posteriors]
        return self.vae.view_tokens(z, batch.vae_view_image)

    def draw_flow(self, batch: PackedBatch, *, generator: torch.Generator | None = None) -> FlowInputs:
        """Sample one timestep per noised view and noise for every noised token; then, when ``sample_posterior``
        and in training mode, one posterior draw per image of the batch (after the others, so the flow draws do
        not depend on the setting)."""
        device = batch.input_ids.device
        t = sample_train_timesteps(
            batch.num_noised_views, shift=self.timestep_shift, generator=generator, device=device
        )
        n_tok = int(batch.mse_token_mask.sum())
        noise = torch.randn(n_tok, self.vae.token_dim, generator=generator, device="cpu").to(device)
        posterior_noise = None
        if self.sample_posterior and self.training and batch.vae_indices.numel():
            d, c = self.vae.downsample, self.vae.latent_channels
            posterior_noise = [
                torch.randn(c, int(img.shape[-2]) // d, int(img.shape[-1]) // d, generator=generator).to(device)
                for img in batch.vae_images
            ]
        return FlowInputs(timesteps=t, noise=noise, posterior_noise=posterior_noise)

    def embed(
        self,
        batch: PackedBatch,
        flow: FlowInputs | None = None,
        *,
        latents: Sequence[LatentPosterior | torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[L, D]`` input embeddings; also returns the clean latents and targets of noised tokens.

        ``flow`` is the noise draw of the batch's noised views; ``None`` for a batch without any (a context chunk
        at inference): every VAE view is then embedded clean, at ``t = 0``. ``latents``: precomputed VAE posteriors
        (see :meth:`vae_clean_tokens`).
        """
        device = batch.input_ids.device
        if flow is None:
            if batch.num_noised_views:
                raise ValueError(f"ChatUMM.embed: the batch has {batch.num_noised_views} noised views; pass their flow")
            empty = torch.zeros(0, device=device)
            flow = FlowInputs(timesteps=empty, noise=torch.zeros(0, self.vae.token_dim, device=device))
        table = self.backbone.embed_tokens
        hidden = torch.zeros(batch.seq_len, self.hidden_size, device=device, dtype=table.weight.dtype)
        hidden = hidden.index_copy(0, batch.text_indices, table(batch.input_ids[batch.text_indices]))
        if batch.vit_indices.numel():
            vit_tokens = self.vit(batch.vit_patches, batch.vit_patch_rc, batch.vit_grid_hw)
            hidden = hidden.index_copy(0, batch.vit_indices, vit_tokens.to(hidden.dtype))
        x0 = self.vae_clean_tokens(batch, flow=flow, latents=latents)
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
        self,
        batch: PackedBatch,
        *,
        flow: FlowInputs | None = None,
        generator: torch.Generator | None = None,
        latents: Sequence[LatentPosterior | torch.Tensor] | None = None,
    ) -> ChatUMMOutput:
        """Run one packed sequence; ``flow`` fixes the noise draw (tests, evaluation), else it is sampled.

        ``latents``: precomputed VAE posteriors (or means) of ``batch.vae_images``, in order, in place of running the
        autoencoder (see :meth:`vae_clean_tokens`); the result equals on-the-fly encoding.
        """
        flow = flow if flow is not None else self.draw_flow(batch, generator=generator)
        hidden, _, target = self.embed(batch, flow, latents=latents)
        out = self.backbone(
            hidden,
            position_ids=batch.position_ids,
            und_indices=batch.und_indices,
            gen_indices=batch.gen_indices,
            attn_mask=self.attention_mask(batch),
        )
        logits = self.logits(out[batch.ce_indices])
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

    # ------------------------------------------------------------------ inference surface
    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs of the inference methods are moved here)."""
        return self.backbone.lm_head.weight.device

    @property
    def vocab_size(self) -> int:
        """Rows of the token table (a tokenizer may use fewer)."""
        return self.backbone.config.vocab_size

    @property
    def vit_patch_size(self) -> int:
        """Pixels per ViT token side (the stream's ViT views must use it)."""
        return self.vit.patch_size

    @property
    def vae_token_stride(self) -> int:
        """Pixels per VAE token side: the autoencoder's downsample × the latent patch (the stream's VAE views)."""
        return self.vae.token_stride

    @property
    def vit_max_patches_per_side(self) -> int:
        """Side of the ViT's learned position grid: no ViT view may have more patches per side (BAGEL: 70)."""
        return self.vit.max_patches_per_side

    @property
    def max_latent_side(self) -> int:
        """Side of the latent position grid, in tokens: no VAE view may have more per side (BAGEL: 64)."""
        return self.vae.max_latent_side

    @property
    def latent_token_dim(self) -> int:
        """Channels ``p²C`` of one patchified latent token (the width of a noised view's ``x_t``)."""
        return self.vae.token_dim

    def new_kv_cache(self) -> MoTKVCache:
        """An empty KV cache for this model's backbone (layers, heads, dtype, device)."""
        return self.backbone.new_kv_cache()

    def embed_stream(self, batch: PackedBatch) -> StreamInputs:
        """Embed a chunk of clean pieces (no noised view), exactly as a packed training sequence embeds them.

        ``batch`` is laid out by the packer's ``StreamBuilder`` (``StreamBuilder.add_pieces``): text and markers go
        through the token table, ViT views through the ViT encoder, clean VAE views through the VAE head at
        ``t = 0``. Returns ``[L, D]`` hidden states with their routing (VAE latent tokens to the generation expert).
        """
        hidden, _, _ = self.embed(batch)
        is_gen = torch.zeros(batch.seq_len, dtype=torch.bool, device=hidden.device)
        is_gen[batch.gen_indices] = True
        return StreamInputs(hidden=hidden, is_gen=is_gen)

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` token ids (text or markers) -> ``[n, D]`` embeddings."""
        return self.backbone.embed_tokens(token_ids.to(self.device))

    def embed_noised_views(self, views: Sequence[NoisedView], *, vision_ids: tuple[int, int]) -> list[StreamInputs]:
        """Each noised view as the stream lays it out (SPEC §2): ``v_s``, its ``N`` latent tokens at time ``t``,
        ``v_e`` (``vision_ids = (v_s, v_e)``); markers to the understanding expert, latents to the generation one.

        The latents of all views are embedded in one call (``vae2llm(x_t) + time_embed(t) + 2-D position``).
        Returns one :class:`StreamInputs` of ``N_i + 2`` tokens per view.
        """
        dev = self.device
        x = torch.cat([v.x_t.to(dev) for v in views])
        t = torch.cat([torch.full((v.x_t.shape[0],), float(v.t), device=dev) for v in views])
        rc = torch.cat([grid_rc(*v.grid).to(dev) for v in views])
        for i, v in enumerate(views):
            if v.x_t.shape[0] != v.grid[0] * v.grid[1]:
                raise ValueError(
                    f"ChatUMM.embed_noised_views: view {i} has {v.x_t.shape[0]} latent tokens, its "
                    f"{v.grid[0]}x{v.grid[1]} grid needs {v.grid[0] * v.grid[1]}"
                )
        latents = self.vae.embed(x, t, rc).split([v.x_t.shape[0] for v in views])
        v_s, v_e = self.embed_text(torch.tensor(vision_ids))
        out = []
        for lat in latents:
            hidden = torch.cat([v_s[None], lat.to(v_s.dtype), v_e[None]])
            is_gen = torch.ones(hidden.shape[0], dtype=torch.bool, device=dev)
            is_gen[0] = is_gen[-1] = False
            out.append(StreamInputs(hidden=hidden, is_gen=is_gen))
        return out

    def view_velocities(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone outputs of noised views (``[N_i + 2, D]`` each, as :meth:`embed_noised_views` laid them out)
        -> their velocities ``[N_i, p²C]`` float32 (``llm2vae`` on the latent tokens, one call for all views)."""
        velocity = self.vae.velocity(torch.cat([o[1:-1] for o in outputs])).float()
        return list(velocity.split([o.shape[0] - 2 for o in outputs]))

    def chunk_mask(self, splits: SplitTable) -> torch.Tensor:
        """``[L, L]`` bool GCA mask inside a chunk (SPEC §3), on :attr:`device`; the chunk also sees its whole cache."""
        return self.mask_builder.dense(splits).to(self.device)

    def forward_chunk(self, chunk: CacheChunk) -> torch.Tensor:
        """Append ``chunk`` to its cache (committed if ``chunk.commit``); returns its ``[L, D]`` final-normed output.

        Inference only (under ``torch.no_grad()``); the chunk's tensors live on :attr:`device`.
        """
        return self.backbone(
            chunk.hidden,
            position_ids=chunk.position_ids,
            und_indices=chunk.und_indices,
            gen_indices=chunk.gen_indices,
            attn_mask=chunk.mask,
            kv_cache=chunk.cache,
            commit=chunk.commit,
        )

    def forward_chunks(self, chunks: Sequence[CacheChunk]) -> list[torch.Tensor]:
        """Several chunks, each appended to its own cache, in one forward (``MoTBackbone.forward_chunks``): the same
        outputs as :meth:`forward_chunk` on each alone, up to float rounding."""
        return self.backbone.forward_chunks(chunks)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[..., D]`` -> text logits ``[..., V]`` (``lm_head``, the model's dtype)."""
        return self.backbone.lm_head(hidden)

    def decode_latents(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patchified latent tokens ``[N, p²C]`` of a ``grid`` -> pixels ``[3, H, W]`` (about ``[-1, 1]``)."""
        latent = self.vae.unpatchify(tokens, grid)
        return self.vae.decode([latent])[0]
