"""Mixture-of-Transformers backbone: a Qwen2-style decoder with an understanding and a generation expert (SPEC §4).

Every layer holds two copies of its weights — the **understanding** expert (text, markers, ViT tokens) and the
**generation** expert (all VAE latent tokens) — and one joint softmax attention over all tokens. Routing is by
token type, given as two index sets over the packed sequence; there is no learned router.

How routing is done (ARCHITECTURE "performance habits"): the residual stream is gathered **once per forward** into
two contiguous blocks, ``x_und = hidden[und_indices]`` and ``x_gen = hidden[gen_indices]``, and stays split through
every layer; each expert runs its norms, projections and MLP on its own block with no per-projection gathers.
Attention sees the tokens in "expert-major" order ``perm = cat(und_indices, gen_indices)``: RoPE positions and the
dense mask are permuted once per forward (attention is equivariant to a joint permutation of queries, keys and
mask), so a dense-mask layer does no gather at all; the flex path, whose ``BlockMask`` is laid out in sequence
order, gathers q/k/v into sequence order and the output back (two gathers per layer). Several packed documents
given as a :class:`~chatumm_kit.components.masks.DocumentMask` (what ``ChatUMM`` passes with ``"sdpa"``) attend
document by document, gathered the same way, so the masked-out cross-document pairs (SPEC §3 rule 1) cost nothing.
The final norms (``norm`` for und tokens, ``norm_moe_gen`` for gen tokens) are applied per block and the result is
scattered back once. The attention strategies live in ``components/mot_attention.py``.

**One routing loop for every caller.** :meth:`MoTBackbone.forward` (a packed training sequence, or one chunk appended
to a :class:`MoTKVCache`) and :meth:`MoTBackbone.forward_chunks` (several chunks, each appended to its own cache, in
one pass: what batched chat sessions and an Euler step's stacked CFG contexts run) differ only in the attention
strategy they build; both then run the same ``_route`` — gather into the expert blocks, RoPE, the layers, the final
norms, scatter back.

Parameter names mirror the BAGEL layout of SPEC §5 without the ``language_model.model.`` prefix (``lm_head`` without
``language_model.``), so checkpoint conversion is a prefix map.

**A component that stands alone** (ARCHITECTURE "components"): the constructor takes the architecture only — the
fields of :class:`MoTConfig`, defined there once — and saves them as its hyperparameters, so
``type(mot)(**mot.hparams)`` rebuilds an equal module and a checkpoint of the backbone loads on its own. Training
settings live with whoever trains it: :class:`~chatumm_kit.systems.unified.ChatUMMSystem` inside ChatUMM (freezing
the understanding expert calls :meth:`MoTBackbone.freeze_understanding`), or
:class:`~chatumm_kit.systems.text_lm.TextLMSystem` for the backbone alone as a text LM (its loss is
:meth:`MoTBackbone.next_token_loss`; recipe ``shapes/mot_text_lm``).

Example:
    >>> cfg = MoTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    ...                 intermediate_size=64)
    >>> mot = MoTBackbone.from_config(cfg)
    >>> L = 6
    >>> out = mot(torch.randn(L, 32), position_ids=torch.arange(L), und_indices=torch.arange(3),
    ...           gen_indices=torch.arange(3, 6), attn_mask=torch.ones(L, L, dtype=torch.bool).tril())
    >>> out.shape
    torch.Size([6, 32])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint

from chatumm_kit.components.kv_cache import CacheChunk, MoTKVCache
from chatumm_kit.components.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from chatumm_kit.components.masks import DocumentMask
from chatumm_kit.components.mot_attention import (
    CachedAttention,
    DenseAttention,
    DocumentAttention,
    FlexAttention,
    StackedCachedAttention,
    dense_from_block_mask,
)
from chatumm_kit.config.signatures import keyword_signature

__all__ = [
    "GEN_SUFFIX",
    "CacheChunk",
    "MoTAttention",
    "MoTBackbone",
    "MoTConfig",
    "MoTDecoderLayer",
    "MoTKVCache",
    "dense_from_block_mask",
]

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""An attention strategy (``components/mot_attention.py``): ``(layer, q [L,H,hd], k, v [L,Hkv,hd]) -> [L, H*hd]``,
tokens in expert-major order."""

