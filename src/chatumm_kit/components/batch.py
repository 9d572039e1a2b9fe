"""`PackedBatch`: one packed sequence of dialogues, the data contract between packer, model and training.

Like BAGEL, the kit trains on a single packed sequence of ``L`` tokens (no batch dimension): several dialogues are
laid end to end and kept apart by the attention mask (document ids in the :class:`SplitTable`).

Token kinds inside the sequence (SPEC §2):

* *text tokens* — text and every marker (``im_s``, ``im_e``, ``v_s``, ``v_e``): embedded with the token table,
  routed to the understanding expert;
* *ViT tokens* — patches of an image's ViT view: embedded by the ViT encoder, understanding expert;
* *VAE tokens* — 2×2-patchified latents of an image's clean or noised VAE view: embedded by the VAE head,
  generation expert.

Index tensors are positions in ``[0, L)``, sorted ascending. Per-token image tensors (``vit_*``, ``vae_token_*``)
follow the order of their index tensor.

Example:
    >>> batch = packer.pack([sample])            # doctest: +SKIP
    >>> out = model(batch)                       # doctest: +SKIP
    >>> out.logits.shape == (batch.ce_indices.numel(), vocab)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from chatumm_kit.components.splits import SplitTable

__all__ = ["PackedBatch"]


@dataclass
class PackedBatch:
    """One packed training (or prefill) sequence.

    Attributes:
        input_ids: ``[L]`` token ids at text positions; ``pad_id`` (ignored) at ViT/VAE positions.
        position_ids: ``[L]`` 1-D RoPE positions (SPEC §3: text +1 per token; one position per image, markers
            included; clean image advances by 1 after it; a noised image does not advance).
        splits: the split table tiling ``[0, L)``.
        text_indices: ``[N_text]`` positions embedded by the token table.
        vit_indices: ``[N_vit]`` positions of ViT patch tokens.
        vae_indices: ``[N_vae]`` positions of VAE latent tokens (clean and noised views).
        und_indices: ``[N_und]`` positions routed to the understanding expert (text, markers, ViT).
        gen_indices: ``[N_gen]`` positions routed to the generation expert (all VAE latent tokens).
        ce_indices: ``[N_ce]`` positions whose output is supervised with cross-entropy.
        ce_labels: ``[N_ce]`` target token ids for ``ce_indices`` (next token, or the intent marker / ``<|end|>``
            on closing markers; SPEC §2).
        vit_patches: ``[N_vit, p*p*3]`` float pixels, normalised for the ViT, flattened per patch as
            (row-in-patch, col-in-patch, channel).
        vit_patch_rc: ``[N_vit, 2]`` (row, col) of each patch in its image's patch grid.
        vit_grid_hw: ``[n_vit_views, 2]`` patch-grid height and width of each ViT view, in sequence order.
        vae_images: one float tensor ``[3, H, W]`` in ``[-1, 1]`` per distinct image shown in a VAE view (each
            image is encoded once even when it has a clean and a noised view).
        vae_view_image: ``[n_vae_views]`` index into ``vae_images`` for each VAE view, in sequence order.
        vae_view_noised: ``[n_vae_views]`` bool, True for a noised view (a generation target, MSE loss).
        vae_grid_hw: ``[n_vae_views, 2]`` token-grid height and width of each VAE view (latent side / 2).
        vae_token_view: ``[N_vae]`` VAE view of each VAE token.
        vae_token_rc: ``[N_vae, 2]`` (row, col) of each VAE token in its view's token grid.
        sample_keys: key of each packed document, in document-id order.
        num_real_tokens: tokens that belong to a document (not padding).
        token_budget: the budget the packer filled (``num_real_tokens / token_budget`` is packing efficiency).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    splits: SplitTable
    text_indices: torch.Tensor
    vit_indices: torch.Tensor
    vae_indices: torch.Tensor
    und_indices: torch.Tensor
    gen_indices: torch.Tensor
    ce_indices: torch.Tensor
    ce_labels: torch.Tensor
    vit_patches: torch.Tensor
    vit_patch_rc: torch.Tensor
    vit_grid_hw: torch.Tensor
    vae_images: list[torch.Tensor]
    vae_view_image: torch.Tensor
    vae_view_noised: torch.Tensor
    vae_grid_hw: torch.Tensor
    vae_token_view: torch.Tensor
    vae_token_rc: torch.Tensor
    sample_keys: list[str] = field(default_factory=list)
    num_real_tokens: int = 0
    token_budget: int = 0

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.numel())

    @property
    def packing_efficiency(self) -> float:
        return self.num_real_tokens / self.token_budget if self.token_budget else 0.0

    @property
    def mse_token_mask(self) -> torch.Tensor:
        """``[N_vae]`` bool: which VAE tokens belong to a noised view (the flow-matching targets)."""
        return self.vae_view_noised[self.vae_token_view]

    @property
    def mse_indices(self) -> torch.Tensor:
        """``[N_mse]`` sequence positions of noised VAE tokens."""
        return self.vae_indices[self.mse_token_mask]

    @property
    def num_noised_views(self) -> int:
        return int(self.vae_view_noised.sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                moved[f.name] = v.to(device)
            elif isinstance(v, SplitTable):
                moved[f.name] = v.to(device)
            elif f.name == "vae_images":
                moved[f.name] = [x.to(device) for x in v]
        return replace(self, **moved)
