"""Every recipe shipped with the kit validates (binds to its callables' signatures) without building anything."""

import pytest

from chatumm_kit.cli import main
from chatumm_kit.config import recipes_root

RECIPES = sorted(str(p.relative_to(recipes_root()).with_suffix("")) for p in recipes_root().rglob("*.yaml"))


def test_the_main_job_and_its_baseline_are_shipped():
    assert {"shapes/chat_tiny", "shapes/single_turn_tiny", "shapes/synth", "shapes/vae"} <= set(RECIPES)
    assert {"bagel_7b/sft_chat_fsdp", "bagel_7b/sft_chat_freeze_und_ddp"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_validates_and_has_a_launch_line(name, capsys):
    assert main(["validate", name]) == 0, capsys.readouterr().err
    lines = (recipes_root() / f"{name}.yaml").read_text().splitlines()
    header = [ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))]]
    assert any(ln.startswith("# Launch") for ln in header), header


def test_a_typo_in_a_shipped_recipe_override_is_named(capsys):
    assert main(["validate", "shapes/chat_tiny", "+system.model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert (
        "system.model.hiden_size: unexpected keyword argument 'hiden_size' for chatumm_kit.presets.chatumm_tiny" in err
    )


def test_a_model_named_the_old_preset_way_in_a_recipe_is_refused_with_its_path(capsys):
    """Recipes name the model with _component_ only; {preset: NAME} is read from old checkpoints, not recipes."""
    args = ["validate", "shapes/chat_tiny", "~system.model._component_", "+system.model.preset=chatumm_tiny"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "system.model: name the model with _component_" in err and "only from old checkpoints" in err