GEN_SUFFIX = "_moe_gen"
"""Suffix of a generation-expert module name; its understanding twin has the same name without it."""


@dataclass(frozen=True)
class MoTConfig:
    """Sizes and switches of :class:`MoTBackbone` — the one definition of its constructor arguments.

    Attributes:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: decoder sizes.
        rope_theta: RoPE base (1e6 for Qwen2.5 / BAGEL).
        rms_eps: RMSNorm epsilon.
        qk_norm: RMS-norm q and k over ``head_dim`` before RoPE. BAGEL turns it on (SPEC §5). A plain Qwen2 /
            Qwen2.5 checkpoint has no q/k-norm weights; because RMSNorm with a unit gain still rescales every head
            vector to unit RMS, converting such a checkpoint reproduces its logits only with ``qk_norm=False``.
        attn_backend: ``"sdpa"`` (dense bool mask or per-document ``DocumentMask``; CPU, tests) or ``"flex"``
            (``BlockMask``; compiled on CUDA, eager on CPU). torch's flex attention has no CPU backward, so on CPU
            with autograd enabled the ``BlockMask`` is expanded to a dense mask (O(L²), once per forward) and SDPA
            runs instead.
        gradient_checkpointing: recompute each layer in backward (training only).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    qk_norm: bool = True
    attn_backend: Literal["sdpa", "flex"] = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"MoTConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attn_backend not in ("sdpa", "flex"):
            raise ValueError(f"MoTConfig.attn_backend must be 'sdpa' or 'flex', got {self.attn_backend!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any]) -> MoTConfig:
        """The config of a saved backbone spec or hyperparameters, written by this version or an older one.

        Older versions also saved training settings with the architecture (``lr``, ``weight_decay``,
        ``freeze_understanding``): they are dropped here (freezing is the training system's ``freeze``).
        """
        return cls(**{k: v for k, v in saved.items() if k not in RETIRED_MOT_ARGUMENTS})


RETIRED_MOT_ARGUMENTS: frozenset[str] = frozenset({"lr", "weight_decay", "freeze_understanding"})
"""Keys that older versions saved among :class:`MoTBackbone`'s hyperparameters and that no longer exist."""


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


def _qk_norm(config: MoTConfig) -> nn.Module:
    return RMSNorm(config.head_dim, eps=config.rms_eps) if config.qk_norm else nn.Identity()


class MoTAttention(nn.Module):
    """Two experts' q/k/v/o projections and q/k norms around one joint attention.

    q/k/v projections have biases, o has none (Qwen2). q/k norms are RMSNorms over ``head_dim`` applied before RoPE
    (``nn.Identity`` when ``qk_norm=False``). The ``*_moe_gen`` modules are the generation expert.
    """

    def __init__(self, *, config: MoTConfig) -> None:
        super().__init__()
        d, h, hkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=True)
        self.k_proj = nn.Linear(d, hkv * hd, bias=True)
        self.v_proj = nn.Linear(d, hkv * hd, bias=True)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.q_norm = _qk_norm(config)
        self.k_norm = _qk_norm(config)
        self.q_proj_moe_gen = nn.Linear(d, h * hd, bias=True)
        self.k_proj_moe_gen = nn.Linear(d, hkv * hd, bias=True)
        self.v_proj_moe_gen = nn.Linear(d, hkv * hd, bias=True)
        self.o_proj_moe_gen = nn.Linear(h * hd, d, bias=False)
        self.q_norm_moe_gen = _qk_norm(config)
        self.k_norm_moe_gen = _qk_norm(config)

    def project_und(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Understanding expert: ``x [n, D] -> q [n,H,hd], k [n,Hkv,hd], v [n,Hkv,hd]`` (normed, before RoPE)."""
        return self._project(x, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm)

    def project_gen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generation expert: same as :meth:`project_und` with the ``*_moe_gen`` weights."""
        return self._project(
            x, self.q_proj_moe_gen, self.k_proj_moe_gen, self.v_proj_moe_gen, self.q_norm_moe_gen, self.k_norm_moe_gen
        )

    def _project(self, x, q_proj, k_proj, v_proj, q_norm, k_norm):
        n = x.shape[0]
        q = q_norm(q_proj(x).view(n, self.num_heads, self.head_dim))
        k = k_norm(k_proj(x).view(n, self.num_kv_heads, self.head_dim))
        v = v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return q, k, v


class MoTDecoderLayer(nn.Module):
    """One pre-norm decoder layer with two experts.

    ``forward(x_und [n_und, D], x_gen [n_gen, D], *, cos, sin, attend) -> (x_und, x_gen)`` where ``cos``/``sin``
    (``[n_und + n_gen, head_dim]``) are the RoPE tables of the expert-major token order and ``attend`` is the
    attention strategy the backbone built for this forward. An empty block costs nothing (its expert is skipped, so
    its weights get no gradient).
    """

    EXPERT_MODULES: tuple[str, ...] = (
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "post_attention_layernorm",
        "mlp",
    )
    """Understanding-expert submodules; each has a twin named ``<name>_moe_gen``."""

    def __init__(self, *, config: MoTConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(d, eps=config.rms_eps)
        self.input_layernorm_moe_gen = RMSNorm(d, eps=config.rms_eps)
        self.self_attn = MoTAttention(config=config)
        self.post_attention_layernorm = RMSNorm(d, eps=config.rms_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps=config.rms_eps)
        self.mlp = SwiGLU(dim=d, hidden_dim=config.intermediate_size)
        self.mlp_moe_gen = SwiGLU(dim=d, hidden_dim=config.intermediate_size)

    def forward(
        self, x_und: torch.Tensor, x_gen: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor, attend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_und, n_gen = x_und.shape[0], x_gen.shape[0]
        attn = self.self_attn
        parts = []
        if n_und:
            parts.append(attn.project_und(self.input_layernorm(x_und)))
        if n_gen:
            parts.append(attn.project_gen(self.input_layernorm_moe_gen(x_gen)))
        q, k, v = (torch.cat(t, dim=0) if len(t) > 1 else t[0] for t in zip(*parts))  # expert-major [L, h, hd]
        q, k = apply_rotary(q, k, cos[:, None], sin[:, None])
        out = attend(self.layer_idx, q, k, v)  # [L, H*hd]
        if n_und:
            x_und = x_und + attn.o_proj(out[:n_und])
            x_und = x_und + self.mlp(self.post_attention_layernorm(x_und))
        if n_gen:
            x_gen = x_gen + attn.o_proj_moe_gen(out[n_und:])
            x_gen = x_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x_gen))
        return x_und, x_gen


class MoTBackbone(L.LightningModule):
    """The MoT language model: shared ``embed_tokens``/``lm_head``/rotary, ``layers``, ``norm`` and ``norm_moe_gen``.

    Used as a plain module inside ``ChatUMM`` (its :meth:`forward` maps embedded packed hidden states to final-normed
    hidden states), and trainable alone as a text LM (:meth:`training_step`).

    Args:
        **config: the fields of :class:`MoTConfig` as keyword arguments (``vocab_size``, ``hidden_size``, ...,
            ``attn_backend``, ``gradient_checkpointing``); the constructor's signature lists them. They are the
            module's hyperparameters: ``MoTBackbone(**mot.hparams)`` rebuilds it.

    :meth:`freeze_understanding` sets ``requires_grad=False`` on every understanding-expert weight (all layer
    modules without ``_moe_gen``, and ``norm``) **and** on ``embed_tokens`` and ``lm_head``: both only ever serve
    understanding-routed tokens (text and markers), so training them would change understanding behaviour too.
    Activations are not detached: gen tokens still attend to und keys/values, and gradients still flow through
    und tokens' activations to whatever upstream is trainable (e.g. gen weights of earlier clean VAE tokens), so
    the generation expert's gradients are exactly those of the unfrozen model.

    Example:
        >>> mot = MoTBackbone(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
        ...                   intermediate_size=64)
        >>> mot.text_logits(torch.randint(0, 64, (2, 5))).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        retired = sorted(RETIRED_MOT_ARGUMENTS & config.keys())
        if retired:  # hyperparameters of a checkpoint written by an older version
            warnings.warn(f"MoTBackbone: ignoring retired training settings {retired}", stacklevel=2)
        cfg = MoTConfig.from_saved(config)  # names and values checked there
        self.save_hyperparameters(asdict(cfg))
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(head_dim=cfg.head_dim, theta=cfg.rope_theta)
        self.layers = nn.ModuleList(MoTDecoderLayer(config=cfg, layer_idx=i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def from_config(cls, config: MoTConfig) -> MoTBackbone:
        """Build from a :class:`MoTConfig`."""
        return cls(**asdict(config))

    @classmethod
    def from_meta(cls, config: MoTConfig) -> MoTBackbone:
        """Build on the meta device: shapes only, nothing allocated (count parameters, or fill with
        ``load_state_dict(..., assign=True)``; otherwise ``to_empty(device=...)`` then :meth:`reset_parameters`)."""
        with torch.device("meta"):
            return cls.from_config(config)

    def reset_parameters(self) -> None:
        """Qwen2-style init (normal std 0.02, zero biases, unit norms), then gen expert := copy of und (SPEC §4)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.init_generation_from_understanding()

    def expert_module_names(self) -> list[tuple[str, str]]:
        """``(und_name, gen_name)`` for every expert-specific module with weights, e.g.
        ``("layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj_moe_gen")`` and ``("norm", "norm_moe_gen")``."""
        names = [("norm", "norm" + GEN_SUFFIX)]
        for i in range(len(self.layers)):
            for name in MoTDecoderLayer.EXPERT_MODULES:
                if name.endswith(("q_norm", "k_norm")) and not self.config.qk_norm:
                    continue
                names.append((f"layers.{i}.{name}", f"layers.{i}.{name}{GEN_SUFFIX}"))
        return names

    def understanding_modules(self, *, include_shared: bool = False) -> Iterator[nn.Module]:
        """Modules of the understanding expert (plus ``embed_tokens`` and ``lm_head`` if ``include_shared``)."""
        for und_name, _ in self.expert_module_names():
            yield self.get_submodule(und_name)
        if include_shared:
            yield self.embed_tokens
            yield self.lm_head

    def freeze_understanding(self, *, embeddings: bool = True) -> None:
        """No gradient into the understanding expert, nor (``embeddings``) into ``embed_tokens``/``lm_head`` (see the
        class docstring)."""
        for module in self.understanding_modules(include_shared=embeddings):
            module.requires_grad_(False)

    def generation_modules(self) -> Iterator[nn.Module]:
        """Modules of the generation expert (``*_moe_gen``)."""
        for _, gen_name in self.expert_module_names():
            yield self.get_submodule(gen_name)

    @torch.no_grad()
    def init_generation_from_understanding(self) -> None:
        """Copy every understanding-expert weight into its ``_moe_gen`` twin."""
        for und_name, gen_name in self.expert_module_names():
            und, gen = self.get_submodule(und_name), self.get_submodule(gen_name)
            for (pname, p_und), (_, p_gen) in zip(und.named_parameters(), gen.named_parameters(), strict=True):
                if p_und.shape != p_gen.shape:
                    raise RuntimeError(f"{und_name}.{pname} {tuple(p_und.shape)} vs {gen_name} {tuple(p_gen.shape)}")
                p_gen.copy_(p_und)

    def new_kv_cache(self, *, capacity: int = 0) -> MoTKVCache:
        """An empty :class:`MoTKVCache` matching this model's layers, heads, dtype and device."""
        p = self.lm_head.weight
        c = self.config
        return MoTKVCache(
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=p.dtype,
            device=p.device,
            capacity=capacity,
        )

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        und_indices: torch.Tensor,
        gen_indices: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | DocumentMask,
        kv_cache: MoTKVCache | None = None,
        commit: bool | None = None,
    ) -> torch.Tensor:
        """Run the decoder over one packed sequence (or one appended chunk when ``kv_cache`` is given).

        Args:
            hidden: ``[L, D]`` embedded tokens (text embeddings, ViT features, VAE latent embeddings).
            position_ids: ``[L]`` 1-D RoPE positions (SPEC §3).
            und_indices: ``[N_und]`` positions routed to the understanding expert.
            gen_indices: ``[N_gen]`` positions routed to the generation expert; with ``und_indices`` a partition
                of ``[0, L)``.
            attn_mask: a flex ``BlockMask`` (``attn_backend="flex"``); with ``"sdpa"`` a dense bool ``[L, L]``
                (True = may attend) or a ``DocumentMask`` (the per-document diagonal blocks; with two or more
                documents attention runs document by document). With a cache always a dense bool mask, the one
                *inside* the chunk: queries also see every cached token.
            kv_cache: cache of the stream so far; the chunk is appended to it.
            commit: with a cache, required: keep the chunk's keys/values (True) or leave the cache as it was
                (False, e.g. a noised image chunk that nothing later may see).

        Returns:
            ``[L, D]`` final-normed hidden states: und tokens through ``norm``, gen tokens through ``norm_moe_gen``.
        """
        seq_len = hidden.shape[0]
        if seq_len == 0:
            raise ValueError("MoTBackbone.forward: empty sequence (L = 0)")
        if hidden.dim() != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(
                f"MoTBackbone.forward: hidden must be [L, {self.config.hidden_size}], got {tuple(hidden.shape)}"
            )
        if position_ids.shape != (seq_len,):
            raise ValueError(f"MoTBackbone.forward: position_ids must be [{seq_len}], got {tuple(position_ids.shape)}")
        n_und, n_gen = und_indices.numel(), gen_indices.numel()
        if n_und + n_gen != seq_len:
            raise ValueError(f"MoTBackbone.forward: und_indices ({n_und}) + gen_indices ({n_gen}) != L ({seq_len})")

        perm = torch.cat([und_indices, gen_indices]).to(device=hidden.device, dtype=torch.long)
        inv = _inverse(perm)
        attend = self._attention(attn_mask, perm=perm, inv=inv, kv_cache=kv_cache, commit=commit, seq_len=seq_len)
        out = self._route(hidden, position_ids.to(hidden.device), perm=perm, inv=inv, n_und=n_und, attend=attend)
        if kv_cache is not None and commit:
            kv_cache.advance(seq_len)
        return out

    def forward_chunks(self, chunks: Sequence[CacheChunk]) -> list[torch.Tensor]:
        """Append ``chunks`` (each to its own cache) in **one** pass through the layers; returns each chunk's
        ``[L_i, D]`` final-normed output, in order.

        The chunks' tokens are stacked into one sequence and routed to the experts together (every norm, projection
        and MLP runs once for all of them); only attention is split (:class:`~.mot_attention.StackedCachedAttention`):
        each chunk's queries see its own cache plus its own new keys under its own ``[L_i, L_i]`` mask. Equal to
        :meth:`forward` on each chunk alone up to float rounding (matrix products over more rows may sum in another
        order: about 1e-7 relative in float32). Inference only (under ``torch.no_grad()``); a chunk with
        ``commit=True`` advances its cache by ``L_i``.

        Raises:
            ValueError: no chunks, an empty chunk, mismatched shapes, or one cache given twice.

        Example:
            >>> chunk = CacheChunk(cache=mot.new_kv_cache(), hidden=torch.randn(3, 32),          # doctest: +SKIP
            ...                    position_ids=torch.arange(3), is_gen=torch.zeros(3, dtype=torch.bool),
            ...                    mask=torch.ones(3, 3, dtype=torch.bool).tril(), commit=True)
            >>> [out] = mot.forward_chunks([chunk]); out.shape                                    # doctest: +SKIP
            torch.Size([3, 32])
        """
        if not chunks:
            raise ValueError("MoTBackbone.forward_chunks: no chunks")
        if torch.is_grad_enabled():
            raise RuntimeError("MoTBackbone.forward_chunks is inference-only: run it under torch.no_grad()")
        if len({id(c.cache) for c in chunks}) != len(chunks):
            raise ValueError(
                "MoTBackbone.forward_chunks: a cache appears in two chunks (each chunk needs its own cache)"
            )
        width = self.config.hidden_size
        for i, c in enumerate(chunks):
            n = len(c)
            if n == 0 or c.hidden.shape != (n, width):
                raise ValueError(
                    f"MoTBackbone.forward_chunks: chunk {i} hidden must be [L>0, {width}], got {tuple(c.hidden.shape)}"
                )
            if c.position_ids.shape != (n,) or c.is_gen.shape != (n,) or c.mask.shape != (n, n):
                raise ValueError(
                    f"MoTBackbone.forward_chunks: chunk {i} of {n} tokens has position_ids "
                    f"{tuple(c.position_ids.shape)}, is_gen {tuple(c.is_gen.shape)}, mask {tuple(c.mask.shape)}"
                )
        device = self.lm_head.weight.device
        hidden = torch.cat([c.hidden for c in chunks]).to(device)
        is_gen = torch.cat([c.is_gen for c in chunks]).to(device)
        positions = torch.cat([c.position_ids for c in chunks]).to(device)
        perm = torch.cat([(~is_gen).nonzero().flatten(), is_gen.nonzero().flatten()])
        inv = _inverse(perm)
        attend = StackedCachedAttention(chunks, perm, inv)
        out = self._route(hidden, positions, perm=perm, inv=inv, n_und=int((~is_gen).sum()), attend=attend)
        for chunk in chunks:
            if chunk.commit:
                chunk.cache.advance(len(chunk))
        return list(out.split(attend.lengths))

    def _route(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        perm: torch.Tensor,
        inv: torch.Tensor,
        n_und: int,
        attend: Attend,
    ) -> torch.Tensor:
        """The routing loop: ``hidden [L, D]`` (sequence order) -> final-normed ``[L, D]`` (sequence order).

        ``perm`` (expert-major position -> sequence position; its first ``n_und`` entries the und tokens) and its
        inverse ``inv`` are computed once per forward: the stream is gathered once into the und and gen blocks, the
        RoPE tables are built in that order, every layer runs both experts on their blocks with ``attend``, the
        final norms run per block and the result is scattered back once.
        """
        cos, sin = self.rotary(position_ids.index_select(0, perm))
        x_und, x_gen = hidden.index_select(0, perm[:n_und]), hidden.index_select(0, perm[n_und:])
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                x_und, x_gen = checkpoint(layer, x_und, x_gen, cos=cos, sin=sin, attend=attend, use_reentrant=False)
            else:
                x_und, x_gen = layer(x_und, x_gen, cos=cos, sin=sin, attend=attend)
        # skip an empty block so an unused expert's final norm gets no (zero) gradient either
        normed = ([self.norm(x_und)] if n_und else []) + ([self.norm_moe_gen(x_gen)] if x_gen.shape[0] else [])
        return (torch.cat(normed) if len(normed) > 1 else normed[0]).index_select(0, inv)

    def _attention(self, attn_mask, *, perm, inv, kv_cache, commit, seq_len) -> Attend:
        """Pick and prepare the attention strategy for this forward; validates mask type against the backend."""
        if kv_cache is not None:
            if commit is None:
                raise ValueError("MoTBackbone.forward: pass commit=True/False together with kv_cache")
            if torch.is_grad_enabled():
                raise RuntimeError("MoTBackbone.forward with kv_cache is inference-only: run it under torch.no_grad()")
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.shape != (seq_len, seq_len):
                raise ValueError(
                    f"MoTBackbone.forward with kv_cache needs the chunk's dense bool mask [{seq_len}, {seq_len}], "
                    f"got {type(attn_mask).__name__} {tuple(getattr(attn_mask, 'shape', ()))}"
                )
            self._check_bool(attn_mask)
            kv_cache.reserve(kv_cache.num_tokens + seq_len)
            return CachedAttention(kv_cache, attn_mask.to(perm.device), perm, inv)
        if commit is not None:
            raise ValueError("MoTBackbone.forward: commit only applies together with kv_cache")
        backend = self.config.attn_backend
        if isinstance(attn_mask, BlockMask):
            if backend != "flex":
                raise ValueError(
                    f"MoTBackbone(attn_backend={backend!r}) got a BlockMask; pass a dense bool [L, L] mask"
                )
            if tuple(attn_mask.shape[-2:]) != (seq_len, seq_len):
                raise ValueError(
                    f"MoTBackbone.forward: BlockMask covers {tuple(attn_mask.shape[-2:])}, sequence is {seq_len}"
                )
            if perm.device.type == "cpu" and torch.is_grad_enabled():  # no flex backward on CPU (see MoTConfig)
                attn_mask = dense_from_block_mask(attn_mask)
                return DenseAttention(attn_mask.index_select(0, perm).index_select(1, perm))
            return FlexAttention(attn_mask, perm, inv)
        if backend != "sdpa":
            raise ValueError(f"MoTBackbone(attn_backend={backend!r}) needs a BlockMask, got {type(attn_mask).__name__}")
        if isinstance(attn_mask, DocumentMask):
            if attn_mask.seq_len != seq_len:
                raise ValueError(
                    f"MoTBackbone.forward: DocumentMask covers {attn_mask.seq_len} tokens, sequence is {seq_len}"
                )
            attn_mask = attn_mask.to(perm.device)
            if len(attn_mask.lengths) > 1:
                return DocumentAttention(attn_mask, perm, inv)
            attn_mask = attn_mask.blocks[0]  # one document: its block is the whole mask
        if attn_mask.shape != (seq_len, seq_len):
            raise ValueError(
                f"MoTBackbone.forward: attn_mask must be [{seq_len}, {seq_len}], got {tuple(attn_mask.shape)}"
            )
        self._check_bool(attn_mask)
        return DenseAttention(attn_mask.to(perm.device).index_select(0, perm).index_select(1, perm))

    @staticmethod
    def _check_bool(mask: torch.Tensor) -> None:
        if mask.dtype != torch.bool:
            raise ValueError(f"MoTBackbone.forward: dense attn_mask must be bool (True = may attend), got {mask.dtype}")

    # ---------------------------------------------------------------- the backbone alone, as a text LM

    def causal_mask(self, doc_ids: torch.Tensor) -> DocumentMask | BlockMask:
        """Block-diagonal causal mask for packed text documents, in this model's backend's mask type.

        ``doc_ids``: ``[L]`` document id of each token (non-decreasing). With ``"sdpa"`` a ``DocumentMask`` of one
        lower-triangular block per document (never ``[L, L]``).
        """
        if self.config.attn_backend == "sdpa":
            lengths = torch.unique_consecutive(doc_ids, return_counts=True)[1].tolist()
            blocks = tuple(torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril() for n in lengths)
            return DocumentMask(lengths=tuple(lengths), blocks=blocks)

        def mask_mod(b, h, q, k):
            return (doc_ids[q] == doc_ids[k]) & (k <= q)

        n = doc_ids.numel()
        return create_block_mask(mask_mod, None, None, n, n, device=doc_ids.device)

    def text_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``[B, T]`` (or ``[T]``) token ids, each row one causal document (all und tokens).

        Returns ``[B, T, vocab]`` (``[T, vocab]`` for 1-D input).
        """
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        b, t = ids.shape
        device = ids.device
        doc_ids = torch.arange(b, device=device).repeat_interleave(t)
        hidden = self.embed_tokens(ids.reshape(-1))
        out = self(
            hidden,
            position_ids=torch.arange(t, device=device).repeat(b),
            und_indices=torch.arange(b * t, device=device),
            gen_indices=torch.empty(0, dtype=torch.long, device=device),
            attn_mask=self.causal_mask(doc_ids),
        )
        logits = self.lm_head(out).view(b, t, -1)
        return logits if input_ids.dim() == 2 else logits[0]

    def next_token_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``[B, T]`` token ids, each row one causal document (the text-LM
        objective that :class:`~chatumm_kit.systems.text_lm.TextLMSystem` trains; scalar)."""
        logits = self.text_logits(input_ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``: sequence position -> expert-major position."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# `MoTBackbone(**config)` shows the keyword signature of MoTConfig, so `chatumm validate`, help() and IDEs see the
# arguments by name while they are written down once (in MoTConfig).
MoTBackbone.__signature__ = keyword_signature(MoTConfig)
