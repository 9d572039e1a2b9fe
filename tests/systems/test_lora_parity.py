"""2-process DDP and FSDP2 LoRA training equals one process training on both ranks' data (SPEC §4 normalisation).

The same construction as ``test_ddp_parity.py``: the ranks hold different numbers of dialogues, the single process
packs both ranks' dialogues into one sequence with the noise each rank drew, and the objective normalises by the
global token counts, so the gradient of every adapter weight must agree. The adapter is randomly initialised (``B``
too, so ``A`` gets gradient on the first step) on both experts, the token table and ``lm_head``, and ``vae.llm2vae``
is trained in full; only those weights may appear among the gradients.
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
from chatumm_kit.presets import chatumm_tiny
from chatumm_kit.synth.pipeline import run_synth
from chatumm_kit.systems.unified import ChatUMMSystem
from chatumm_kit.training.losses import objective
from chatumm_kit.training.prepare import dialogue_texts

WORKER = Path(__file__).with_name("_lora_parity_worker.py")
RANK_DIALOGUES = ([1], [2, 5, 7])
TOL = 1e-5
ADAPTER = {
    "_component_": "chatumm_kit.training.adapters.LoraSpec",
    "rank": 2,
    "alpha": 4,
    "embeddings": True,
    "trainable": ["vae.llm2vae"],
    "init": "random",
}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_parity")
    data = root / "data"
    run_synth(load_recipe("shapes/synth", [f"output_dir={data}", "synth.num_dialogues=8", "synth.shard_size=8"]))
    samples = list(read_samples(data / "index.json"))
    tokenizer = ChatTokenizer.train(dialogue_texts(str(data / "index.json")), vocab_size=300)
    packer = Packer(tokenizer=tokenizer, vit_patch_size=8, vae_token_stride=8, max_image_side=32,
                    drop_rates={"text": 0.0, "vit": 0.0, "vae": 0.0})  # fmt: skip
    per_rank = [[samples[i] for i in idx] for idx in RANK_DIALOGUES]
    batches = [packer.pack(s) for s in per_rank]
    combined = packer.pack([s for rank in per_rank for s in rank])
    spec = {"_component_": "chatumm_kit.presets.chatumm_tiny", "vocab_size": tokenizer.vocab_size,
            "hidden_size": 32, "num_layers": 1, "intermediate_size": 64, "vit_hidden": 32, "vit_layers": 1}  # fmt: skip
    torch.manual_seed(1)
    init = chatumm_tiny(**{k: v for k, v in spec.items() if k != "_component_"})
    with torch.no_grad():
        init.vae.llm2vae.weight.normal_(std=0.05)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in init.state_dict().items()}, str(root / "init.safetensors")
    )
    system_kwargs = dict(
        model=spec,
        adapter=ADAPTER,
        optimizer={"lr": 5e-2, "weight_decay": 0.0, "eps": 1.0},  # eps > |g|: the step is ~lr·g (test_ddp_parity)
        init_from=str(root / "init.safetensors"),
        seed=7,
    )
    torch.save(system_kwargs, root / "system.pt")
    torch.save(batches, root / "batches.pt")
    return SimpleNamespace(root=root, batches=batches, combined=combined, system_kwargs=system_kwargs)


@pytest.fixture(scope="module")
def ranks(setup):
    run_ranks(WORKER, str(setup.root), world=2, timeout=300, env={"OMP_NUM_THREADS": "1"})
    return {
        s: [torch.load(setup.root / f"{s}_rank{r}.pt", weights_only=False) for r in range(2)] for s in ("ddp", "fsdp2")
    }


def _system(setup) -> ChatUMMSystem:
    system = ChatUMMSystem(**setup.system_kwargs)
    torch.manual_seed(0)  # the workers' draw for the adapter's random init
    system.configure_model()
    return system


@pytest.fixture(scope="module")
def reference(setup):
    system = _system(setup)
    model = system.model
    gens = [ChatUMMSystem._step_generator(SimpleNamespace(hparams=system.hparams, global_rank=r), 0) for r in (0, 1)]
    flows = [model.draw_flow(b, generator=g) for b, g in zip(setup.batches, gens)]
    flow = FlowInputs(timesteps=torch.cat([f.timesteps for f in flows]), noise=torch.cat([f.noise for f in flows]))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = model(setup.combined, flow=flow)
    objective(out, ce_weight=1.0, mse_weight=1.0).total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    stepped = _system(setup)
    optimizer = stepped.configure_optimizers()["optimizer"]
    for n, p in stepped.model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    optimizer.step()
    weights = {n: p.detach().clone() for n, p in stepped.model.named_parameters() if p.requires_grad}
    return SimpleNamespace(start=start, grads=grads, weights=weights)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_lora_step_equals_one_process(strategy, ranks, reference):
    r0, r1 = ranks[strategy]
    assert r0["sharded"] == (strategy == "fsdp2")
    assert _max_diff(r0["start"], reference.start) == 0.0  # same base, same adapter init on every rank
    assert set(r0["grads"]) == set(reference.grads) == set(r0["trainable"])  # only adapter (and named) weights
    assert all(".lora_" in n or "modules_to_save" in n for n in r0["grads"])
    assert any("moe_gen" in n for n in r0["grads"]) and any("embed_tokens" in n for n in r0["grads"])
    assert all(g.abs().max() > 0 for g in reference.grads.values())
    assert _max_diff(r0["grads"], r1["grads"]) == 0.0
    assert _max_diff(r0["grads"], reference.grads) < TOL
    assert _max_diff(r0["weights"], reference.start) > 1e-3  # the step moved the adapter
    assert _max_diff(r0["weights"], reference.weights) < TOL
