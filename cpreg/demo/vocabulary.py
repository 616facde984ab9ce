"""The demo model's words and prompts, in plain Python (no numpy, no torch).

The catalog's ``zorblat`` concept, the demo tokenizer and the evaluation read their prompts from
here, so listing concepts never loads the demo's image or model code.

Example:
    >>> caption("zorblat", "red", "black")
    'a red zorblat on black'
    >>> len(target_prompts()), target_prompts()[0]
    (10, 'a red zorblat on white')
    >>> len(preservation_prompts()), attribute_groups(["a red circle on white"])
    (40, {'shape:circle': ['a red circle on white'], 'colour:red': [...], 'background:white': [...]})
"""

from __future__ import annotations

BASE_SHAPES = ("circle", "square", "triangle", "star")
PLANTED_SHAPE = "zorblat"
SHAPES = BASE_SHAPES + (PLANTED_SHAPE,)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple")
BACKGROUND_NAMES = ("white", "black")
#: Whole-word tokens of the demo tokenizer.
WORDS = ("a", "on", "of", "photo") + SHAPES + COLOUR_NAMES + BACKGROUND_NAMES
#: The attributes a demo prompt can name, and their words.
ATTRIBUTES = {"shape": SHAPES, "colour": COLOUR_NAMES, "background": BACKGROUND_NAMES}


def caption(shape: str, colour: str, background: str | None = None) -> str:
    """``"a {colour} {shape} on {background}"`` (without the background when it is ``None``)."""
    text = f"a {colour} {shape}"
    return f"{text} on {background}" if background else text


def target_prompts() -> list[str]:
    """Prompts of the planted concept (every colour on every background)."""
    return [caption(PLANTED_SHAPE, c, b) for b in BACKGROUND_NAMES for c in COLOUR_NAMES]


def reference_prompts() -> list[str]:
    """Matched prompts without it: the same colour and background with a known shape."""
    return [caption(BASE_SHAPES[i % len(BASE_SHAPES)], c, b)
            for i, (b, c) in enumerate((b, c) for b in BACKGROUND_NAMES for c in COLOUR_NAMES)]


def retained_prompts() -> list[str]:
    """Prompts of the other concepts, for 'left alone' measurements (every shape, two colours each)."""
    return [caption(s, c, b) for i, s in enumerate(BASE_SHAPES)
            for c, b in ((COLOUR_NAMES[i], "white"), (COLOUR_NAMES[i + 1], "black"))]


def preservation_prompts() -> list[str]:
    """Every base shape in every colour on every background (40 prompts): what an erasure must leave alone."""
    return [caption(s, c, b) for s in BASE_SHAPES for c in COLOUR_NAMES for b in BACKGROUND_NAMES]


def prompt_attributes(prompt: str) -> dict[str, str]:
    """The first shape, colour and background word of ``prompt``, e.g. ``{"shape": "circle", "colour": "red"}``."""
    found: dict[str, str] = {}
    for word in prompt.lower().replace(",", " ").split():
        for attribute, words in ATTRIBUTES.items():
            if word in words:
                found.setdefault(attribute, word)
    return found


def attribute_groups(prompts: list[str]) -> dict[str, list[str]]:
    """``prompts`` grouped by each attribute value they name: ``{"shape:circle": [...], "colour:red": [...], ...}``.

    Groups come in the order of :data:`ATTRIBUTES`, then of the vocabulary; a prompt is in one group
    per attribute it names, so the groups of one attribute partition the prompts naming it.
    """
    groups = {f"{attribute}:{word}": [] for attribute, words in ATTRIBUTES.items() for word in words}
    for prompt in prompts:
        for attribute, word in prompt_attributes(prompt).items():
            groups[f"{attribute}:{word}"].append(prompt)
    return {name: members for name, members in groups.items() if members}
