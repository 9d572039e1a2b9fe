"""MoT backbone: routing against a naive reference, backends, KV cache, gradients, freezing, meta build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from chatumm_kit.components.kv_cache import MoTKVCache
from chatumm_kit.components.mot import MoTBackbone, MoTConfig, dense_from_block_mask
from chatumm_kit.training.optim import OptimizerSpec

CAUSAL, FULL, NOISE = "causal", "full", "noise"
TINY = MoTConfig(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48
)


def tiny(**overrides) -> MoTBackbone:
    """Tiny backbone with both experts (and every norm) perturbed, so each weight is distinguishable."""
    torch.manual_seed(0)
    model = MoTBackbone.from_config(MoTConfig(**{**TINY.__dict__, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def gca_mask(splits: list[tuple[int, str, int]]) -> torch.Tensor:
    """SPEC §3 rules applied literally; ``splits`` = (length, mode, doc) in order."""
    owner = [i for i, (n, _, _) in enumerate(splits) for _ in range(n)]
    seq = len(owner)
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq):
            sq, sk = owner[q], owner[k]
            same_doc = splits[sq][2] == splits[sk][2]
            bidir_same = sq == sk and splits[sq][1] in (FULL, NOISE)
            noise_hidden = splits[sk][1] == NOISE and sq != sk
            mask[q, k] = same_doc and (k <= q or bidir_same) and not noise_hidden
    return mask


def block_mask_from_dense(dense: torch.Tensor):
    n = dense.shape[0]
    return create_block_mask(lambda b, h, q, k: dense[q, k], None, None, n, n, device="cpu", BLOCK_SIZE=16)


# A dialogue-like stream: text, ViT image, noised VAE image, its clean copy, text.
# VAE chunks are framed by v_s / v_e markers (und) around latent tokens (gen).
STREAM = [(5, CAUSAL, 0), (6, FULL, 0), (6, NOISE, 0), (6, FULL, 0), (4, CAUSAL, 0)]
GEN = [12, 13, 14, 15, 18, 19, 20, 21]  # latents of the noised and the clean VAE view
POSITIONS = [0, 1, 2, 3, 4] + [5] * 6 + [6] * 6 + [6] * 6 + [7, 8, 9, 10]


def routing(seq_len: int, gen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    is_gen = torch.zeros(seq_len, dtype=torch.bool)
    is_gen[gen] = True
    return (~is_gen).nonzero().flatten(), is_gen.nonzero().flatten()


def run(model, hidden, mask, gen, positions=None):
    und_idx, gen_idx = routing(hidden.shape[0], gen)
    pos = torch.tensor(positions) if positions is not None else torch.arange(hidden.shape[0])
    return model(hidden, position_ids=pos, und_indices=und_idx, gen_indices=gen_idx, attn_mask=mask)


def naive_reference(model: MoTBackbone, hidden, mask, gen, positions) -> torch.Tensor:
    """Both experts on every token, picked per token with torch.where; explicit softmax attention, sequence order."""
    cfg = model.config
    n, half, group = hidden.shape[0], cfg.head_dim // 2, cfg.num_heads // cfg.num_kv_heads
    is_gen = torch.zeros(n, 1, dtype=torch.bool)
    is_gen[gen] = True
    cos, sin = model.rotary(torch.tensor(positions))

    def pick(und: torch.Tensor, gen_: torch.Tensor) -> torch.Tensor:
        return torch.where(is_gen, gen_, und)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, -1, cfg.head_dim)

    def rope(t: torch.Tensor) -> torch.Tensor:
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

    x = hidden
    for layer in model.layers:
        a = layer.self_attn
        h = pick(layer.input_layernorm(x), layer.input_layernorm_moe_gen(x))
        q = pick(a.q_norm(heads(a.q_proj(h))).flatten(1), a.q_norm_moe_gen(heads(a.q_proj_moe_gen(h))).flatten(1))
        k = pick(a.k_norm(heads(a.k_proj(h))).flatten(1), a.k_norm_moe_gen(heads(a.k_proj_moe_gen(h))).flatten(1))
        v = heads(pick(a.v_proj(h), a.v_proj_moe_gen(h))).repeat_interleave(group, dim=1)
        q, k = rope(heads(q)), rope(heads(k)).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / cfg.head_dim**0.5
        attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v).flatten(1)
        x = x + pick(a.o_proj(attn), a.o_proj_moe_gen(attn))
        x = x + pick(
            layer.mlp(layer.post_attention_layernorm(x)), layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(x))
        )
    return pick(model.norm(x), model.norm_moe_gen(x))


def test_routing_matches_naive_per_token_reference():
    model = tiny()
    mask = gca_mask(STREAM)
    hidden = torch.randn(mask.shape[0], 32)
    with torch.no_grad():
        out = run(model, hidden, mask, GEN, POSITIONS)
        ref = naive_reference(model, hidden, mask, GEN, POSITIONS)
        swapped = run(model, hidden, mask, [i for i in range(27) if i not in GEN], POSITIONS)
    assert (out - ref).abs().max() <= 1e-5
    assert (swapped - ref).abs().max() > 1e-2  # routing matters: the experts really differ


def test_generation_init_copies_understanding():
    model = tiny()
    model.init_generation_from_understanding()
    pairs = model.expert_module_names()
    assert ("layers.1.self_attn.k_norm", "layers.1.self_attn.k_norm_moe_gen") in pairs and (
        "norm",
        "norm_moe_gen",
    ) in pairs
    for und_name, gen_name in pairs:
        und, gen = model.get_submodule(und_name).state_dict(), model.get_submodule(gen_name).state_dict()
        assert und.keys() == gen.keys() and all(torch.equal(und[k], gen[k]) for k in und)
    mask = gca_mask(STREAM)
    hidden = torch.randn(27, 32)
    with torch.no_grad():
        torch.testing.assert_close(run(model, hidden, mask, GEN, POSITIONS), run(model, hidden, mask, [], POSITIONS))


def test_sdpa_and_flex_backends_agree_forward_and_backward():
    sdpa = tiny()
    flex = tiny(attn_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    stream = STREAM + [(7, CAUSAL, 1), (5, FULL, 1)]  # a second packed document
    gen = GEN + [29, 30, 31]
    dense = gca_mask(stream)
    block = block_mask_from_dense(dense)
    hidden = torch.randn(dense.shape[0], 32)
    with torch.no_grad():  # real (eager) flex_attention kernel path
        assert (run(sdpa, hidden, dense, gen) - run(flex, hidden, block, gen)).abs().max() <= 1e-5
    # CPU flex has no backward: with autograd on, the BlockMask is expanded to a dense mask for SDPA
    assert torch.equal(dense_from_block_mask(block), dense)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_s, out_f = run(sdpa, h1, dense, gen), run(flex, h2, block, gen)
    assert (out_s - out_f).abs().max() <= 1e-5
    w = torch.randn_like(out_s)
    (out_s * w).sum().backward()
    (out_f * w).sum().backward()
    assert (h1.grad - h2.grad).abs().max() <= 1e-5
    for (name, p_s), p_f in zip(sdpa.named_parameters(), flex.parameters()):
        if p_s.grad is not None:
            assert (p_s.grad - p_f.grad).abs().max() <= 1e-5, name


def test_flex_with_mask_builder_block_mask():
    masks = pytest.importorskip("chatumm_kit.components.masks")
    from chatumm_kit.components.splits import AttnMode, Modality, SplitTable

    table = SplitTable.from_rows(
        [
            (0, 5, AttnMode.CAUSAL, 0, Modality.TEXT),
            (5, 6, AttnMode.FULL, 0, Modality.VIT),
            (11, 6, AttnMode.NOISE, 0, Modality.VAE_NOISED),
            (17, 6, AttnMode.FULL, 0, Modality.VAE_CLEAN),
            (23, 4, AttnMode.CAUSAL, 0, Modality.TEXT),
        ]
    )
    builder = masks.MaskBuilder(block_size=16)
    sdpa, flex = tiny(), tiny(attn_backend="flex")
    hidden = torch.randn(27, 32)
    with torch.no_grad():
        ref = run(sdpa, hidden, gca_mask(STREAM), GEN, POSITIONS)
        out = run(flex, hidden, builder.block_mask(table), GEN, POSITIONS)
    assert (out - ref).abs().max() <= 1e-5


def test_kv_cache_incremental_equals_full_forward():
    model = tiny()
    mask = gca_mask(STREAM)
    hidden = torch.randn(27, 32)
    und_all, gen_all = routing(27, GEN)
    with torch.no_grad():
        full = run(model, hidden, mask, GEN, POSITIONS)
        cache = model.new_kv_cache()
        # text, ViT (FULL), noised VAE (commit=False), clean VAE (FULL, mixed und/gen), then text token by token
        chunks = [(0, 5), (5, 11), (11, 17), (17, 23)] + [(i, i + 1) for i in range(23, 27)]
        for start, end in chunks:
            noised = start == 11
            before = cache.clone()
            sel = torch.arange(start, end)
            is_gen = torch.isin(sel, gen_all)
            out = model(
                hidden[start:end],
                position_ids=torch.tensor(POSITIONS[start:end]),
                und_indices=(~is_gen).nonzero().flatten(),
                gen_indices=is_gen.nonzero().flatten(),
                attn_mask=mask[start:end, start:end],
                kv_cache=cache,
                commit=not noised,
            )
            assert (out - full[start:end]).abs().max() <= 1e-5, (start, end)
            if noised:
                assert cache.num_tokens == before.num_tokens == 11
                for i in range(model.config.num_layers):
                    assert torch.equal(cache.keys(i), before.keys(i)) and torch.equal(cache.values(i), before.values(i))
    assert cache.num_tokens == 21 and cache.keys(0).shape == (2, 21, 8)
    assert und_all.numel() + gen_all.numel() == 27


def test_kv_cache_clone_truncate_and_errors():
    model = tiny()
    cache = model.new_kv_cache()
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    x = torch.randn(4, 32)
    kw = dict(position_ids=torch.arange(4), und_indices=torch.arange(4), gen_indices=torch.arange(0), attn_mask=mask)
    with torch.no_grad():
        model(x, kv_cache=cache, commit=True, **kw)
        snapshot = cache.clone()
        kw["position_ids"] = torch.arange(4, 8)
        model(x, kv_cache=cache, commit=True, **kw)
        assert cache.num_tokens == 8 and snapshot.num_tokens == 4
        assert torch.equal(cache.keys(1)[:, :4], snapshot.keys(1))
        cache.truncate(4)
        assert torch.equal(cache.keys(1), snapshot.keys(1))
        cache.keys(0).zero_()  # the clone is independent storage
        assert snapshot.keys(0).abs().sum() > 0
        with pytest.raises(ValueError, match="commit"):
            model(x, kv_cache=cache, **kw)
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(5)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(x, kv_cache=cache, commit=True, **kw)
    assert isinstance(cache, MoTKVCache)


def test_input_validation_errors_name_the_problem():
    model = tiny()
    x, pos = torch.randn(6, 32), torch.arange(6)
    mask = torch.ones(6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"und_indices \(3\) \+ gen_indices \(2\) != L \(6\)"):
        model(x, position_ids=pos, und_indices=torch.arange(3), gen_indices=torch.arange(3, 5), attn_mask=mask)
    with pytest.raises(ValueError, match="must be bool"):
        model(x, position_ids=pos, und_indices=torch.arange(6), gen_indices=torch.arange(0), attn_mask=mask.float())
    with pytest.raises(ValueError, match="got a BlockMask"):
        run(model, x, block_mask_from_dense(mask), [])
    with pytest.raises(ValueError, match="needs a BlockMask"):
        run(tiny(attn_backend="flex"), x, mask, [])


def _grads(model: MoTBackbone, modules) -> list[torch.Tensor | None]:
    return [p.grad for m in modules for p in m.parameters()]


@pytest.mark.parametrize("only", ["gen", "und"])
def test_single_expert_sequence_touches_only_its_expert(only):
    model = tiny()
    n = 10
    gen = list(range(n)) if only == "gen" else []
    run(model, torch.randn(n, 32), torch.ones(n, n, dtype=torch.bool).tril(), gen).pow(2).sum().backward()
    used, unused = model.generation_modules(), model.understanding_modules()
    if only == "und":
        used, unused = unused, used
    assert all(g is None for g in _grads(model, unused))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, used))


def test_freeze_understanding_blocks_und_grads_but_gen_attends_to_und():
    free = tiny()
    frozen = tiny()
    frozen.freeze_understanding()
    frozen.load_state_dict(free.state_dict())
    stream = [(8, CAUSAL, 0), (8, FULL, 0)]  # text prompt, then a clean VAE block that attends to it
    mask, gen = gca_mask(stream), list(range(9, 15))
    hidden = torch.randn(16, 32)
    for model in (free, frozen):
        h = hidden.clone().requires_grad_()
        run(model, h, mask, gen)[gen].pow(2).sum().backward()
        model.h_grad = h.grad
    und_params = [p for m in frozen.understanding_modules(include_shared=True) for p in m.parameters()]
    assert und_params and all(not p.requires_grad and p.grad is None for p in und_params)
    trainable = {id(p) for g in OptimizerSpec(lr=1e-3).build(frozen).param_groups for p in g["params"]}
    assert trainable == {id(p) for m in frozen.generation_modules() for p in m.parameters()}
    # gen grads are exactly those of the unfrozen model: gen tokens still see und keys/values
    for g_frozen, g_free in zip(_grads(frozen, frozen.generation_modules()), _grads(free, free.generation_modules())):
        assert g_frozen is not None and g_frozen.abs().sum() > 0
        torch.testing.assert_close(g_frozen, g_free)
    assert frozen.h_grad[:8].abs().sum() > 0  # the loss on gen tokens reaches the und tokens' inputs
    # unfrozen, the same loss does train the und expert (layer 0 shapes the und keys/values layer 1's gen tokens read)
    und_layer0 = [
        m for name, m in free.named_modules() if name.startswith("layers.0.") and m in set(free.understanding_modules())
    ]
    assert len(und_layer0) == 9 and all(g is not None and g.abs().sum() > 0 for g in _grads(free, und_layer0))


def test_gradient_checkpointing_gives_identical_grads():
    plain = tiny()
    ckpt = tiny(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    mask = gca_mask(STREAM)
    hidden = torch.randn(27, 32)
    for model in (plain, ckpt):
        model.train()
        run(model, hidden, mask, GEN, POSITIONS).sin().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


def test_text_lm_loss_and_optimizer():
    model = tiny()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model.text_logits(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    first = model.next_token_loss(ids)
    torch.testing.assert_close(first, expected)
    # each row is its own causal document: row 1 does not depend on row 0
    ids2 = ids.clone()
    ids2[0] = (ids2[0] + 1) % 50
    torch.testing.assert_close(model.text_logits(ids2)[1], logits[1])
    torch.testing.assert_close(model.text_logits(ids[:, :6]), logits[:, :6], rtol=1e-5, atol=1e-5)  # causal
    opt = OptimizerSpec(lr=1e-2).build(model)
    for _ in range(12):
        opt.zero_grad()
        loss = model.next_token_loss(ids)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()


def test_from_meta_7b_shape_counts_without_allocating():
    cfg = MoTConfig(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
    )
    model = MoTBackbone.from_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    gen = sum(p.numel() for m in model.generation_modules() for p in m.parameters())
    assert total == 14_141_252_608  # BAGEL-7B-MoT language model: ~14.1B with both experts
    assert total - gen == 7_615_623_680  # = Qwen2.5-7B (7,615,616,512) + 28 layers × 256 q/k-norm gains
    assert model.hparams.hidden_size == 3584


def test_hyperparameters_are_the_architecture_and_rebuild_an_equal_backbone():
    model = tiny(qk_norm=False, rope_theta=1e4)
    assert dict(model.hparams) == {**TINY.__dict__, "qk_norm": False, "rope_theta": 1e4}
    rebuilt = type(model)(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rebuilt.text_logits(ids), model.text_logits(ids), rtol=0, atol=0)
    with pytest.raises(TypeError, match="lrr"):
        MoTBackbone(**TINY.__dict__, lrr=1e-3)


def test_a_checkpoint_with_the_retired_training_settings_still_loads(tmp_path):
    """Backbones saved before lr / weight_decay / freeze_understanding left the constructor."""
    model = tiny()
    old_hparams = {**model.hparams, "lr": 1e-4, "weight_decay": 0.0, "freeze_understanding": False}
    path = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": old_hparams, "pytorch-lightning_version": "2.6.6"}, path
    )
    with pytest.warns(UserWarning, match="retired"):
        loaded = MoTBackbone.load_from_checkpoint(path, weights_only=True)
    assert dict(loaded.hparams) == dict(model.hparams)
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.text_logits(ids), model.text_logits(ids), rtol=0, atol=0)
