"""The ShapesChat world: the kit's embedded, exactly scorable default (ARCHITECTURE.md, "The ShapesChat world").

Scenes of 1–2 objects (shape, colour, size, cell of a 3×3 grid) on a plain background; a renderer and a detector that
inverts it exactly on clean renders; per-attribute scoring with partial credit; single-turn tasks with ground truth
(text-to-image, edit, VQA, caption); canonical captions with a parser; scene references for long-range dialogue.

Example:
    >>> import random
    >>> from chatumm_kit.data import shapes
    >>> cfg = shapes.WorldConfig()                       # 32×32, 5 shapes, 6 colours, 2 sizes, 3×3 grid
    >>> scene = shapes.SceneGenerator(config=cfg, seed=0).sample()
    >>> img = shapes.render(scene, cfg)                  # uint8 [3, 32, 32]
    >>> shapes.detect(img, cfg) == scene
    True
    >>> shapes.parse_caption(shapes.describe(scene, cfg), cfg) == scene
    True
    >>> shapes.score(img, scene, config=cfg).accuracy
    1.0
"""

# Everything that scene, generator, language, score and tasks export, and the pixel and geometry entry points of
# render, detect and geometry (their helpers, and the phrasing tables and images data module, stay in their modules).
from .detect import detect, detect_batch
from .generator import *  # noqa: F403
from .generator import __all__ as _generator_all
from .geometry import SHAPE_PREDICATES
from .language import *  # noqa: F403
from .language import __all__ as _language_all
from .render import render, render_batch
from .scene import *  # noqa: F403
from .scene import __all__ as _scene_all
from .score import *  # noqa: F403
from .score import __all__ as _score_all
from .tasks import *  # noqa: F403
from .tasks import __all__ as _tasks_all

__all__ = [
    *_scene_all,  # scenes and world
    *_generator_all,
    "SHAPE_PREDICATES",
    "render",  # pixels
    "render_batch",
    "detect",
    "detect_batch",
    *_score_all,
    *_language_all,  # words
    *_tasks_all,  # tasks
]
