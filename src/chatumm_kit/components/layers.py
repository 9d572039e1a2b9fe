"""Shared building blocks of the model parts (SPEC §4): norms, rotary, MLPs, time and 2-D position embeddings.

Plain ``nn.Module``s and functions; every formula is re-derived here from its definition:

* :class:`RMSNorm` — ``y = w * x / sqrt(mean(x²) + eps)``, computed in float32.
* :class:`RotaryEmbedding` + :func:`apply_rotary` — 1-D RoPE, "rotate-half" channel pairing (channel ``i`` is
  paired with channel ``i + head_dim/2``), the convention of Qwen2.
* :class:`SwiGLU` — ``down(silu(gate(x)) * up(x))``, no biases.
* :class:`TimestepEmbedder` — sinusoid of ``t ∈ [0, 1]`` (not ×1000), then Linear–SiLU–Linear.
* :func:`sincos_2d_table` / :class:`PositionTable2D` — fixed 2-D sin-cos tables indexed by ``row * max_side + col``;
  :func:`grid_rc` — the ``(row, col)`` of every token of an image view's grid, row-major.
* :class:`MLPConnector` — Linear, gelu-tanh, Linear (ViT width → LLM width).

Example:
    >>> rope = RotaryEmbedding(head_dim=8)
    >>> cos, sin = rope(torch.arange(5))
    >>> q, k = apply_rotary(torch.randn(2, 5, 8), torch.randn(1, 5, 8), cos, sin)
    >>> q.shape, k.shape
    (torch.Size([2, 5, 8]), torch.Size([1, 5, 8]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLPConnector",
    "PositionTable2D",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TimestepEmbedder",
    "apply_rotary",
    "grid_rc",
    "sincos_1d",
    "sincos_2d_table",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned gain (no bias, no mean subtraction).

    The statistic is taken in float32 and the normalised value is cast back to the input dtype before the gain is
    applied, so bf16 runs match the Qwen2 reference bit for bit in the order of operations.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.

    Shapes:
        ``x: [..., dim] -> [..., dim]``

    Example:
        >>> RMSNorm(4)(torch.ones(2, 4))
        tensor([[1.0000, 1.0000, 1.0000, 1.0000],
                [1.0000, 1.0000, 1.0000, 1.0000]], grad_fn=<MulBackward0>)
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x²) + eps) in float32 (a fused kernel where torch has one), gain applied in the input dtype
        return self.weight * F.rms_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables of 1-D rotary position embedding for arbitrary (packed, repeated) position ids.

    Channel pair ``(i, i + head_dim/2)`` rotates by angle ``pos * theta^(-2i/head_dim)``. The inverse frequencies are
    recomputed on the fly (``head_dim/2`` numbers): no buffer, so a model built on the meta device needs nothing
    restored after materialisation.

    Args:
        head_dim: per-head channel count (even).
        theta: RoPE base (Qwen2.5 / BAGEL: 1e6).

    Shapes:
        ``position_ids: [L] (int) -> (cos, sin)``, each ``[L, head_dim]`` float32.

    Example:
        >>> cos, sin = RotaryEmbedding(head_dim=4, theta=10_000.0)(torch.tensor([0, 3, 3]))
        >>> cos.shape, bool((cos[0] == 1).all())
        (torch.Size([3, 4]), True)
    """

    def __init__(self, *, head_dim: int, theta: float = 1e6) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """``[head_dim/2]`` float32 angular frequencies ``theta^(-2i/head_dim)``."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.float()[:, None] * self.inv_freq(position_ids.device)[None, :]  # [L, head_dim/2]
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves of a pair share an angle
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension (a 90° turn of every channel pair)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by their positions' angles: ``x * cos + rotate_half(x) * sin``.

    ``cos``/``sin`` (``[L, head_dim]``, from :class:`RotaryEmbedding`) broadcast against the last two dims of ``q``
    and ``k``, which must be ``[..., L, head_dim]`` (e.g. ``[heads, L, head_dim]``). The product is taken in the
    tables' float32 and cast back to the input dtype.

    Example:
        >>> cos, sin = RotaryEmbedding(head_dim=4)(torch.arange(3))
        >>> q, k = apply_rotary(torch.ones(2, 3, 4), torch.ones(1, 3, 4), cos, sin)
        >>> torch.allclose(q[:, 0], torch.ones(4))  # position 0 is the identity
        True
    """
    q_out = q.float() * cos + _rotate_half(q.float()) * sin
    k_out = k.float() * cos + _rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` without biases (Qwen2 MLP).

    Args:
        dim: model width.
        hidden_dim: inner width.

    Shapes:
        ``x: [..., dim] -> [..., dim]``

    Example:
        >>> SwiGLU(dim=8, hidden_dim=16)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sincos_1d(positions: torch.Tensor, *, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoid ``[sin(p·ω_i), cos(p·ω_i)]`` with ``ω_i = max_period^(-i/(dim/2))``, ``i < dim/2``.

    Shapes:
        ``positions: [N] -> [N, dim]`` float32 (sin half first, then cos half).
    """
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    half = dim // 2
    omega = max_period ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def sincos_2d_table(*, dim: int, max_side: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table for a ``max_side × max_side`` grid (MAE convention, as BAGEL stores it).

    Row ``r * max_side + c`` holds ``[sincos_1d(c, dim/2), sincos_1d(r, dim/2)]``: the first half of the channels
    encodes the **column**, the second half the **row**, each half as sin block then cos block. SPEC §5 keys
    ``vit_pos_embed.pos_embed`` ([70², hidden]) and ``latent_pos_embed.pos_embed`` ([64², hidden]) hold this table.

    Shapes:
        ``-> [max_side**2, dim]`` float32; ``dim`` must be a multiple of 4.

    Example:
        >>> t = sincos_2d_table(dim=8, max_side=3)
        >>> t.shape, bool(torch.equal(t[4, :4], t[1, :4]))  # (1,1) and (0,1) share the column half
        (torch.Size([9, 8]), True)
    """
    if dim % 4:
        raise ValueError(f"sincos_2d_table: dim must be a multiple of 4, got {dim}")
    side = torch.arange(max_side)
    rows = side.repeat_interleave(max_side)  # flat index i -> row i // max_side
    cols = side.repeat(max_side)  # flat index i -> col i % max_side
    return torch.cat([sincos_1d(cols, dim=dim // 2), sincos_1d(rows, dim=dim // 2)], dim=-1)


def grid_rc(rows: int, cols: int) -> torch.Tensor:
    """``[rows*cols, 2]`` (row, col) of a grid in row-major order (the token order of an image view).

    Example:
        >>> grid_rc(2, 2).tolist()
        [[0, 0], [0, 1], [1, 0], [1, 1]]
    """
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.stack([r, c], dim=1)


class PositionTable2D(nn.Module):
    """Holds a fixed :func:`sincos_2d_table` as the persistent buffer ``pos_embed`` and looks rows up.

    Persistent so the state-dict key matches SPEC §5 (``<name>.pos_embed``); :meth:`reset_parameters` recomputes it
    (after meta-device materialisation or to change nothing but be sure).

    Args:
        dim: table width (model hidden size).
        max_side: grid side; flat index is ``row * max_side + col``.

    Shapes:
        ``flat_index: [N] (int) -> [N, dim]``

    Example:
        >>> pe = PositionTable2D(dim=8, max_side=4)
        >>> pe(torch.tensor([0, 5])).shape, pe.index(torch.tensor([1]), torch.tensor([1])).tolist()
        (torch.Size([2, 8]), [5])
    """

    def __init__(self, *, dim: int, max_side: int) -> None:
        super().__init__()
        self.dim = dim
        self.max_side = max_side
        self.register_buffer("pos_embed", sincos_2d_table(dim=dim, max_side=max_side), persistent=True)

    def reset_parameters(self) -> None:
        table = sincos_2d_table(dim=self.dim, max_side=self.max_side)
        self.pos_embed = table.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat indices ``row * max_side + col``; raises if a coordinate falls outside the grid."""
        if rows.numel() and (int(rows.max()) >= self.max_side or int(cols.max()) >= self.max_side):
            raise ValueError(
                f"PositionTable2D: grid position up to ({int(rows.max())}, {int(cols.max())}) "
                f"exceeds max_side={self.max_side}"
            )
        return rows * self.max_side + cols

    def forward(self, flat_index: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[flat_index]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_side={self.max_side}"


class TimestepEmbedder(nn.Module):
    """Flow-matching time ``t ∈ [0, 1]`` → hidden vector (SPEC §4).

    ``[cos(t·ω_i), sin(t·ω_i)]`` with ``ω_i = 10000^(-i/(freq_dim/2))`` — t is used as is, **not** ×1000 — then
    ``mlp = Sequential(Linear(freq_dim, hidden), SiLU, Linear(hidden, hidden))`` (keys ``mlp.0.*``, ``mlp.2.*``).

    Shapes:
        ``t: [N] float -> [N, hidden]``

    Example:
        >>> TimestepEmbedder(hidden=16)(torch.tensor([0.0, 0.5])).shape
        torch.Size([2, 16])
    """

    def __init__(self, *, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"TimestepEmbedder: freq_dim must be even, got {freq_dim}")
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """``[N] -> [N, freq_dim]`` float32, cos block first (DiT order)."""
        half = self.freq_dim // 2
        omega = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * omega[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class MLPConnector(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: maps ViT features (``in_dim``) to the LLM width (``out_dim``) (SPEC §4).

    Shapes:
        ``x: [N, in_dim] -> [N, out_dim]``

    Example:
        >>> MLPConnector(in_dim=12, out_dim=8)(torch.randn(5, 12)).shape
        torch.Size([5, 8])
    """

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
