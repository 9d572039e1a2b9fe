"""2-process DDP training of the real `ChatUMMSystem` equals one process training on both ranks' data (SPEC §4).

`chatumm_kit.training.losses.objective` divides CE and MSE by the token counts summed over ranks and scales each
rank's loss by the world size, so after DDP averages gradients every token weighs the same. The single-process
equivalent is therefore one packed sequence holding BOTH ranks' dialogues (documents cannot see each other under
the attention mask, and RoPE positions restart per document) with the same flow-matching noise — each rank's draw
from ``ChatUMMSystem._step_generator`` (seeded by seed, step and rank), concatenated in document order.

The ranks get different numbers of dialogues (1 vs 3) with different CE/MSE token ratios, so normalising by each
rank's own mean (the usual mistake) gives a measurably different gradient; the tests compute that wrong gradient
too and check it is far outside the tolerance the right one meets.

The comparison is on the gradients DDP hands the optimizer (captured in ``on_before_optimizer_step``) and on the
weights after one step. The optimizer spec offers only Adam(W), whose first step is ``lr · g / (|g| + eps)``: with
the usual tiny ``eps`` that is nearly a sign, which hides a wrong loss scale and turns rounding noise in near-zero
gradients into full-size steps. With ``eps = 1`` (larger than every gradient entry) the step is a smooth, nearly
linear function of ``g``, so weights after the step expose the loss scale as SGD would.

``llm2vae`` is zero-initialised (a fresh head predicts zero velocity), which would leave the generation expert
without gradient on the first step; the shared initial weights give it small random values so that every trainable
parameter — both experts, ViT, VAE connectors — takes part in the comparison. One pair of worker processes
(``_ddp_parity_worker.py``, torchrun-style environment variables) runs one step; results come back as files.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from _multiprocess import run_ranks
from chatumm_kit.components.tokenizer import ChatTokenizer
from chatumm_kit.config import load_recipe
from chatumm_kit.data.packing import Packer
from chatumm_kit.data.shards import read_samples
from chatumm_kit.model import FlowInputs
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.systems.unified import ChatUMMSystem
from chatumm_kit.training.losses import objective
from chatumm_kit.training.prepare import dialogue_texts

WORKER = Path(__file__).with_name("_ddp_parity_worker.py")
WORLD = 2
RANK_DIALOGUES = ([1], [2, 5, 7])  # indices into the synthesised dialogues; rank 1 has ~3.5x rank 0's tokens
TOL = 1e-5  # on gradients (largest entries ~1) and on weights after the step


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _rank_generator(system: ChatUMMSystem, *, step: int, rank: int) -> torch.Generator:
    """The generator rank ``rank`` of a DDP run uses at ``step`` (the system's own rule, rank substituted)."""
    return ChatUMMSystem._step_generator(SimpleNamespace(hparams=system.hparams, global_rank=rank), step)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_parity")
    data = root / "data"
    cfg = load_recipe("shapes/synth", [f"output_dir={data}", "synth.num_dialogues=8", "synth.shard_size=8"])
    run_synth(cfg)
    samples = list(read_samples(data / "index.json"))
    tokenizer = ChatTokenizer.train(dialogue_texts(str(data / "index.json")), vocab_size=300)
    packer = Packer(
        tokenizer=tokenizer,
        vit_patch_size=8,
        vae_token_stride=8,
        max_image_side=32,
        drop_rates={"text": 0.0, "vit": 0.0, "vae": 0.0},  # deterministic packing: no CFG draws
    )
    per_rank = [[samples[i] for i in idx] for idx in RANK_DIALOGUES]
    batches = [packer.pack(s) for s in per_rank]
    combined = packer.pack([s for rank in per_rank for s in rank])  # rank 0's documents first, then rank 1's

    spec = {
        "preset": "chatumm_tiny",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "num_layers": 1,
        "intermediate_size": 64,
        "vit_hidden": 32,
        "vit_layers": 1,
    }
    torch.manual_seed(1)
    init = ChatUMMSystem(model=spec)
    init.configure_model()
    with torch.no_grad():  # zero-initialised: no gradient would reach the generation expert on the first step
        init.model.vae.llm2vae.weight.normal_(std=0.05)
    init_file = root / "init.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in init.model.state_dict().items()}, str(init_file))
    system_kwargs = dict(
        model=spec,
        # eps above every gradient entry: the first AdamW step is ~lr·g, not lr·sign(g) (module docstring)
        optimizer={"lr": 5e-2, "weight_decay": 0.0, "eps": 1.0},
        schedule={"kind": "constant"},
        init_from=str(init_file),
        seed=7,
    )
    torch.save(system_kwargs, root / "system.pt")
    torch.save(batches, root / "batches.pt")
    return SimpleNamespace(root=root, batches=batches, combined=combined, system_kwargs=system_kwargs)


@pytest.fixture(scope="module")
def ranks(setup):
    run_ranks(WORKER, str(setup.root), world=WORLD, timeout=180, env={"OMP_NUM_THREADS": "1"})
    return [torch.load(setup.root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _step_from(system_kwargs: dict, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights after one optimizer step of a fresh system (same init, optimizer and schedule) given ``grads``."""
    system = ChatUMMSystem(**system_kwargs)
    system.configure_model()
    optimizer = system.configure_optimizers()["optimizer"]
    for name, p in system.model.named_parameters():
        p.grad = grads[name].clone() if name in grads else None
    optimizer.step()
    return {n: p.detach().clone() for n, p in system.model.named_parameters()}


@pytest.fixture(scope="module")
def reference(setup):
    """One process: the combined pack with both ranks' noise, and the per-rank-mean gradient for contrast."""
    system = ChatUMMSystem(**setup.system_kwargs)
    system.configure_model()
    model = system.model
    flows = [model.draw_flow(b, generator=_rank_generator(system, step=0, rank=r)) for r, b in enumerate(setup.batches)]
    combined_flow = FlowInputs(
        timesteps=torch.cat([f.timesteps for f in flows]), noise=torch.cat([f.noise for f in flows])
    )

    def grads() -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    # The mistake the global normalisation avoids: each rank's own mean, then DDP's average over ranks.
    model.zero_grad(set_to_none=True)
    for batch, flow in zip(setup.batches, flows):
        out = model(batch, flow=flow)
        (system.hparams.ce_weight * out.ce_loss + system.hparams.mse_weight * out.mse_loss).div(WORLD).backward()
    per_rank_mean = grads()

    model.zero_grad(set_to_none=True)
    out = model(setup.combined, flow=combined_flow)
    terms = objective(out, ce_weight=system.hparams.ce_weight, mse_weight=system.hparams.mse_weight)
    terms.total.backward()
    global_mean = grads()
    return SimpleNamespace(
        flows=flows,
        ce_sum=float(out.ce_sum.detach()),
        mse_sum=float(out.mse_sum.detach()),
        ce_count=out.ce_count,
        mse_count=out.mse_count,
        terms=terms,
        grads=global_mean,
        per_rank_mean=per_rank_mean,
        start={n: p.detach().clone() for n, p in model.named_parameters()},
        weights=_step_from(setup.system_kwargs, global_mean),
        per_rank_mean_weights=_step_from(setup.system_kwargs, per_rank_mean),
    )


def test_ranks_hold_different_token_counts_that_add_up_to_the_combined_pack(setup, ranks, reference):
    counts = [(f["ce_count"], f["mse_count"]) for f in (r["forwards"][0] for r in ranks)]
    assert counts == [(int(b.ce_indices.numel()), int(b.mse_indices.numel())) for b in setup.batches]
    (ce0, mse0), (ce1, mse1) = counts
    assert ce0 != ce1 and mse0 != mse1 and ce0 * mse1 != ce1 * mse0  # per-rank means weigh tokens unequally
    assert setup.combined.sample_keys == setup.batches[0].sample_keys + setup.batches[1].sample_keys  # doc order
    assert (reference.ce_count, reference.mse_count) == (ce0 + ce1, mse0 + mse1)
    assert reference.terms.ce_tokens == ce0 + ce1  # no process group in the test process: local = global
    assert [r["global_rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)
    assert all(len(r["forwards"]) == 1 and r["global_step"] == 1 for r in ranks)  # exactly one step ran


def test_each_rank_draws_the_noise_of_its_seed_step_and_rank(ranks, reference):
    for rank, flow in zip(ranks, reference.flows):
        fwd = rank["forwards"][0]
        assert torch.equal(fwd["timesteps"], flow.timesteps) and torch.equal(fwd["noise"], flow.noise)
    # the rank enters the seed: the two ranks do not share noise
    a, b = (r["forwards"][0]["noise"] for r in ranks)
    assert not torch.equal(a[: min(len(a), len(b))], b[: min(len(a), len(b))])


def test_ddp_loss_sums_match_the_combined_forward(ranks, reference):
    # Documents are independent in the packed sequence: the per-rank sums add up to the combined pass's sums.
    ce = sum(r["forwards"][0]["ce_sum"] for r in ranks)
    mse = sum(r["forwards"][0]["mse_sum"] for r in ranks)
    assert float(ce) == pytest.approx(reference.ce_sum, rel=1e-5)
    assert float(mse) == pytest.approx(reference.mse_sum, rel=1e-5)
    # The logged train/ce and train/mse (each rank's share, summed with sync_dist) are the global token means.
    for r in ranks:
        assert r["metrics"]["train/ce"] == pytest.approx(float(reference.terms.ce.detach()), rel=1e-5)
        assert r["metrics"]["train/mse"] == pytest.approx(float(reference.terms.mse.detach()), rel=1e-5)


def test_ddp_gradient_equals_single_process_gradient_on_both_ranks_data(ranks, reference):
    g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
    assert _max_diff(g0, g1) == 0.0  # all-reduced: both ranks apply the same gradient
    assert g0.keys() == reference.grads.keys()
    assert not any(k.startswith("vae.autoencoder.") for k in g0)  # frozen by default
    # every trainable parameter takes part: both experts, ViT, VAE connectors
    assert all(g.abs().max() > 0 for g in reference.grads.values())
    assert any("moe_gen" in k for k in g0) and any(k.startswith("vit.") for k in g0)
    scale = max(g.abs().max().item() for g in reference.grads.values())
    assert 1e-2 < scale < 1e2  # gradients of order one, so TOL is a tight bound
    assert _max_diff(g0, reference.grads) < TOL


def test_per_rank_mean_normalisation_would_give_a_different_gradient(ranks, reference):
    # The test can fail: with these unequal ranks the per-rank-mean gradient is far outside the tolerance, both
    # for a parameter only the CE term reaches (lm_head) and one only the MSE term reaches (llm2vae).
    g0, wrong = ranks[0]["grads"], reference.per_rank_mean
    assert _max_diff(wrong, reference.grads) > 100 * TOL
    for name in ("backbone.lm_head.weight", "vae.llm2vae.weight"):
        assert _max_diff({name: g0[name]}, {name: reference.grads[name]}) < TOL
        assert _max_diff({name: g0[name]}, {name: wrong[name]}) > 100 * TOL


def test_ddp_weights_after_one_step_equal_single_process(ranks, reference):
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert _max_diff(w0, w1) == 0.0
    assert _max_diff(w0, reference.start) > 1e-3  # the step moved the weights
    assert _max_diff(w0, reference.weights) < TOL
    assert _max_diff(w0, reference.per_rank_mean_weights) > 100 * TOL
