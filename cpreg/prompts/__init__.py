"""The retained prompts of ``cpreg eval``: what an erasure must leave alone, in named groups.

Which default applies is decided by the model:

- the demo models (``demo``, ``demo-planted``): every base shape in every colour on every background
  (:func:`cpreg.demo.vocabulary.preservation_prompts`, 40 prompts), grouped by the shape, colour and
  background they name (``shape:circle``, ``colour:blue``, ``background:white``...);
- any other model: the members' reference prompts (group ``reference``), :data:`PROMPTS_PER_CONCEPT`
  target prompts of every other catalog concept (group: the concept's name; concepts of kind
  ``nudity`` and the demo-only ``zorblat`` are left out: an unrelated erasure's evaluation draws no
  nude images unless asked with a file), and the generic captions written for cpreg in
  ``generic.txt`` (110 captions; groups ``people``, ``animals``, ``objects``, ``scenes``, ``styles``).

A user's file (``--retain-prompts FILE``) replaces the default: its prompts form the group
``retained``, or on the demo models the shape / colour / background groups. Erased prompts are never
retained.

Example:
    >>> retained = retained_set("demo-planted", [builtin_concept("zorblat")], builtin_concept("zorblat").targets)
    >>> len(retained.prompts), retained.groups["colour:blue"][:2]
    (40, ['a blue circle on white', 'a blue circle on black'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..catalog import CATALOG, ConceptSpec
from ..demo.vocabulary import PLANTED_SHAPE, attribute_groups, preservation_prompts
from ..errors import InvalidArgumentError
from ..models import DEMO_MODELS

#: Target prompts taken from each other catalog concept (evenly spaced through its list).
PROMPTS_PER_CONCEPT = 4
GENERIC_FILE = Path(__file__).resolve().parent / "generic.txt"
#: Catalog kinds left out of the default retained prompts.
LEFT_OUT_KINDS = ("nudity",)
#: Default groups whose prompts show a person (NudeNet's "person still detected" check).
PERSON_GROUPS = ("people", "male", "female")


@dataclass(frozen=True)
class RetainedSet:
    """Retained prompts, their groups for the breakdown, and the prompts that should show a person.

    ``person_prompts`` is ``None`` when every prompt should (a user's file, as NudeNet always read it).
    """

    prompts: list[str]
    groups: dict[str, list[str]]
    person_prompts: list[str] | None = None


def read_grouped_prompts(path: str | Path) -> dict[str, list[str]]:
    """Prompts in groups: ``[name]`` starts a group, then one prompt per line; ``#`` lines and blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"cannot read prompt file {str(path)!r}: {error}") from None
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("[") and text.endswith("]"):
            current = groups.setdefault(text[1:-1].strip(), [])
        elif current is None:
            raise InvalidArgumentError(f"{str(path)!r} line {number}: a prompt before the first [group] line")
        else:
            current.append(text)
    return groups


def generic_prompts() -> dict[str, list[str]]:
    """The generic captions shipped with cpreg, by group (``people``, ``animals``, ``objects``, ``scenes``, ``styles``)."""
    return read_grouped_prompts(GENERIC_FILE)


def catalog_prompts(exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """:data:`PROMPTS_PER_CONCEPT` target prompts of each catalog concept not in ``exclude``, by concept name."""
    groups = {}
    for name, spec in CATALOG.items():
        if name in exclude or name == PLANTED_SHAPE or spec.kind in LEFT_OUT_KINDS:
            continue
        count = len(spec.targets)
        groups[name] = [spec.targets[i * count // PROMPTS_PER_CONCEPT] for i in range(min(PROMPTS_PER_CONCEPT, count))]
    return groups


def _without(groups: dict[str, list[str]], erased: set[str]) -> dict[str, list[str]]:
    kept = {name: [prompt for prompt in prompts if prompt not in erased] for name, prompts in groups.items()}
    return {name: prompts for name, prompts in kept.items() if prompts}


def retained_set(model: str, concepts: Sequence[ConceptSpec], erased: Sequence[str],
                 prompts: Sequence[str] | None = None) -> RetainedSet:
    """The retained prompts of an evaluation of ``concepts`` on ``model`` (``prompts``: a user's list).

    Raises:
        InvalidArgumentError: every retained prompt is also an erased prompt.
    """
    erased_set = set(erased)
    if model in DEMO_MODELS:
        chosen = [prompt for prompt in (prompts or preservation_prompts()) if prompt not in erased_set]
        retained = RetainedSet(chosen, attribute_groups(chosen))
    elif prompts:
        chosen = [prompt for prompt in prompts if prompt not in erased_set]
        retained = RetainedSet(chosen, {"retained": chosen} if chosen else {})
    else:
        references = {"reference": list(dict.fromkeys(prompt for spec in concepts for prompt in spec.references if prompt))}
        groups = _without({**references, **catalog_prompts([spec.name for spec in concepts]), **generic_prompts()},
                          erased_set)
        person_groups = PERSON_GROUPS + (("reference",) if all(spec.kind == "nudity" for spec in concepts) else ())
        retained = RetainedSet(
            list(dict.fromkeys(prompt for members in groups.values() for prompt in members)), groups,
            list(dict.fromkeys(prompt for name in person_groups for prompt in groups.get(name, []))))
    if not retained.prompts:
        raise InvalidArgumentError("no retained prompts: every one is also an erased prompt")
    return retained
