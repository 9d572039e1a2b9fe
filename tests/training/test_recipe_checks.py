"""What can be known before ``prepare`` is checked before it (issue 19, item 10): each mistake is one line with its
YAML path from ``chatumm validate`` and from ``chatumm train`` before any prepare step has made anything."""

import pytest

from chatumm_kit.cli import main

CASES = {
    "trainer.max_steps=50": "system.schedule.total_steps: CosineSchedule.total_steps: must exceed warmup_steps=50, got 50",
    "system.model.hidden_size=abc": "system.model.hidden_size: expected int for chatumm_kit.presets.chatumm_tiny, got str 'abc'",
    "data.token_budget=-5": "data.token_budget: TokenBudgetBatcher(token_budget=-5) must be a positive multiple of packer.pad_to_multiple=1",
    "system.model.num_heads=3": "system.model: MoTConfig: num_heads=3 is not a multiple of num_kv_heads=2",
    "data.vit_patch_size=7": "data.vit_patch_size: 7, but the model's is 8",
    "data.max_image_side=256": "data.max_image_side: view sizing: the ViT view may be 32 patches per side (max_side 256 / stride 8) but the ViT's position table has 16; lower vit.max_side to 128",
    "system.model.hidden_size=0": "system.model: MoTConfig.hidden_size must be >= 1, got 0",
    "data.vae_token_stride=16": "data.vae_token_stride: 16, but the model's is 8",
}  # fmt: skip


@pytest.mark.parametrize("override", list(CASES))
def test_validate_and_train_name_the_mistake_before_any_prepare_step(override, tmp_path, capsys):
    where = [f"output_dir={tmp_path / 'run'}", f"vars.data_dir={tmp_path / 'data'}", f"vars.vae={tmp_path / 'vae.st'}"]
    for command in ("validate", "train"):
        assert main([command, "shapes/chat_tiny", override, *where]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert CASES[override] in err.removeprefix("error: ").splitlines()
    assert list(tmp_path.iterdir()) == []  # no prepare step ran: no data, no VAE, no run folder


def test_constant_warm_up_longer_than_the_run_is_named():
    from chatumm_kit.training.recipe_checks import schedule_problems

    plain = {
        "system": {"schedule": {"_component_": "chatumm_kit.training.schedules.ConstantSchedule", "warmup_steps": 200}},
        "trainer": {"max_steps": 100},
    }
    assert schedule_problems(plain) == [
        "system.schedule.warmup_steps: 200 warm-up steps do not fit in trainer.max_steps=100 (the run would end "
        "before the learning rate peaks); lower warmup_steps or raise max_steps"
    ]
    plain["trainer"]["max_steps"] = 200  # the last step (199) is the peak
    assert schedule_problems(plain) == []


def test_the_readme_validate_example_passes(capsys):
    assert main(["validate", "shapes/chat_tiny", "trainer.max_steps=100"]) == 0
    assert capsys.readouterr().out.strip() == "ok: shapes/chat_tiny (train recipe)"
