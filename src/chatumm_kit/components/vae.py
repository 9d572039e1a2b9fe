"""`VAELatentHead`: the image autoencoder and the LLM-facing latent layers of the generation path (SPEC §4).

Holds a diffusers ``AutoencoderKL`` (BAGEL: the FLUX VAE — 8× downsample, 16 channels) and:

* latent normalisation ``z ← scaling_factor · (z − shift_factor)`` (FLUX: 0.3611, 0.1159) — :meth:`encode` returns
  normalised latents, :meth:`decode` undoes it;
* 2×2 latent patchification, feature order (p_row, p_col, C), tokens row-major — :meth:`patchify` /
  :meth:`unpatchify`;
* ``vae2llm`` (``4C → hidden``), ``time_embedder`` (sinusoid of ``t ∈ [0, 1]`` + MLP), ``latent_pos_embed`` (fixed
  2-D sin-cos indexed ``row · max_latent_side + col``): :meth:`embed` sums the three;
* ``llm2vae`` (``hidden → 4C``), zero-initialised so a fresh head predicts velocity 0: :meth:`velocity`.

**Frozen by default.** A new head's autoencoder has ``requires_grad=False``, stays in eval mode even when the head is
put in train mode, and :meth:`encode` runs it under ``no_grad``. Freezing is a training setting, not architecture:
whoever trains the head says otherwise with :meth:`VAELatentHead.set_autoencoder_frozen` (``ChatUMMSystem``'s
``freeze.vae``, or :class:`~chatumm_kit.systems.autoencoder.AutoencoderSystem`, which fits it).

**Deterministic latents.** :meth:`encode` uses the posterior **mode** (its mean) rather than a sample, so the same
image always gives the same latent (clean views, caching, tests); the flow-matching noise is the only randomness.

**Fitting the autoencoder on a new image domain** (recipe ``shapes/vae``): the head keeps the objective —
:meth:`autoencoder_loss` (reconstruction, L1 or MSE, + ``kl_weight`` · KL of the posterior, mean per latent element)
and :meth:`reconstruction_error` — and :class:`~chatumm_kit.systems.autoencoder.AutoencoderSystem` owns the
training settings (loss weights, optimizer over the autoencoder's parameters only: the LLM-facing layers are trained
with the unified model). :meth:`latent_stats` then gives the shift and scale under which normalised latents have mean
0 and standard deviation 1 on sample images. :func:`tiny_autoencoder` builds a small ``AutoencoderKL`` for the 32×32
ShapesChat world.

**Hyperparameters rebuild the head**: they are the constructor's arguments, with a passed autoencoder stored as its
``autoencoder_kwargs``, so ``VAELatentHead(**head.hparams)`` builds an equal head (weights aside).

Example:
    >>> head = VAELatentHead(hidden=64, autoencoder=tiny_autoencoder(latent_channels=4, downsample=4),
    ...                      scaling_factor=1.0, shift_factor=0.0, max_latent_side=8)
    >>> z = head.encode([torch.rand(3, 32, 32) * 2 - 1])[0]                # [4, 8, 8]
    >>> tokens = head.patchify(z)                                          # [16, 16]
    >>> rc = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    >>> head.embed(tokens, torch.full((16,), 0.5), rc).shape
    torch.Size([16, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors import safe_open
from torch import nn

from chatumm_kit.components.layers import PositionTable2D, TimestepEmbedder

__all__ = [
    "FLUX_VAE_KWARGS",
    "LatentPosterior",
    "ReconstructionLoss",
    "VAELatentHead",
    "VAELoss",
    "autoencoder_config",
    "load_autoencoder_file",
    "tiny_autoencoder",
]

# The FLUX.1 autoencoder (BAGEL's VAE): 8× downsample, 16 latent channels, no quant convs.
FLUX_VAE_KWARGS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def autoencoder_config(autoencoder: AutoencoderKL) -> dict[str, Any]:
    """The public ``AutoencoderKL`` constructor arguments of a built autoencoder (diffusers' private keys dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in autoencoder.config.items() if not k.startswith("_")}


def load_autoencoder_file(autoencoder: torch.nn.Module, path: str | Path) -> tuple[float, float]:
    """Load a file written by :class:`~chatumm_kit.training.callbacks.ExportAutoencoder` into ``autoencoder``;
    return ``(scaling_factor, shift_factor)`` from its metadata.

    An autoencoder built on the meta device (a model built for its architecture, whose checkpoint's tensors are
    assigned afterwards: ``training.loading``) gets only the key check and the factors: its weights would be
    dropped anyway (PyTorch warns once per tensor that copying into a meta parameter is a no-op), so they are not read.

    Raises ``ValueError`` listing missing and unexpected keys.
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder weights not found: {path}")
    current = autoencoder.state_dict()
    on_meta = any(t.is_meta for t in current.values())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        state = {} if on_meta else {k: f.get_tensor(k) for k in names}
    wanted = set(current)
    missing, unexpected = sorted(wanted - names), sorted(names - wanted)
    if missing or unexpected:
        raise ValueError(f"{path}: autoencoder keys do not match: missing {missing}, unexpected {unexpected}")
    if state:
        autoencoder.load_state_dict(state, strict=True)
    return float(meta.get("scaling_factor", 1.0)), float(meta.get("shift_factor", 0.0))


def tiny_autoencoder(
    *,
    latent_channels: int = 4,
    downsample: int = 4,
    base_channels: int = 32,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    mid_block_attention: bool = False,
) -> AutoencoderKL:
    """A small ``AutoencoderKL`` (FLUX layout: no quant convs) that builds in milliseconds and runs fast on CPU.

    ``downsample`` must be a power of two; the encoder has ``log2(downsample) + 1`` blocks of width
    ``base_channels · (1, 2, 2, …)``. 32×32 ShapesChat images with ``downsample=4`` give 8×8 latents (4×4 tokens).

    Example:
        >>> ae = tiny_autoencoder(latent_channels=4, downsample=4)
        >>> ae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode().shape
        torch.Size([1, 4, 8, 8])
    """
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"tiny_autoencoder: downsample must be a power of two, got {downsample}")
    n_blocks = downsample.bit_length()  # log2(downsample) + 1
    widths = [base_channels * min(2**i, 2) for i in range(n_blocks)]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n_blocks,
        up_block_types=["UpDecoderBlock2D"] * n_blocks,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_block_attention,
    )


ReconstructionLoss = Literal["l1", "mse"]


@dataclass
class VAELoss:
    """Autoencoder fitting loss: ``total = reconstruction + kl_weight · kl`` (scalars)."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


@dataclass
class LatentPosterior:
    """The autoencoder's posterior of one image in normalised latent units: ``N(mean, std²)`` per element.

    Attributes:
        mean: ``[C, h, w]`` the posterior mean (what :meth:`VAELatentHead.encode` returns).
        std: ``[C, h, w]`` its standard deviation, or ``None`` when only the mean was kept (then no sampling).
    """

    mean: torch.Tensor
    std: torch.Tensor | None = None

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """``mean + std · noise`` (``noise`` ~ N(0, I), shaped like ``mean``)."""
        if self.std is None:
            raise ValueError("LatentPosterior.sample: this posterior holds only the mean (std=None); cache the std too")
        if noise.shape != self.mean.shape:
            raise ValueError(f"LatentPosterior.sample: noise {tuple(noise.shape)} != mean {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(self.mean.dtype)


class VAELatentHead(L.LightningModule):
    """Frozen image autoencoder + latent patchify + LLM-facing embedding and output layers.

    Args:
        hidden: LLM hidden size.
        autoencoder: a built ``AutoencoderKL`` (e.g. from ``convert.flux_vae.load_flux_vae`` or
            :func:`tiny_autoencoder`); exactly one of ``autoencoder`` / ``autoencoder_kwargs``.
        autoencoder_kwargs: ``AutoencoderKL`` constructor arguments (used by ``load_from_checkpoint``: the config of
            a passed autoencoder is stored in the hyperparameters under this name).
        scaling_factor, shift_factor: latent normalisation ``z ← scale · (z − shift)`` (FLUX: 0.3611, 0.1159).
        latent_patch: latent patch side (BAGEL: 2).
        max_latent_side: side of the latent position grid, in tokens (BAGEL: 64).
        timestep_freq_dim: sinusoid width of the time embedding (SPEC §4: 256).

    Shapes:
        ``embed(x_t [N, p²C], t [N], rc [N, 2]) -> [N, hidden]``; ``velocity(h [N, hidden]) -> [N, p²C]``.
    """

    def __init__(
        self,
        *,
        hidden: int,
        autoencoder: AutoencoderKL | None = None,
        autoencoder_kwargs: dict[str, Any] | None = None,
        scaling_factor: float = 0.3611,
        shift_factor: float = 0.1159,
        latent_patch: int = 2,
        max_latent_side: int = 64,
        timestep_freq_dim: int = 256,
    ) -> None:
        super().__init__()
        if (autoencoder is None) == (autoencoder_kwargs is None):
            raise ValueError("VAELatentHead: pass exactly one of autoencoder= or autoencoder_kwargs=")
        if autoencoder is None:
            autoencoder = AutoencoderKL(**autoencoder_kwargs)
        # A passed autoencoder is stored as its config, so the hyperparameters alone rebuild the head.
        self.save_hyperparameters(
            {
                "hidden": hidden,
                "autoencoder_kwargs": autoencoder_config(autoencoder),
                "scaling_factor": float(scaling_factor),
                "shift_factor": float(shift_factor),
                "latent_patch": latent_patch,
                "max_latent_side": max_latent_side,
                "timestep_freq_dim": timestep_freq_dim,
            }
        )
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.latent_patch = latent_patch
        self.max_latent_side = max_latent_side
        self.latent_channels = int(autoencoder.config.latent_channels)
        self.downsample = 2 ** (len(autoencoder.config.block_out_channels) - 1)

        token_dim = self.latent_channels * latent_patch**2
        self.vae2llm = nn.Linear(token_dim, hidden)
        self.llm2vae = nn.Linear(hidden, token_dim)
        nn.init.zeros_(self.llm2vae.weight)  # SPEC §4: a fresh head predicts zero velocity
        nn.init.zeros_(self.llm2vae.bias)
        self.latent_pos_embed = PositionTable2D(dim=hidden, max_side=max_latent_side)
        self.time_embedder = TimestepEmbedder(hidden=hidden, freq_dim=timestep_freq_dim)
        self.autoencoder_frozen = True
        self.set_autoencoder_frozen(True)

    def set_autoencoder_frozen(self, frozen: bool) -> None:
        """Freeze the autoencoder (no gradients, eval mode, :meth:`encode` under ``no_grad``) or let it train."""
        self.autoencoder_frozen = bool(frozen)
        self.autoencoder.requires_grad_(not frozen)
        self.autoencoder.train(self.training and not frozen)

    @property
    def token_dim(self) -> int:
        """Features per latent token: ``latent_patch² · latent_channels`` (FLUX: 64)."""
        return self.latent_channels * self.latent_patch**2

    @property
    def token_stride(self) -> int:
        """Pixels per latent token side: ``downsample · latent_patch`` (FLUX: 8 · 2 = 16); an image's VAE view
        has sides in multiples of it."""
        return self.downsample * self.latent_patch

    def train(self, mode: bool = True) -> VAELatentHead:
        """As ``nn.Module.train``, but a frozen autoencoder stays in eval mode."""
        super().train(mode)
        if self.autoencoder_frozen:
            self.autoencoder.eval()
        return self

    # ------------------------------------------------------------------ pixels <-> normalised latents

    def _check_image(self, image: torch.Tensor, where: str) -> None:
        if image.ndim != 3 or image.shape[0] != self.autoencoder.config.in_channels:
            raise ValueError(f"VAELatentHead.{where}: expected an image [3, H, W], got {tuple(image.shape)}")
        if image.shape[1] % self.downsample or image.shape[2] % self.downsample:
            raise ValueError(
                f"VAELatentHead.{where}: image size {tuple(image.shape[1:])} is not a multiple of the "
                f"autoencoder's downsample factor {self.downsample}"
            )

    @staticmethod
    def _by_size(items: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        return groups

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw autoencoder latent -> model latent: ``scale · (z − shift)``."""
        return self.scaling_factor * (z - self.shift_factor)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latent -> raw autoencoder latent: ``z / scale + shift``."""
        return z / self.scaling_factor + self.shift_factor

    def encode(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Images in ``[-1, 1]`` -> normalised latents (posterior mode = mean; images of one size are batched together).

        Shapes:
            ``images: list of [3, H, W] -> list of [C, H/d, W/d]`` (``d`` = downsample factor).
        """
        return [m.mean for m in self.posterior(images)]

    def posterior(self, images: Sequence[torch.Tensor]) -> list[LatentPosterior]:
        """Images in ``[-1, 1]`` -> the autoencoder's Gaussian posterior of each, in normalised latent units.

        What to cache offline (``mean`` and ``std`` per image) and pass to ``ChatUMM(..., latents=...)``; a sample is
        :meth:`LatentPosterior.sample` (SPEC §4.1: BAGEL trains on ``mean + σ·ε``).

        Shapes:
            ``images: list of [3, H, W] -> list of LatentPosterior([C, H/d, W/d], [C, H/d, W/d])``.
        """
        for image in images:
            self._check_image(image, "posterior")
        out: list[LatentPosterior | None] = [None] * len(images)
        dtype = next(self.autoencoder.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.autoencoder_frozen):
            for idx in self._by_size(images).values():
                x = torch.stack([images[i] for i in idx]).to(dtype)
                dist = self.autoencoder.encode(x).latent_dist
                mean, std = self.normalize(dist.mean), self.scaling_factor * dist.std
                for k, i in enumerate(idx):
                    out[i] = LatentPosterior(mean=mean[k], std=std[k])
        return out  # type: ignore[return-value]

    def decode(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised latents -> images (about ``[-1, 1]``, not clamped; clamp before saving).

        Shapes:
            ``latents: list of [C, h, w] -> list of [3, h·d, w·d]``.
        """
        out: list[torch.Tensor | None] = [None] * len(latents)
        dtype = next(self.autoencoder.parameters()).dtype
        for idx in self._by_size(latents).values():
            z = torch.stack([latents[i] for i in idx])
            if z.shape[1] != self.latent_channels:
                raise ValueError(f"VAELatentHead.decode: latents must have {self.latent_channels} channels")
            images = self.autoencoder.decode(self.denormalize(z).to(dtype)).sample
            for i, im in zip(idx, images):
                out[i] = im
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ latents <-> tokens

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """``[C, h, w] -> [(h/p)·(w/p), p·p·C]``: tokens row-major, features ordered (p_row, p_col, C).

        Example:
            >>> head.patchify(torch.zeros(16, 8, 6)).shape        # doctest: +SKIP
            torch.Size([12, 64])
        """
        p = self.latent_patch
        c, h, w = latent.shape
        if c != self.latent_channels or h % p or w % p:
            raise ValueError(
                f"VAELatentHead.patchify: latent {tuple(latent.shape)} must have {self.latent_channels} channels and "
                f"sides divisible by latent_patch={p}"
            )
        grid = latent.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)  # [gh, gw, p_row, p_col, C]
        return grid.reshape((h // p) * (w // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor, grid_hw: tuple[int, int] | torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[gh·gw, p·p·C]`` and ``(gh, gw)`` -> ``[C, gh·p, gw·p]``."""
        gh, gw = (int(v) for v in grid_hw)
        p, c = self.latent_patch, self.latent_channels
        if tokens.shape != (gh * gw, p * p * c):
            raise ValueError(
                f"VAELatentHead.unpatchify: tokens {tuple(tokens.shape)} do not fit grid {gh}x{gw} of {p * p * c}"
            )
        return tokens.reshape(gh, gw, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, gh * p, gw * p)

    def view_tokens(self, latents: Sequence[torch.Tensor], view_image: torch.Tensor) -> torch.Tensor:
        """Tokens of every VAE view in sequence order (``PackedBatch.vae_images`` / ``vae_view_image`` layout).

        Shapes:
            ``latents: list of [C, h, w], view_image: [n_views] -> [N_vae, p·p·C]``.
        """
        if len(view_image) == 0:
            return self.vae2llm.weight.new_zeros(0, self.token_dim)
        return torch.cat([self.patchify(latents[int(i)]) for i in view_image])

    # ------------------------------------------------------------------ LLM-facing layers

    def embed(self, x_t: torch.Tensor, t: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
        """Latent tokens -> LLM inputs: ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[row · side + col]``.

        ``t`` is the flow-matching time in ``[0, 1]`` (0 for clean views).

        Shapes:
            ``x_t [N, p²C], t [N], rc [N, 2] -> [N, hidden]``.
        """
        flat = self.latent_pos_embed.index(rc[:, 0].long(), rc[:, 1].long())
        h = self.vae2llm(x_t.to(self.vae2llm.weight.dtype))
        return h + self.time_embedder(t).to(h.dtype) + self.latent_pos_embed(flat).to(h.dtype)

    def velocity(self, h: torch.Tensor) -> torch.Tensor:
        """LLM outputs at noised latent tokens -> predicted velocity ``[N, p²C]`` (``llm2vae``)."""
        return self.llm2vae(h)

    # ------------------------------------------------------------------ fitting the autoencoder

    def _raw_latents(self, images: Sequence[torch.Tensor], where: str) -> list[torch.Tensor]:
        """The autoencoder's posterior mode of each image, before normalisation (images of one size batched)."""
        for image in images:
            self._check_image(image, where)
        out: list[torch.Tensor | None] = [None] * len(images)
        dtype = next(self.autoencoder.parameters()).dtype
        for idx in self._by_size(images).values():
            x = torch.stack([images[i] for i in idx]).to(dtype)
            z = self.autoencoder.encode(x).latent_dist.mode()
            for i, zi in zip(idx, z):
                out[i] = zi
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def latent_stats(self, images: Sequence[torch.Tensor]) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)`` under which the latents of ``images`` have mean 0 and std 1.

        The head is not changed; build the fitted one with ``VAELatentHead(**{**head.hparams, "scaling_factor":
        scale, "shift_factor": shift})`` or store the pair with the autoencoder (``ExportAutoencoder``).
        """
        raw = torch.cat([z.reshape(-1).float() for z in self._raw_latents(images, "latent_stats")])
        if raw.numel() < 2 or float(raw.std()) == 0.0:
            raise ValueError("VAELatentHead.latent_stats: latents have no spread; pass more / varied images")
        return float(1.0 / raw.std()), float(raw.mean())

    def _group_loss(self, images: torch.Tensor, *, reconstruction: ReconstructionLoss, kl_weight: float) -> VAELoss:
        """Reconstruction + KL for ``[B, 3, H, W]`` in ``[-1, 1]`` (posterior *sampled*, as in VAE training)."""
        posterior = self.autoencoder.encode(images).latent_dist
        z = posterior.sample()
        recon = self.autoencoder.decode(z).sample
        rec = F.l1_loss(recon, images) if reconstruction == "l1" else F.mse_loss(recon, images)
        kl = posterior.kl().mean() / z[0].numel()  # diffusers sums KL over C, h, w: make it per latent element
        return VAELoss(total=rec + kl_weight * kl, reconstruction=rec, kl=kl)

    def _batch_images(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            if batch.ndim != 4:
                raise ValueError(f"VAELatentHead: a tensor batch must be [B, 3, H, W], got {tuple(batch.shape)}")
            return [batch]
        for image in batch:
            self._check_image(image, "autoencoder_loss")
        return [torch.stack([batch[i] for i in idx]) for idx in self._by_size(batch).values()]

    def autoencoder_loss(
        self,
        batch: torch.Tensor | Sequence[torch.Tensor],
        *,
        reconstruction: ReconstructionLoss = "l1",
        kl_weight: float = 1e-4,
    ) -> VAELoss:
        """The autoencoder-fitting objective over ``[B, 3, H, W]`` or a list of ``[3, H, W]`` images in ``[-1, 1]``.

        Images of one size are one group; each group's loss is weighted by its share of the images. Gradients reach
        the autoencoder only if it is not frozen (:meth:`set_autoencoder_frozen`).
        """
        if reconstruction not in ("l1", "mse"):
            raise ValueError(
                f"VAELatentHead.autoencoder_loss: reconstruction must be 'l1' or 'mse', not {reconstruction!r}"
            )
        groups = self._batch_images(batch)
        total_images = sum(g.shape[0] for g in groups)
        parts = [
            (g.shape[0] / total_images, self._group_loss(g, reconstruction=reconstruction, kl_weight=kl_weight))
            for g in groups
        ]
        return VAELoss(
            total=sum(w * x.total for w, x in parts),
            reconstruction=sum(w * x.reconstruction for w, x in parts),
            kl=sum(w * x.kl for w, x in parts),
        )

    @torch.no_grad()
    def reconstruction_error(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean absolute error of decode(posterior mode) against the images (deterministic; scalar)."""
        errs = [
            (self.autoencoder.decode(self.autoencoder.encode(x).latent_dist.mode()).sample - x)
            .abs()
            .mean(dim=(1, 2, 3))
            for x in self._batch_images(batch)
        ]
        return torch.cat(errs).mean()
