"""`MoTKVCache`: per-layer keys and values of a growing dialogue, for incremental MoT inference (SPEC §4).

Keys are stored **after** RoPE (and after q/k-norm), in sequence order, one buffer per layer of shape
``[num_kv_heads, capacity, head_dim]``; :meth:`MoTKVCache.keys` / :meth:`values` return the first ``num_tokens``
rows as views ``[num_kv_heads, N_cached, head_dim]``. Buffers grow geometrically, so decoding token by token costs
amortised O(1) copies per token instead of re-concatenating the whole history.

A forward pass with a cache (``MoTBackbone.forward(..., kv_cache=cache, commit=...)``) writes the chunk's keys and
values into the rows just past ``num_tokens`` and attends over ``[0, num_tokens + L_new)``; only ``commit=True``
advances ``num_tokens``. A noised image chunk therefore leaves the cache exactly as it was: its rows are scratch
space that the next chunk overwrites (SPEC §3 rule 3: nothing later sees a noised image).

The cache is inference-only: it holds detached tensors and is filled under ``torch.no_grad()``.

A :class:`CacheChunk` is what one forward appends to one cache: the chunk's embedded tokens, their positions and
expert routing, the mask inside the chunk, and whether to commit it. ``MoTBackbone.forward_chunks`` appends several
chunks, each to its own cache, in one pass through the layers.

Example:
    >>> cache = MoTKVCache(num_layers=2, num_kv_heads=1, head_dim=4)
    >>> cache.reserve(3); cache.write(0, 0, torch.ones(3, 1, 4), torch.ones(3, 1, 4)); cache.advance(3)
    >>> cache.keys(0).shape, cache.num_tokens
    (torch.Size([1, 3, 4]), 3)
    >>> cache.truncate(1); cache.clone().keys(0).shape
    torch.Size([1, 1, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CacheChunk", "MoTKVCache"]


class MoTKVCache:
    """Keys/values of all layers for the first ``num_tokens`` tokens of a stream.

    Args:
        num_layers: decoder layers (one K and one V buffer each).
        num_kv_heads: key/value heads.
        head_dim: channels per head.
        dtype: storage dtype (the model's dtype).
        device: storage device.
        capacity: rows to allocate up front (grows on demand).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        capacity: int = 0,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._num_tokens = 0
        shape = (num_kv_heads, capacity, head_dim)
        self._k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    @property
    def num_tokens(self) -> int:
        """Committed tokens ``N_cached``."""
        return self._num_tokens

    @property
    def capacity(self) -> int:
        return self._k[0].shape[1] if self.num_layers else 0

    def __len__(self) -> int:
        return self._num_tokens

    def keys(self, layer: int) -> torch.Tensor:
        """``[num_kv_heads, N_cached, head_dim]`` committed keys of ``layer`` (a view)."""
        return self._k[layer][:, : self._num_tokens]

    def values(self, layer: int) -> torch.Tensor:
        """``[num_kv_heads, N_cached, head_dim]`` committed values of ``layer`` (a view)."""
        return self._v[layer][:, : self._num_tokens]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` rows, keeping the committed ones (capacity at least doubles when it grows)."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity, 16)
        for store in (self._k, self._v):
            for i, old in enumerate(store):
                new = torch.empty((self.num_kv_heads, new_cap, self.head_dim), dtype=self.dtype, device=self.device)
                new[:, : self._num_tokens] = old[:, : self._num_tokens]
                store[i] = new

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` (``[n, num_kv_heads, head_dim]``, sequence order) at rows ``[start, start + n)``.

        Rows past ``num_tokens`` are scratch until :meth:`advance` commits them. Call :meth:`reserve` first.
        """
        n = k.shape[0]
        if start + n > self.capacity:
            raise ValueError(f"MoTKVCache.write: rows [{start}, {start + n}) exceed capacity {self.capacity}")
        self._k[layer][:, start : start + n] = k.detach().transpose(0, 1)
        self._v[layer][:, start : start + n] = v.detach().transpose(0, 1)

    def span(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``[0, end)`` (committed plus scratch), each ``[num_kv_heads, end, head_dim]``."""
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` scratch rows written past ``num_tokens``."""
        if self._num_tokens + n > self.capacity:
            raise ValueError(f"MoTKVCache.advance({n}): only {self.capacity - self._num_tokens} rows were written")
        self._num_tokens += n

    def truncate(self, n: int) -> None:
        """Forget every token from position ``n`` on (rollback); capacity is kept."""
        if not 0 <= n <= self._num_tokens:
            raise ValueError(f"MoTKVCache.truncate({n}): must lie in [0, {self._num_tokens}]")
        self._num_tokens = n

    def clone(self) -> MoTKVCache:
        """An independent copy of the committed rows (e.g. to branch a CFG context)."""
        out = MoTKVCache(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            capacity=self._num_tokens,
        )
        for i in range(self.num_layers):
            out._k[i].copy_(self.keys(i))
            out._v[i].copy_(self.values(i))
        out._num_tokens = self._num_tokens
        return out

    def __repr__(self) -> str:
        return (
            f"MoTKVCache(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_tokens={self._num_tokens}, capacity={self.capacity}, dtype={self.dtype})"
        )


@dataclass(frozen=True)
class CacheChunk:
    """New tokens to append to one cache (one forward: ``MoTBackbone.forward_chunks``, ``ChatUMM.forward_chunk``).

    Attributes:
        cache: the stream so far; the chunk's queries see all of its committed rows.
        hidden: ``[L, D]`` embedded tokens.
        position_ids: ``[L]`` 1-D RoPE positions.
        is_gen: ``[L]`` bool, True for tokens of the generation expert (VAE latents); the others go to the
            understanding expert.
        mask: ``[L, L]`` bool, the mask inside the chunk (True = may attend).
        commit: keep the chunk's keys/values in ``cache`` (False: a noised view nothing later may see).

    Example:
        >>> cache = MoTKVCache(num_layers=1, num_kv_heads=1, head_dim=4)
        >>> chunk = CacheChunk(cache=cache, hidden=torch.zeros(3, 8), position_ids=torch.arange(3),
        ...                    is_gen=torch.zeros(3, dtype=torch.bool), mask=torch.ones(3, 3, dtype=torch.bool).tril(),
        ...                    commit=True)
        >>> len(chunk), chunk.und_indices.tolist(), chunk.gen_indices.tolist()
        (3, [0, 1, 2], [])
    """

    cache: MoTKVCache
    hidden: torch.Tensor
    position_ids: torch.Tensor
    is_gen: torch.Tensor
    mask: torch.Tensor
    commit: bool

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def und_indices(self) -> torch.Tensor:
        """``[N_und]`` positions of the chunk routed to the understanding expert, ascending."""
        return (~self.is_gen).nonzero().flatten()

    @property
    def gen_indices(self) -> torch.Tensor:
        """``[N_gen]`` positions of the chunk routed to the generation expert, ascending."""
        return self.is_gen.nonzero().flatten()
