"""`ViTEncoder`: SigLIP-style vision transformer at native resolution, plus the connector into the LLM (SPEC §4).

Pipeline for the ``N`` patches of one packed batch (any number of images, each at its own size):

1. ``patch_embedding`` — a Linear over each patch flattened as (row-in-patch, col-in-patch, channel) (BAGEL stores
   it as Linear ``[hidden, p*p*3]``; a SigLIP Conv2d converts losslessly, see ``convert/siglip.py``);
2. ``+ position_embedding[row * max_patches_per_side + col]`` — a learned table, looked up by each patch's grid
   position (no interpolation: an image of ``h × w`` patches uses the top-left ``h × w`` corner of the grid);
3. ``num_layers`` pre-LN transformer blocks (timm ``Block``: attention with bias, gelu-tanh MLP), attention
   **only within each image**;
4. ``post_layernorm`` — the ViT feature (:meth:`ViTEncoder.features`);
5. ``connector`` (Linear, gelu-tanh, Linear) to the LLM width ``+ vit_pos_embed`` (fixed 2-D sin-cos, same index).

**Depth and the penultimate layer.** ``num_layers`` is the number of blocks built *and* run; post_layernorm is
always applied after the last one. HF ``SiglipVisionModel.last_hidden_state`` is exactly that for the full depth.
BAGEL uses SigLIP's penultimate layer by building ``config depth − 1`` layers (SPEC §5) and still applying
post_layernorm (its checkpoint carries ``post_layernorm``), i.e. ``post_layernorm(hidden_states[-2])`` in HF terms.
The SigLIP loader exposes this as ``drop_last_layer=True``; the encoder itself has no layer-selection mode.

**Block-diagonal attention.** Patches of different images never attend to each other. Images are padded to the
largest patch count in the call and keys beyond each image's count are masked (one batched SDPA call per layer;
O(n_images · max_count²) memory, not O(N²) as a dense block-diagonal mask would need). When all images have the
same patch count no mask is built at all, so SDPA can pick its fastest (flash) kernel.

Example:
    >>> vit = ViTEncoder(patch_size=4, hidden=32, num_layers=2, num_heads=2, mlp_dim=64,
    ...                  max_patches_per_side=8, llm_hidden=48)
    >>> views = ViTPatches.cat([vit.patchify(torch.randn(3, 16, 8)), vit.patchify(torch.randn(3, 8, 12))])
    >>> vit(views.patches, views.patch_rc, views.grid_hw).shape   # 4*2 + 2*3 patches
    torch.Size([14, 48])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch
from timm.layers import GELUTanh
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from chatumm_kit.components.layers import MLPConnector, PositionTable2D

__all__ = ["ViTEncoder", "ViTPatches", "patchify_image"]


@dataclass
class ViTPatches:
    """Images cut into patches in the ``PackedBatch`` ViT layout.

    Attributes:
        patches: ``[N, p*p*3]`` float, each patch flattened as (row-in-patch, col-in-patch, channel).
        patch_rc: ``[N, 2]`` long (row, col) of each patch in its image's patch grid; images follow one another,
            each in row-major order.
        grid_hw: ``[n_images, 2]`` long patch-grid height and width of each image.
    """

    patches: torch.Tensor
    patch_rc: torch.Tensor
    grid_hw: torch.Tensor

    @staticmethod
    def cat(items: Sequence[ViTPatches]) -> ViTPatches:
        """Concatenate several images' patches into one call's input (image order kept)."""
        if not items:
            raise ValueError("ViTPatches.cat: need at least one item")
        return ViTPatches(
            patches=torch.cat([i.patches for i in items]),
            patch_rc=torch.cat([i.patch_rc for i in items]),
            grid_hw=torch.cat([i.grid_hw for i in items]),
        )


def patchify_image(image: torch.Tensor, *, patch_size: int) -> ViTPatches:
    """Cut one ``[3, H, W]`` image (already normalised for the ViT) into non-overlapping ``patch_size`` patches.

    ``H`` and ``W`` must be multiples of ``patch_size`` (resizing is the data pipeline's job). Patches come in
    row-major grid order; within a patch, values are ordered (row-in-patch, col-in-patch, channel).

    Shapes:
        ``image: [3, H, W] -> patches [h*w, p*p*3], patch_rc [h*w, 2], grid_hw [1, 2]`` with ``h = H/p, w = W/p``.

    Example:
        >>> v = patchify_image(torch.arange(48.0).reshape(3, 4, 4), patch_size=2)
        >>> v.patches.shape, v.grid_hw.tolist(), v.patches[0, :3].tolist()   # pixel (0,0): channels 0, 1, 2
        (torch.Size([4, 12]), [[2, 2]], [0.0, 16.0, 32.0])
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"patchify_image: expected an image [3, H, W], got shape {tuple(image.shape)}")
    _, height, width = image.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"patchify_image: image size {height}x{width} is not a multiple of patch_size={p}")
    h, w = height // p, width // p
    # [3, h, p, w, p] -> [h, w, p_row, p_col, 3]
    patches = image.reshape(3, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * 3)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rc = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).to(image.device)
    return ViTPatches(patches=patches, patch_rc=rc, grid_hw=torch.tensor([[h, w]], device=image.device))


