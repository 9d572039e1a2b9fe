import pytest

from chatumm_kit.cli import COMMANDS, main

RECIPE = """\
# A toy recipe: Lightning's demo model on its demo data.
seed: 3
output_dir: {out}
system:
  _component_: lightning.pytorch.demos.boring_classes.BoringModel
data:
  _component_: lightning.pytorch.demos.boring_classes.BoringDataModule
trainer:
  max_steps: 2
  limit_val_batches: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


# Lightning's demo classes are not on the recipe allow-list: the toy recipe opts into them as a user would.
DEMOS = ["--allow-root", "lightning.pytorch.demos"]


@pytest.fixture
def recipe(tmp_path):
    f = tmp_path / "toy.yaml"
    f.write_text(RECIPE.format(out=tmp_path / "run"))
    return f


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "validate", "print", "ls"):
        assert any(line.strip().startswith(name) for line in out.splitlines())
    assert set(COMMANDS) >= {"train", "validate", "print", "ls"}


def test_validate_and_print(recipe, capsys):
    assert main([*DEMOS, "validate", str(recipe)]) == 0
    assert main(["print", str(recipe), "trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "ok:" in out and "max_steps: 7" in out


def test_bad_recipe_exits_2_with_one_clear_line(recipe, capsys):
    code = main([*DEMOS, "validate", str(recipe), "+system.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: system.lrr: unexpected keyword argument 'lrr' for ")
    assert "Traceback" not in err
    assert main([*DEMOS, "train", str(recipe), "trainer.max_stepz=1"]) == 2
    assert "trainer.max_stepz: no such key" in capsys.readouterr().err
    assert main(["train", "shapes/does_not_exist"]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_train_runs_a_recipe_end_to_end(recipe, tmp_path, capsys):
    assert main([*DEMOS, "train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"logs and checkpoints: {tmp_path / 'run'}" in out
    ckpts = list((tmp_path / "run").rglob("*.ckpt"))
    assert len(ckpts) == 1 and "step=2" in ckpts[0].name


def test_train_rejects_unknown_top_level_key(recipe, capsys):
    assert main([*DEMOS, "train", str(recipe), "+trainr.x=1"]) == 2
    assert "trainr: unknown top-level key" in capsys.readouterr().err


def test_ls_lists_shipped_recipes(capsys):
    assert main(["ls"]) == 0


def test_demo_classes_need_the_opt_in(recipe, capsys):
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "'lightning.pytorch.demos.boring_classes.BoringModel' is not on the recipe allow-list" in err
    assert main(["--allow", "lightning.pytorch.demos.boring_classes.BoringModel", "validate", str(recipe)]) == 2
    err = capsys.readouterr().err  # one of the two admitted: the other is still refused, alone
    assert "BoringModel'" not in err and "'lightning.pytorch.demos.boring_classes.BoringDataModule' is not" in err
    assert main(["--trust-recipe", "validate", str(recipe)]) == 0


def test_a_command_imports_only_its_own_module():
    """``chatumm plan ...`` declares only plan's arguments: the other delegated commands' modules (eval, data import,
    adapters, with torch and Lightning behind them) are not imported just to build the parser."""
    import subprocess
    import sys

    from chatumm_kit.cli import chosen_command

    assert chosen_command(["--allow", "train", "plan", "x"]) == "plan"  # an --allow value is not the command
    assert chosen_command(["--trust-recipe", "eval", "shapes/eval"]) == "eval"
    assert chosen_command(["--help"]) == chosen_command(["nonsense", "plan"]) == ""
    probe = (
        "import sys\nfrom chatumm_kit.cli import main\ntry:\n    main(['--allow', 'a.b', 'plan', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('chatumm_kit.training.plan_cli', 'chatumm_kit.eval.cli', 'chatumm_kit.data.import_cli',"
        " 'chatumm_kit.training.adapter_cli', 'chatumm_kit.convert.cli') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "usage: chatumm plan" in out and out.strip().splitlines()[-1] == "['chatumm_kit.training.plan_cli']"
