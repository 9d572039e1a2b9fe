"""Shared layers: each checked against an independent formulation of its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chatumm_kit.components.layers import (
    MLPConnector,
    PositionTable2D,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TimestepEmbedder,
    apply_rotary,
    sincos_2d_table,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_rmsnorm_matches_formula_and_torch():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16) * 4
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5), rtol=1e-5, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 gain promotes, like Qwen2's RMSNorm
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def _rope_complex(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent RoPE: channel pair (i, i + d/2) as a complex number multiplied by exp(j·pos·ω_i)."""
    d = x.shape[-1]
    omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(omega), pos.double()[:, None] * omega)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_rotary_matches_complex_rotation():
    rope = RotaryEmbedding(head_dim=16, theta=10_000.0)
    pos = torch.tensor([0, 1, 5, 5, 37, 1000])  # repeated and arbitrary positions, as in a packed stream
    cos, sin = rope(pos)
    assert cos.shape == (6, 16)
    q, k = torch.randn(3, 6, 16), torch.randn(1, 6, 16)
    q_rot, k_rot = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot, _rope_complex(q, pos, 10_000.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_rot, _rope_complex(k, pos, 10_000.0), rtol=1e-4, atol=1e-4)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=8)
    assert rope.theta == 1e6
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([pq]))
        ck, sk = rope(torch.tensor([pk]))
        return float((apply_rotary(q, q, cq, sq)[0] * apply_rotary(k, k, ck, sk)[0]).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_swiglu_formula_and_no_bias():
    mlp = SwiGLU(dim=8, hidden_dim=24)
    assert sorted(n for n, _ in mlp.named_parameters()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x = torch.randn(4, 8)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = ((x @ g.T) * torch.sigmoid(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(mlp(x), expected)


def test_timestep_embedder_sinusoid_not_scaled_and_keys():
    emb = TimestepEmbedder(hidden=12, freq_dim=8)
    assert sorted(emb.state_dict()) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    s = emb.sinusoid(torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(s[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    omega = torch.tensor([10_000 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(s[1], torch.cat([omega.cos(), omega.sin()]))  # t = 1 used as is, not 1000
    torch.testing.assert_close(s[2], torch.cat([(0.25 * omega).cos(), (0.25 * omega).sin()]))
    out = emb(torch.tensor([0.3]))
    torch.testing.assert_close(out, emb.mlp[2](F.silu(emb.mlp[0](emb.sinusoid(torch.tensor([0.3]))))))


def test_sincos_2d_table_layout():
    dim, side = 16, 5
    table = sincos_2d_table(dim=dim, max_side=side)
    assert table.shape == (side * side, dim)
    q = dim // 4
    omega = [10_000 ** (-j / q) for j in range(q)]
    for r, c in [(0, 0), (2, 3), (4, 1)]:
        row = table[r * side + c]
        expected = (
            [math.sin(c * w) for w in omega]
            + [math.cos(c * w) for w in omega]
            + [math.sin(r * w) for w in omega]
            + [math.cos(r * w) for w in omega]
        )
        torch.testing.assert_close(row, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    grid = table.view(side, side, dim)
    assert torch.equal(grid[0, :, : dim // 2], grid[3, :, : dim // 2])  # column half ignores the row
    assert torch.equal(grid[:, 0, dim // 2 :], grid[:, 4, dim // 2 :])  # row half ignores the column
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_table(dim=10, max_side=2)


def test_position_table_buffer_lookup_and_meta():
    pe = PositionTable2D(dim=8, max_side=4)
    assert list(pe.state_dict()) == ["pos_embed"]
    idx = pe.index(torch.tensor([1, 3]), torch.tensor([2, 0]))
    assert idx.tolist() == [6, 12]
    torch.testing.assert_close(pe(idx), sincos_2d_table(dim=8, max_side=4)[[6, 12]])
    with pytest.raises(ValueError, match="max_side=4"):
        pe.index(torch.tensor([4]), torch.tensor([0]))
    with torch.device("meta"):
        meta = PositionTable2D(dim=8, max_side=4)
    assert meta.pos_embed.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.pos_embed, pe.pos_embed)


def test_mlp_connector_gelu_tanh():
    conn = MLPConnector(in_dim=6, out_dim=4)
    assert sorted(conn.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert conn.fc1.weight.shape == (4, 6) and conn.fc2.weight.shape == (4, 4)
    x = torch.randn(3, 6)
    h = conn.fc1(x)
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(conn(x), conn.fc2(gelu_tanh))
    assert not torch.allclose(conn(x), conn.fc2(F.gelu(h)), atol=1e-7)  # exact gelu differs: the tanh form is used