class ViTEncoder(L.LightningModule):
    """SigLIP-style ViT over patches of variable-size images, with the MLP connector to the LLM width.

    Args:
        patch_size: patch side in pixels (BAGEL: 14).
        hidden: ViT width (so400m: 1152).
        num_layers: blocks built and run (BAGEL: SigLIP depth 27 − 1 = 26; see the module docstring).
        num_heads: attention heads (so400m: 16).
        mlp_dim: MLP inner width (so400m: 4304).
        max_patches_per_side: side of the learned position grid (BAGEL: 70); images may have up to this many
            patches per side.
        llm_hidden: output width (the LLM hidden size).
        layer_norm_eps: LayerNorm epsilon (SigLIP: 1e-6).
        gradient_checkpointing: recompute each block in the backward pass while training (saves activations).

    Shapes:
        ``forward(patches [N, p*p*3], patch_rc [N, 2], grid_hw [n, 2]) -> [N, llm_hidden]`` (input token order).

    Example:
        >>> vit = ViTEncoder(patch_size=2, hidden=16, num_layers=1, num_heads=2, mlp_dim=32,
        ...                  max_patches_per_side=4, llm_hidden=8)
        >>> v = vit.patchify(torch.randn(3, 4, 6))
        >>> vit.features(v.patches, v.patch_rc, v.grid_hw).shape
        torch.Size([6, 16])
    """

    def __init__(
        self,
        *,
        patch_size: int = 14,
        hidden: int = 1152,
        num_layers: int = 26,
        num_heads: int = 16,
        mlp_dim: int = 4304,
        max_patches_per_side: int = 70,
        llm_hidden: int = 3584,
        layer_norm_eps: float = 1e-6,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"ViTEncoder: hidden={hidden} is not divisible by num_heads={num_heads}")
        if num_layers < 1:
            raise ValueError(f"ViTEncoder: num_layers must be >= 1, got {num_layers}")
        self.save_hyperparameters()
        self.patch_size = patch_size
        self.hidden = hidden
        self.max_patches_per_side = max_patches_per_side
        self.gradient_checkpointing = gradient_checkpointing
        norm = partial(nn.LayerNorm, eps=layer_norm_eps)

        self.patch_embedding = nn.Linear(patch_size * patch_size * 3, hidden)
        self.position_embedding = nn.Embedding(max_patches_per_side**2, hidden)
        nn.init.normal_(self.position_embedding.weight, std=hidden**-0.5)  # SigLIP's init scale
        self.layers = nn.ModuleList(
            Block(
                dim=hidden,
                num_heads=num_heads,
                mlp_ratio=(mlp_dim + 0.5) / hidden,  # timm builds int(hidden * ratio) == mlp_dim
                qkv_bias=True,
                proj_bias=True,
                act_layer=GELUTanh,
                norm_layer=norm,
            )
            for _ in range(num_layers)
        )
        if self.layers[0].mlp.fc1.out_features != mlp_dim:
            raise ValueError(f"ViTEncoder: could not build an MLP of width {mlp_dim} for hidden={hidden}")
        self.post_layernorm = norm(hidden)
        self.connector = MLPConnector(in_dim=hidden, out_dim=llm_hidden)
        self.vit_pos_embed = PositionTable2D(dim=llm_hidden, max_side=max_patches_per_side)

    # ------------------------------------------------------------------ input helpers

    def patchify(self, image: torch.Tensor) -> ViTPatches:
        """One ``[3, H, W]`` normalised image -> :class:`ViTPatches` with this encoder's patch size."""
        return patchify_image(image, patch_size=self.patch_size)

    def _flat_positions(self, patch_rc: torch.Tensor) -> torch.Tensor:
        rows, cols = patch_rc[:, 0].long(), patch_rc[:, 1].long()
        if rows.numel() and int(torch.maximum(rows.max(), cols.max())) >= self.max_patches_per_side:
            raise ValueError(
                f"ViTEncoder: patch grid position up to ({int(rows.max())}, {int(cols.max())}) exceeds "
                f"max_patches_per_side={self.max_patches_per_side}; resize the image or grow the position table"
            )
        return rows * self.max_patches_per_side + cols

    # ------------------------------------------------------------------ forward

    def features(self, patches: torch.Tensor, patch_rc: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """ViT features after post_layernorm, before the connector.

        Patches of image ``i`` must be the ``grid_hw[i].prod()`` consecutive rows after those of images ``< i``
        (the ``PackedBatch`` layout).

        Shapes:
            ``patches [N, p*p*3], patch_rc [N, 2], grid_hw [n, 2] -> [N, hidden]``
        """
        n_tokens = patches.shape[0]
        if patches.ndim != 2 or patches.shape[1] != self.patch_embedding.in_features:
            raise ValueError(
                f"ViTEncoder: patches must be [N, {self.patch_embedding.in_features}] "
                f"(patch_size={self.patch_size}), got {tuple(patches.shape)}"
            )
        if patch_rc.shape != (n_tokens, 2):
            raise ValueError(f"ViTEncoder: patch_rc must be [{n_tokens}, 2], got {tuple(patch_rc.shape)}")
        counts = (grid_hw[:, 0] * grid_hw[:, 1]).long().to(patches.device)
        if int(counts.sum()) != n_tokens:
            raise ValueError(
                f"ViTEncoder: grid_hw {grid_hw.tolist()} accounts for {int(counts.sum())} patches, got {n_tokens}"
            )
        if n_tokens == 0:  # a text-only batch: nothing to encode
            return patches.new_zeros(0, self.hidden, dtype=self.patch_embedding.weight.dtype)
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        x = x + self.position_embedding(self._flat_positions(patch_rc.to(patches.device)))

        # Block-diagonal attention by padding each image to the longest one (see module docstring).
        n_images, longest = counts.numel(), int(counts.max())
        image_of = torch.repeat_interleave(torch.arange(n_images, device=x.device), counts)
        slot = torch.arange(n_tokens, device=x.device) - (torch.cumsum(counts, 0) - counts)[image_of]
        padded = x.new_zeros(n_images, longest, self.hidden)
        padded[image_of, slot] = x
        mask = None
        if bool((counts != longest).any()):
            key_valid = torch.arange(longest, device=x.device)[None, :] < counts[:, None]  # [n, longest]
            mask = key_valid[:, None, None, :]  # broadcast over heads and queries

        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                padded = checkpoint(block, padded, mask, use_reentrant=False)
            else:
                padded = block(padded, attn_mask=mask)
        return self.post_layernorm(padded)[image_of, slot]

    def forward(self, patches: torch.Tensor, patch_rc: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """ViT tokens at the LLM width: ``connector(features) + vit_pos_embed[row * max_side + col]``.

        Shapes:
            ``patches [N, p*p*3], patch_rc [N, 2], grid_hw [n, 2] -> [N, llm_hidden]``
        """
        feats = self.features(patches, patch_rc, grid_hw)
        flat = self._flat_positions(patch_rc.to(feats.device))
        return self.connector(feats) + self.vit_pos_embed(flat).to(feats.dtype)
