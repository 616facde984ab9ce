"""The built-in concept catalog (the paper's concepts, with our own prompt lists) and custom concepts.

Every concept is a list of matched (target, reference) prompt pairs: the target contains the
concept, the reference is the same content without it (the method: ``docs/method.md``).

Example:
    >>> spec = builtin_concept("van-gogh")
    >>> spec.pairs[0]
    ('a cat in the style of Van Gogh', 'a photo of a cat')
    >>> spec = load_concept_file("my-concept.yaml")
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from .errors import InvalidArgumentError

KINDS = ("style", "nudity", "object", "gender", "memorization", "custom")

#: Default skill_ratio per kind: the paper's reference code uses 0.01 for styles and 0.02 for objects.
DEFAULT_SKILL_RATIO = {"style": 0.01, "nudity": 0.01, "object": 0.02, "gender": 0.01, "memorization": 0.01, "custom": 0.01}

ARTISTS = {
    "van-gogh": "Van Gogh",
    "monet": "Monet",
    "pablo-picasso": "Pablo Picasso",
    "salvador-dali": "Salvador Dali",
    "leonardo-da-vinci": "Leonardo Da Vinci",
}
THINGS = (
    "cat", "dog", "house", "tree", "river", "mountain", "city street", "bridge", "boat", "garden",
    "woman reading", "old man", "field of flowers", "church", "horse", "cafe at night", "bowl of fruit",
    "portrait of a girl", "village", "beach at sunset",
)
PEOPLE = (
    "man", "woman", "young man", "young woman", "old man", "old woman", "person on a beach", "couple",
    "woman in a bedroom", "man in a shower", "person lying on a bed", "woman by the pool", "man at the gym",
    "dancer", "model posing", "girl in the forest", "boy at the lake", "person in a sauna", "athlete", "bather",
)
IMAGENETTE = {
    "tench": "tench", "english-springer": "English springer", "cassette-player": "cassette player",
    "chain-saw": "chain saw", "church": "church", "french-horn": "French horn", "garbage-truck": "garbage truck",
    "gas-pump": "gas pump", "golf-ball": "golf ball", "parachute": "parachute",
}
SCENES = (
    "park", "street", "field", "forest", "beach", "city square", "garden", "parking lot", "lake", "desert",
    "snowy road", "market", "backyard", "river bank", "stadium", "countryside", "harbour", "mountain valley",
    "village", "room",
)
MALE_WORDS = ("man", "boy", "gentleman", "father", "male doctor", "businessman", "grandfather", "male teacher",
              "king", "male student")
FEMALE_WORDS = ("woman", "girl", "lady", "mother", "female doctor", "businesswoman", "grandmother",
                "female teacher", "queen", "female student")


@dataclass(frozen=True)
class ConceptSpec:
    """A concept with its calibration prompts (matched pairs) and default skill_ratio."""

    name: str
    kind: str
    description: str
    pairs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"unknown concept kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.pairs:
            raise InvalidArgumentError(f"concept {self.name!r} has no prompt pairs")

    @property
    def targets(self) -> list[str]:
        return [target for target, _ in self.pairs]

    @property
    def references(self) -> list[str]:
        return [reference for _, reference in self.pairs]

    @property
    def skill_ratio(self) -> float:
        return DEFAULT_SKILL_RATIO[self.kind]


def _catalog() -> dict[str, ConceptSpec]:
    specs = [
        ConceptSpec(
            name,
            "style",
            f"the painting style of {artist}",
            tuple((f"a {thing} in the style of {artist}", f"a photo of a {thing}") for thing in THINGS),
        )
        for name, artist in ARTISTS.items()
    ]
    specs.append(
        ConceptSpec(
            "nudity",
            "nudity",
            "nude people",
            tuple((f"a photo of a naked {person}", f"a photo of a {person}") for person in PEOPLE),
        )
    )
    specs += [
        ConceptSpec(name, "object", f"the Imagenette object {label}", tuple((f"a {label} in a {scene}", f"a {scene}") for scene in SCENES))
        for name, label in IMAGENETTE.items()
    ]
    specs.append(
        ConceptSpec("female", "gender", "female people (gender reversal: women become men)",
                    tuple((f"a headshot of a {f}", f"a headshot of a {m}") for m, f in zip(MALE_WORDS, FEMALE_WORDS)))
    )
    specs.append(
        ConceptSpec("male", "gender", "male people (gender reversal: men become women)",
                    tuple((f"a headshot of a {m}", f"a headshot of a {f}") for m, f in zip(MALE_WORDS, FEMALE_WORDS)))
    )
    from .demo.vocabulary import reference_prompts, target_prompts

    specs.append(
        ConceptSpec("zorblat", "object", "the shape planted in the demo model (use --model demo-planted)",
                    tuple(zip(target_prompts(), reference_prompts())))
    )
    return {spec.name: spec for spec in specs}


class _Catalog(Mapping[str, ConceptSpec]):
    """The built-in concepts by name, built on first use (importing the catalog builds nothing)."""

    @cached_property
    def _specs(self) -> dict[str, ConceptSpec]:
        return _catalog()

    def __getitem__(self, name: str) -> ConceptSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


CATALOG: Mapping[str, ConceptSpec] = _Catalog()


def builtin_concept(name: str) -> ConceptSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown concept {name!r}; `cpreg concepts list` shows the catalog") from None


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"cannot read prompt file {str(path)!r}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidArgumentError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def pair_prompts(targets: list[str], references: list[str] | None, kind: str) -> tuple[tuple[str, str], ...]:
    """Match target and reference prompts one to one.

    Memorization concepts take the empty prompt as reference when none is given.
    """
    if references is None:
        if kind != "memorization":
            raise InvalidArgumentError("reference prompts are required (only memorization concepts default to the empty prompt)")
        references = [""] * len(targets)
    if len(targets) != len(references):
        raise InvalidArgumentError(f"{len(targets)} target prompts but {len(references)} reference prompts: they must pair up")
    return tuple(zip(targets, references))


def concept_from_files(name: str, kind: str, target_file: str | Path, reference_file: str | Path | None, description: str = "") -> ConceptSpec:
    targets = read_prompt_file(target_file)
    references = read_prompt_file(reference_file) if reference_file is not None else None
    return ConceptSpec(name, kind, description, pair_prompts(targets, references, kind))


def load_concept_file(path: str | Path) -> ConceptSpec:
    """A custom concept from one YAML file::

        name: zorblat
        kind: custom            # optional, default custom
        description: ...        # optional
        targets: [a zorblat in a park, ...]
        references: [a park, ...]   # optional for kind memorization
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InvalidArgumentError(f"cannot read concept file {str(path)!r}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise InvalidArgumentError(f"concept file {str(path)!r} needs a mapping with a `targets` list")
    unknown = set(data) - {"name", "kind", "description", "targets", "references"}
    if unknown:
        raise InvalidArgumentError(f"concept file {str(path)!r} has unknown keys: {', '.join(sorted(unknown))}")
    kind = data.get("kind", "custom")
    targets = [str(p) for p in data["targets"]]
    references = data.get("references")
    references = [str(p) for p in references] if references is not None else None
    name = data.get("name") or path.stem
    return ConceptSpec(str(name), kind, str(data.get("description", "")), pair_prompts(targets, references, kind))
