"""Values SQLite would store but PostgreSQL refuses are refused alike on both, before any write.

PostgreSQL rejects NUL characters in text, strings longer than their ``VARCHAR`` and NaN in JSON;
SQLite stores all of them (and turns NaN floats into NULL). The registry checks these values up
front, so both backends give the same one-line :class:`RegistryError` and store nothing.
"""

from __future__ import annotations

import dataclasses

import pytest

from cpreg.registry import ConflictError, Registry, RegistryError
from cpreg.registry import session as session_module

from registry_support import FP_A, FP_B, drop_database, make_mask, make_stats, open_registry, snapshot


@pytest.fixture
def reg(tmp_path):
    registry = open_registry(tmp_path)
    model = registry.ensure_base_model("tiny/sd", FP_A)
    registry.add_concept("nudity", "nudity")
    registry.add_mask("nudity", make_mask(0), model)
    registry.ensure_prompt_set(["a", "b"], ["c", "d"])
    yield registry
    registry.close()
    drop_database(tmp_path)


def _calibrate(reg: Registry, stats=None, **overrides):
    kwargs = {"dtype": "float32", "device": "cpu", "duration_s": 1.0, "library_versions": {"torch": "2"}}
    kwargs.update(overrides)
    prompts = reg.ensure_prompt_set(["a", "b"], ["c", "d"])
    return reg.add_calibration(stats or make_stats(5), FP_A, prompts, **kwargs)


CASES = {
    "long revision": lambda reg: reg.ensure_base_model("x", FP_B, revision="r" * 257),
    "long architecture": lambda reg: reg.ensure_base_model("x", FP_B, architecture="a" * 65),
    "NUL in model name": lambda reg: reg.ensure_base_model("a\x00b", FP_B),
    "NUL in concept description": lambda reg: reg.add_concept("other", "style", "a\x00b"),
    "NUL in mask description": lambda reg: reg.add_mask("nudity", make_mask(1), FP_A, description="a\x00b"),
    "long dvc_stage": lambda reg: reg.add_mask("nudity", make_mask(1), FP_A, dvc_stage="s" * 257),
    "long git_rev": lambda reg: reg.add_mask("nudity", make_mask(1), FP_A, git_rev="g" * 65),
    "long created_by": lambda reg: reg.add_mask("nudity", make_mask(1), FP_A, created_by="u" * 129),
    "long actor of a tag": lambda reg: reg.tag_mask("nudity@1", ["x"], created_by="u" * 129),
    "NUL in release notes": lambda reg: reg.compose("rel", ["nudity@1"], notes="x\x00"),
    "long device": lambda reg: _calibrate(reg, device="d" * 65),
    "NaN duration": lambda reg: _calibrate(reg, duration_s=float("nan")),
    "NaN in library versions": lambda reg: _calibrate(reg, library_versions={"x": float("nan")}),
    "NaN guidance": lambda reg: _calibrate(
        reg, stats=dataclasses.replace(make_stats(5), config=dataclasses.replace(make_stats(5).config, guidance_scale=float("nan")))
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unstorable_values_are_refused_alike_and_change_nothing(reg, case):
    before = snapshot(reg)
    with pytest.raises(RegistryError) as info:
        CASES[case](reg)
    assert "\n" not in str(info.value)
    assert snapshot(reg) == before  # no row and no stored object


def test_limits_themselves_are_accepted(reg):
    mask = reg.add_mask("nudity", make_mask(1), FP_A, dvc_stage="s" * 256, git_rev="g" * 64, created_by="u" * 128,
                        description="ünïcödé " * 1000)
    assert (mask.dvc_stage, mask.git_rev, mask.created_by) == ("s" * 256, "g" * 64, "u" * 128)
    assert _calibrate(reg, device="d" * 64).device == "d" * 64


def test_a_write_the_database_refuses_is_one_registry_error_without_retries(reg, monkeypatch):
    """Backstop: a CHECK violation is not a lost race: reported at once, not retried 30 times."""
    calls = []

    def failing(session):
        calls.append(1)
        from cpreg.registry.orm import ConceptRow

        session.add(ConceptRow(name="broken", kind="no-such-kind", description=""))
        session.flush()

    with pytest.raises(RegistryError, match="refused") as info:
        reg._tx.write(failing)
    assert not isinstance(info.value, ConflictError)
    assert len(calls) == 1 and "\n" not in str(info.value)
    assert "broken" not in [concept.name for concept in reg.list_concepts()]
    assert session_module.WRITE_ATTEMPTS > 1
