"""Think mode as BAGEL's inferencer runs it (SPEC §4.1): its system prompts, the modes that use them, the reasoning span.

With think on, BAGEL prepends a system prompt to the request, decodes the reasoning inside ``<think> … </think>``, and
then produces the image (the reasoning enters the full context only: the text- and image-unconditional CFG contexts
of that image lack it) or, for an understanding request, keeps decoding the answer in the same text. The prompts
below are BAGEL's published defaults, verbatim (``SessionConfig.think_image_prompt`` / ``think_text_prompt`` replace
them).

The think modes of :meth:`ChatSession.respond <chatumm_kit.inference.session.ChatSession.respond>`:

* ``think_image`` — the generation prompt; a think text segment (``TextSegment(think=True)``) decoded up to and
  including ``</think>``; then one image (text-to-image, sized like ``image``);
* ``think_edit`` — the same, the image sized like the edited image (``edit``);
* ``think_text`` — the understanding prompt; one text segment holding the reasoning and the answer, decoded to
  ``<|im_end|>`` as BAGEL decodes it (:func:`split_think` separates them);
* ``think`` — the model's intent prediction at the end of the user block (SPEC §2) picks ``think_text`` (it predicts
  ``<|im_start|>``) or ``think_image`` (``<|vision_start|>``, sized as ``auto`` sizes images) first.

Example:
    >>> split_think("<think> a red circle, centred </think> It is red.")
    ('<think> a red circle, centred </think>', 'It is red.')
    >>> THINK_OUTPUT["think_edit"]
    'edit'
"""

from __future__ import annotations

__all__ = [
    "BAGEL_THINK_IMAGE_PROMPT",
    "BAGEL_THINK_TEXT_PROMPT",
    "THINK_END",
    "THINK_OUTPUT",
    "split_think",
]

BAGEL_THINK_IMAGE_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)
"""BAGEL's system prompt for think mode with an image output (generation and editing)."""

BAGEL_THINK_TEXT_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
"""BAGEL's system prompt for think mode with a text output (understanding)."""

THINK_END = "</think>"
"""Where the reasoning ends: a think segment before an image closes once its text contains this."""

THINK_OUTPUT = {"think": "auto", "think_text": "text", "think_image": "image", "think_edit": "edit"}
"""Think mode → the output it produces after the reasoning (``auto``: the predicted intent picks text or image)."""


def split_think(text: str) -> tuple[str, str]:
    """``(reasoning, rest)``: ``text`` up to and including the first ``</think>`` (when it opens with ``<think>``) and
    the rest, stripped; ``("", text)`` when there is no such span."""
    stripped = text.lstrip()
    end = stripped.find(THINK_END)
    if not stripped.startswith("<think>") or end < 0:
        return "", text
    cut = end + len(THINK_END)
    return stripped[:cut], stripped[cut:].strip()
