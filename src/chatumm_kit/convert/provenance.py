"""Where a model folder's weights come from, recorded beside them (``chatumm_provenance.json``).

A converted BAGEL release was trained by BAGEL, single-turn and without the kit's stream conventions: its
understanding mode reads a user image as the ViT view only (SPEC §4.1), while the kit's training teaches VAE + ViT
(SPEC §2). A chat session picks its default from this record (``inference.session.user_image_views_for``):

* ``bagel_release`` — BAGEL's released weights, converted (``chatumm convert bagel-to-kit``, ``load_bagel``); also
  what a BAGEL release folder or kit folder without a record is taken to be;
* ``kit_trained`` — weights the kit trained: written by ``chatumm convert kit-to-bagel`` from a training checkpoint
  and by ``chatumm adapter merge``, and carried along by ``bagel-to-kit`` / ``kit-to-bagel`` of such a folder.

A training checkpoint is always ``kit_trained``.

Example:
    >>> import tempfile
    >>> folder = write_weights_origin(tempfile.mkdtemp(), WeightsOrigin.KIT_TRAINED)
    >>> read_weights_origin(folder).value
    'kit_trained'
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

__all__ = ["PROVENANCE_FILE", "WeightsOrigin", "read_weights_origin", "write_weights_origin"]

PROVENANCE_FILE = "chatumm_provenance.json"


class WeightsOrigin(str, Enum):
    """Who trained a folder's weights (see the module docstring)."""

    BAGEL_RELEASE = "bagel_release"
    KIT_TRAINED = "kit_trained"


def read_weights_origin(folder: str | Path) -> WeightsOrigin:
    """The origin recorded in ``folder`` (``bagel_release`` when the folder has no record).

    Raises:
        ValueError: a record that is not JSON or names an unknown origin (the file is named).
    """
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return WeightsOrigin.BAGEL_RELEASE
    try:
        value = json.loads(path.read_text())["weights"]
        return WeightsOrigin(value)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        known = [o.value for o in WeightsOrigin]
        raise ValueError(f'{path}: expected {{"weights": one of {known}}} ({type(err).__name__}: {err})') from None


def write_weights_origin(folder: str | Path, origin: WeightsOrigin | str) -> Path:
    """Record ``origin`` in ``folder`` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"weights": WeightsOrigin(origin).value}) + "\n")
    return folder
