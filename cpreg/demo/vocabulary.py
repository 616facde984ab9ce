"""The demo model's words and prompts, in plain Python (no numpy, no torch).

The catalog's ``zorblat`` concept, the demo tokenizer and the evaluation read their prompts from
here, so listing concepts never loads the demo's image or model code.

Example:
    >>> caption("zorblat", "red", "black")
    'a red zorblat on black'
    >>> len(target_prompts()), target_prompts()[0]
    (10, 'a red zorblat on white')
"""

from __future__ import annotations

BASE_SHAPES = ("circle", "square", "triangle", "star")
PLANTED_SHAPE = "zorblat"
SHAPES = BASE_SHAPES + (PLANTED_SHAPE,)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple")
BACKGROUND_NAMES = ("white", "black")
#: Whole-word tokens of the demo tokenizer.
WORDS = ("a", "on", "of", "photo") + SHAPES + COLOUR_NAMES + BACKGROUND_NAMES


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
