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

from .detect import detect, detect_batch
from .generator import SceneGenerator, sample_object, sample_scene
from .geometry import SHAPE_PREDICATES
from .language import (
    ObjectQuery,
    default_config,
    describe,
    describe_objects,
    distinguishing_query,
    object_text,
    parse_caption,
    parse_position,
    position_name,
    refer_to,
    resolve_reference,
    world_words,
)
from .render import render, render_batch
from .scene import DEFAULT_PALETTE, DEFAULT_SHAPES, DEFAULT_SIZES, Scene, ShapeObject, WorldConfig
from .score import AttributeScore, match_objects, score
from .tasks import (
    VQA,
    Caption,
    Edit,
    EditOp,
    QuestionKind,
    TextToImage,
    answer_question,
    normalise_answer,
    sample_caption,
    sample_edit,
    sample_text_to_image,
    sample_vqa,
    valid_edit_ops,
)

__all__ = [
    # scenes and world
    "ShapeObject",
    "Scene",
    "WorldConfig",
    "default_config",
    "DEFAULT_SHAPES",
    "DEFAULT_PALETTE",
    "DEFAULT_SIZES",
    "SHAPE_PREDICATES",
    "SceneGenerator",
    "sample_scene",
    "sample_object",
    # pixels
    "render",
    "render_batch",
    "detect",
    "detect_batch",
    "AttributeScore",
    "score",
    "match_objects",
    # words
    "position_name",
    "parse_position",
    "object_text",
    "world_words",
    "describe_objects",
    "describe",
    "parse_caption",
    "ObjectQuery",
    "distinguishing_query",
    "refer_to",
    "resolve_reference",
    # tasks
    "EditOp",
    "QuestionKind",
    "TextToImage",
    "Edit",
    "VQA",
    "Caption",
    "sample_text_to_image",
    "sample_edit",
    "sample_vqa",
    "sample_caption",
    "valid_edit_ops",
    "answer_question",
    "normalise_answer",
]
