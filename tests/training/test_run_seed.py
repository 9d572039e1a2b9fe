"""The recipe's top-level seed is the run's one seed: `chatumm train` hands it to the system and the data module."""

from omegaconf import OmegaConf

from chatumm_kit.config import load_recipe
from chatumm_kit.training.run import run_seed


def test_the_top_level_seed_reaches_nodes_that_take_one_and_do_not_set_it():
    cfg = load_recipe("shapes/chat_tiny", ["seed=7"])
    assert "seed" not in cfg.system and "seed" not in cfg.data  # said once, at the top
    assert run_seed(cfg.system, 7) == {"seed": 7} and run_seed(cfg.data, 7) == {"seed": 7}
    own = OmegaConf.create({"_component_": "chatumm_kit.data.shapes.images.ShapesImageDataModule", "seed": 3})
    assert run_seed(own, 7) == {}  # a node may still set its own
    assert run_seed(OmegaConf.create({"_component_": "torch.nn.Identity"}), 7) == {}  # takes no seed
    assert run_seed(None, 7) == {}
