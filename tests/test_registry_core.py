"""Registry behaviour in one process: versions, refs, aliases, releases, diff, gc, verify, errors."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy
import torch
from sqlalchemy import text

from cpreg.editors import union
from cpreg.registry import (
    AmbiguousRefError,
    ConflictError,
    IncompatibleMasksError,
    InUseError,
    InvalidNameError,
    Mask,
    NotFoundError,
    Registry,
    RegistryError,
    Release,
    parse_ref,
)
from cpreg.registry.orm import ConceptRow, ReleaseRow

from registry_support import (
    FP_A,
    FP_B,
    SHAPES,
    drop_database,
    make_mask,
    make_stats,
    mask_from_sets,
    object_file,
    open_registry,
    snapshot,
)

LAYER = next(iter(SHAPES))


@pytest.fixture
def reg(tmp_path):
    registry = open_registry(tmp_path)
    yield registry
    registry.close()
    drop_database(tmp_path)


@pytest.fixture
def model(reg):
    return reg.ensure_base_model("tiny/sd", FP_A, revision="main", architecture="sd")


@pytest.fixture
def nudity(reg, model):
    """Concept 'nudity' with versions 1..3 on model A."""
    reg.add_concept("nudity", "nudity", "naked bodies")
    return [reg.add_mask("nudity", make_mask(seed), model) for seed in (1, 2, 3)]


def assert_unchanged(reg, before, call, error=RegistryError, match=None):
    """``call`` raises ``error`` and leaves every row and every stored object as they were."""
    with pytest.raises(error, match=match) as info:
        call()
    assert snapshot(reg) == before
    assert "\n" not in str(info.value)
    return info.value


# ---------------------------------------------------------------- versions and refs


def test_versions_count_up_and_refs_resolve(reg, model, nudity):
    assert [mask.ref for mask in nudity] == ["nudity@1", "nudity@2", "nudity@3"]
    assert all(isinstance(mask, Mask) for mask in nudity)
    assert reg.resolve_mask("nudity").version == 3
    assert reg.resolve_mask("nudity@latest").version == 3
    assert reg.resolve_mask("nudity@2").id == nudity[1].id
    assert reg.load_mask("nudity@2").equals(make_mask(2))
    assert reg.load_mask(nudity[0]).equals(make_mask(1))
    assert reg.resolve("nudity@1") == reg.resolve_mask("nudity@1")
    mask = nudity[0]
    original = make_mask(1)
    assert mask.base_model_fingerprint == FP_A and mask.hook == "ffn_out" and mask.component == "unet"
    assert mask.masked_total == original.num_masked and mask.masked_per_layer == original.counts()
    assert (mask.skill_ratio, mask.tau, mask.select_ratio) == (0.01, 10, 0.0)
    assert mask.created_by == "tester" and mask.created_at.tzinfo is not None
    assert [m.ref for m in reg.list_masks()] == ["nudity@1", "nudity@2", "nudity@3"]


def test_entities_are_frozen_snapshots(reg, nudity):
    with pytest.raises(dataclasses.FrozenInstanceError):
        nudity[0].version = 7
    reg.close()
    assert nudity[0].ref == "nudity@1"  # nothing lazy left to load


def test_parse_ref_grammar():
    assert parse_ref("nudity") == parse_ref("nudity@latest")
    assert parse_ref("nudity@3").version == 3
    assert parse_ref("nudity@prod").alias == "prod"
    assert str(parse_ref("safe-v1@2")) == "safe-v1@2"
    for bad in ("nudity@", "@3", "a@b@c", "nudity@0", "nudity@../x", "nudity@Prod", ""):
        with pytest.raises(InvalidNameError):
            parse_ref(bad)


def test_aliases_move(reg, model, nudity):
    alias = reg.set_alias("nudity@1", "prod")
    assert (alias.ref, alias.mask_version) == ("nudity@prod", 1)
    assert reg.resolve_mask("nudity@prod").version == 1
    assert reg.resolve_mask("nudity@1").aliases == ("prod",)
    moved = reg.set_alias("nudity@3", "prod")
    assert moved.id == alias.id and moved.mask_version == 3
    assert reg.resolve_mask("nudity@prod").version == 3
    assert reg.resolve_mask("nudity@1").aliases == ()
    assert [(a.ref, a.mask_version) for a in reg.list_aliases()] == [("nudity@prod", 3)]
    actions = [event.action for event in reg.events()]
    assert actions[:2] == ["alias.move", "alias.set"]
    assert reg.events(1)[0].details == {"from": 1, "to": 3}
    # Setting it to where it already points changes nothing.
    before = snapshot(reg)
    reg.set_alias("nudity@3", "prod")
    assert snapshot(reg) == before
    reg.remove_alias("nudity@prod")
    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        reg.resolve_mask("nudity@prod")


@pytest.mark.parametrize("alias", ["3", "007", "latest", "Prod", "a/b", "..", "", "a b"])
def test_invalid_alias_names(reg, nudity, alias):
    assert_unchanged(reg, snapshot(reg), lambda: reg.set_alias("nudity@1", alias), InvalidNameError)


def test_unknown_refs(reg, model, nudity):
    before = snapshot(reg)
    cases = {
        "ghost": "unknown concept 'ghost'",
        "nudity@9": "no version 9 of concept 'nudity'",
        "nudity@stable": "no alias 'stable' of concept 'nudity'",
    }
    for ref, message in cases.items():
        with pytest.raises(NotFoundError, match=message):
            reg.resolve_mask(ref)
    with pytest.raises(NotFoundError, match="unknown concept or release 'ghost'"):
        reg.resolve("ghost")
    with pytest.raises(NotFoundError, match="unknown release 'safe'"):
        reg.resolve_release("safe")
    with pytest.raises(NotFoundError, match="'nudity' is a concept, not a release"):
        reg.resolve_release("nudity")
    with pytest.raises(NotFoundError, match="unknown base model"):
        reg.resolve_mask("nudity", base_model=FP_B)
    for call in (reg.load_mask, reg.delete_mask, lambda ref: reg.tag_mask(ref, ["x"]), lambda r: reg.set_alias(r, "a")):
        with pytest.raises(NotFoundError):
            call("nudity@42")
    assert snapshot(reg) == before


def test_masks_on_several_base_models_need_a_filter(reg, model, nudity):
    other = reg.ensure_base_model("tiny/sdxl", FP_B, architecture="sdxl")
    on_b = reg.add_mask("nudity", make_mask(10, fingerprint=FP_B), other)
    assert on_b.ref == "nudity@1"  # versions count per (concept, base model)
    for ref in ("nudity", "nudity@1"):
        with pytest.raises(AmbiguousRefError, match="2 base models.*pass a base_model"):
            reg.resolve_mask(ref)
        with pytest.raises(AmbiguousRefError):
            reg.resolve(ref)
    assert reg.resolve_mask("nudity", base_model=FP_B).id == on_b.id
    assert reg.resolve_mask("nudity", base_model=model).version == 3
    assert reg.resolve_mask("nudity@2").base_model_fingerprint == FP_A  # only A has a version 2
    # Aliases are per base model.
    reg.set_alias("nudity@2", "prod", base_model=FP_A)
    reg.set_alias("nudity@1", "prod", base_model=FP_B)
    with pytest.raises(AmbiguousRefError):
        reg.resolve_mask("nudity@prod")
    assert reg.resolve_mask("nudity@prod", base_model=FP_A).version == 2
    assert reg.resolve_mask("nudity@prod", base_model=FP_B).id == on_b.id
    assert len(reg.list_masks("nudity", base_model=FP_B)) == 1


# ---------------------------------------------------------------- names and conflicts


@pytest.mark.parametrize("name", ["a/b", "..", "", "A B", "../x", "a..b", ".hidden", "-x", "x" * 65, "café", "a@b"])
def test_invalid_names_are_rejected_everywhere(reg, model, nudity, name):
    before = snapshot(reg)
    assert_unchanged(reg, before, lambda: reg.add_concept(name, "custom"), InvalidNameError, r"invalid (concept )?name")
    assert_unchanged(reg, before, lambda: reg.compose(name, ["nudity@1"]), InvalidNameError)
    assert_unchanged(reg, before, lambda: reg.tag_mask("nudity@1", [name]), InvalidNameError)
    assert_unchanged(reg, before, lambda: reg.add_mask("nudity", make_mask(5), model, tags=[name]), InvalidNameError)
    assert_unchanged(reg, before, lambda: reg.add_mask(name, make_mask(5), model), InvalidNameError)
    if "@" not in name:  # "a@b" is a well-formed reference (alias b of a), just not a name
        with pytest.raises(InvalidNameError):
            reg.resolve(name)


def test_valid_names():
    from cpreg.registry import validate_name

    for name in ("nudity", "van-gogh", "safe_v1.2", "0day", "x" * 64):
        assert validate_name(name) == name


def test_duplicate_concept_and_bad_kind(reg, nudity):
    before = snapshot(reg)
    assert_unchanged(reg, before, lambda: reg.add_concept("nudity", "style"), ConflictError, "already exists")
    assert_unchanged(reg, before, lambda: reg.add_concept("church", "building"), InvalidNameError, "kind")
    assert reg.get_concept("nudity").description == "naked bodies"
    assert [c.name for c in reg.list_concepts()] == ["nudity"]


def test_release_and_concept_names_never_collide(reg, model, nudity):
    reg.compose("safe", ["nudity@1"])
    before = snapshot(reg)
    assert_unchanged(reg, before, lambda: reg.compose("nudity", ["nudity@1"]), ConflictError, "name of a concept")
    assert_unchanged(reg, before, lambda: reg.add_concept("safe", "custom"), ConflictError, "name of a release")
    with pytest.raises(NotFoundError, match="'safe' is a release, not a concept"):
        reg.resolve_mask("safe")
    # Should both exist anyway (rows written by something else), a bare name is ambiguous.
    with reg._engine.begin() as connection:
        connection.execute(
            ConceptRow.__table__.insert().values(
                name="safe", kind="custom", description="", created_at=model.created_at
            )
        )
    with pytest.raises(AmbiguousRefError, match="both a concept and a release"):
        reg.resolve("safe")


def test_add_mask_checks_fingerprint_and_calibration(reg, model, nudity):
    other = reg.ensure_base_model("tiny/sdxl", FP_B)
    before = snapshot(reg)
    assert_unchanged(
        reg, before, lambda: reg.add_mask("nudity", make_mask(7, fingerprint=FP_B), model), ConflictError, "base model"
    )
    assert_unchanged(reg, before, lambda: reg.add_mask("nudity", make_mask(7), other), ConflictError)
    assert_unchanged(reg, before, lambda: reg.add_mask("nudity", make_mask(7), FP_A, calibration=99), NotFoundError)
    assert_unchanged(reg, before, lambda: reg.add_mask("ghost", make_mask(7), model), NotFoundError)
    prompts = reg.ensure_prompt_set(["a b"], ["c d"])
    cal_b = reg.add_calibration(
        make_stats(0, FP_B, 1, 1), other, prompts, dtype="float32", device="cpu", duration_s=1, library_versions={}
    )
    before = snapshot(reg)
    assert_unchanged(
        reg, before, lambda: reg.add_mask("nudity", make_mask(7), model, cal_b), ConflictError, "another base model"
    )


def test_reuse_existing_returns_the_same_version(reg, model, nudity):
    again = reg.add_mask("nudity", make_mask(2), model, reuse_existing=True)
    assert again.id == nudity[1].id
    events = len(reg.events())
    assert reg.add_mask("nudity", make_mask(2), model, reuse_existing=True).version == 2
    assert len(reg.events()) == events
    duplicate = reg.add_mask("nudity", make_mask(2), model)
    assert duplicate.version == 4 and duplicate.artifact_oid == nudity[1].artifact_oid


# ---------------------------------------------------------------- the reuse rule


def test_an_identical_mask_is_found_not_added(reg, model, nudity):
    """Same concept, base model and content: (the oldest such version, False), nothing written."""
    before = snapshot(reg)
    found, created = reg.get_or_add_mask("nudity", make_mask(2), model, description="other words", tags=["x"])
    assert (found, created) == (nudity[1], False)  # its own description and tags, as stored
    assert snapshot(reg) == before  # no row, no event, no object
    new, created = reg.get_or_add_mask("nudity", make_mask(4), model)
    assert created and new.ref == "nudity@4" and reg.events(1)[0].subject == "mask:nudity@4"
    assert reg.add_mask("nudity", make_mask(4), model, reuse_existing=True) == new  # the same rule
    other = reg.ensure_base_model("tiny/sdxl", FP_B)
    on_b, created = reg.get_or_add_mask("nudity", make_mask(2, fingerprint=FP_B), other)
    assert created and on_b.ref == "nudity@1"  # another base model is another mask


def test_a_release_with_the_latest_members_is_found_not_composed(reg, model, nudity):
    first, created = reg.get_or_compose("safe", ["nudity@1", "nudity@2"], notes="first")
    assert created and first.ref == "safe@1"
    before = snapshot(reg)
    again, created = reg.get_or_compose("safe", ["nudity@2", "nudity@1", "nudity@2"], notes="other notes")
    assert (again, created) == (first, False)  # order and repeats do not matter; notes are its own
    assert snapshot(reg) == before
    second, created = reg.get_or_compose("safe", ["nudity@3"])
    assert created and second.ref == "safe@2"
    back, created = reg.get_or_compose("safe", ["nudity@1", "nudity@2"])
    assert created and back.ref == "safe@3" and back.union_oid == first.union_oid  # only the latest counts
    assert [e.action for e in reg.events(3)] == ["release.compose"] * 3
    assert reg.compose("safe", ["nudity@1", "nudity@2"]).ref == "safe@4"  # compose always makes a version


# ---------------------------------------------------------------- entities from relationships


def _entities_from_plain_sql(reg) -> dict:
    """What the entities must say, read from the tables with plain joins (no ORM relationships)."""
    with reg._engine.connect() as connection:
        def rows(sql: str) -> list:
            return connection.execute(text(sql)).all()

        aliases: dict[int, list[str]] = {}
        for mask_id, name in rows("SELECT mask_id, name FROM aliases ORDER BY name"):
            aliases.setdefault(mask_id, []).append(name)
        members: dict[int, list[tuple[int, str]]] = {}
        for release_id, mask_id, concept, version in rows(
            "SELECT rm.release_id, m.id, c.name, m.version FROM release_members rm JOIN masks m ON m.id = rm.mask_id "
            "JOIN concepts c ON c.id = m.concept_id ORDER BY rm.release_id, rm.position"
        ):
            members.setdefault(release_id, []).append((mask_id, f"{concept}@{version}"))
        return {
            "masks": {
                mask_id: (concept, version, fingerprint, tuple(aliases.get(mask_id, ())))
                for mask_id, concept, version, fingerprint in rows(
                    "SELECT m.id, c.name, m.version, b.fingerprint FROM masks m JOIN concepts c ON c.id = m.concept_id "
                    "JOIN base_models b ON b.id = m.base_model_id"
                )
            },
            "releases": {
                release_id: (fingerprint, tuple(ref for _, ref in members[release_id]),
                             tuple(mask_id for mask_id, _ in members[release_id]))
                for release_id, fingerprint in rows(
                    "SELECT r.id, b.fingerprint FROM releases r JOIN base_models b ON b.id = r.base_model_id"
                )
            },
            "aliases": {
                alias_id: (concept, name, fingerprint, mask_id, version)
                for alias_id, concept, name, fingerprint, mask_id, version in rows(
                    "SELECT a.id, c.name, a.name, b.fingerprint, a.mask_id, m.version FROM aliases a "
                    "JOIN concepts c ON c.id = a.concept_id JOIN base_models b ON b.id = a.base_model_id "
                    "JOIN masks m ON m.id = a.mask_id"
                )
            },
            "calibrations": {
                cal_id: (fingerprint, content_hash)
                for cal_id, fingerprint, content_hash in rows(
                    "SELECT k.id, b.fingerprint, p.content_hash FROM calibrations k "
                    "JOIN base_models b ON b.id = k.base_model_id JOIN prompt_sets p ON p.id = k.prompt_set_id"
                )
            },
        }  # fmt: skip


def test_entities_follow_the_relationships_of_their_rows(reg, model, nudity):
    other = reg.ensure_base_model("tiny/sdxl", FP_B)
    reg.add_concept("van-gogh", "style")
    reg.add_mask("van-gogh", make_mask(20), model)
    reg.add_mask("nudity", make_mask(40, fingerprint=FP_B), other)
    reg.set_alias("nudity@3", "prod", base_model=FP_A)
    reg.set_alias("nudity@3", "b-side", base_model=FP_A)
    reg.set_alias("nudity@1", "prod", base_model=FP_B)
    reg.set_alias("nudity@1", "prod", base_model=FP_A)  # moved: the old target loses it
    reg.compose("safe", ["van-gogh", "nudity@3", "nudity@1"], base_model=FP_A)
    reg.compose("solo", ["nudity"], base_model=FP_B)
    prompts = reg.ensure_prompt_set(["a b", "c d"], ["e f", "g h"])
    reg.add_calibration(make_stats(1), model, prompts, dtype="float32", device="cpu", duration_s=1, library_versions={})
    expected = _entities_from_plain_sql(reg)
    masks = {m.id: (m.concept, m.version, m.base_model_fingerprint, m.aliases) for m in reg.list_masks()}
    assert masks == expected["masks"]
    assert masks[nudity[0].id][3] == ("prod",) and masks[nudity[2].id][3] == ("b-side",)
    releases = {r.id: (r.base_model_fingerprint, r.members, r.member_ids) for r in reg.list_releases()}
    assert releases == expected["releases"]
    assert reg.resolve_release("safe").members == ("van-gogh@1", "nudity@3", "nudity@1")
    aliases = {a.id: (a.concept, a.name, a.base_model_fingerprint, a.mask_id, a.mask_version) for a in reg.list_aliases()}
    assert aliases == expected["aliases"]
    calibrations = {c.id: (c.base_model_fingerprint, c.prompt_set_hash) for c in reg.list_calibrations()}
    assert calibrations == expected["calibrations"]
    for mask in reg.list_masks():  # one row, one entity: the same through every path
        assert reg.resolve_mask(mask) == reg.resolve_mask(mask.ref, base_model=mask.base_model_fingerprint) == mask


def test_listing_costs_the_same_queries_for_any_number_of_rows(reg, model, nudity):
    """Relationships load eagerly, per query, never once per row."""
    selects: list[str] = []
    sqlalchemy.event.listen(
        reg._engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: selects.append(sql)
    )

    def queries(call) -> int:
        selects.clear()
        call()
        return sum(sql.lstrip().upper().startswith("SELECT") for sql in selects)

    reg.set_alias("nudity@1", "prod")
    reg.compose("safe", ["nudity@1"])
    few = [queries(call) for call in (reg.list_masks, reg.list_releases, reg.list_aliases)]
    reg.add_concept("van-gogh", "style")
    for seed in range(5):
        reg.add_mask("van-gogh", make_mask(20 + seed), model)
        reg.set_alias(f"van-gogh@{seed + 1}", f"a{seed}")
    reg.compose("safe", ["nudity@1", "nudity@2", "van-gogh@1", "van-gogh@2", "van-gogh@3"])
    reg.compose("more", ["van-gogh@4", "van-gogh@5", "nudity@3"])
    assert [queries(call) for call in (reg.list_masks, reg.list_releases, reg.list_aliases)] == few


def test_tags_change_but_content_does_not(reg, nudity):
    tagged = reg.tag_mask("nudity@1", ["paper", "reviewed", "paper"])
    assert tagged.tags == ("paper", "reviewed")
    assert reg.tag_mask("nudity@1", ["draft"], remove=["paper"]).tags == ("draft", "reviewed")
    assert [m.ref for m in reg.list_masks(tag="draft")] == ["nudity@1"]
    assert reg.events(1)[0].action == "mask.tag"
    assert reg.resolve_mask("nudity@1").artifact_oid == nudity[0].artifact_oid
    assert not hasattr(reg, "update_mask")


# ---------------------------------------------------------------- deletes


def test_mask_in_a_release_cannot_be_deleted(reg, model, nudity):
    reg.compose("safe-v1", ["nudity@2"])
    reg.compose("safe-v1", ["nudity@2", "nudity@3"])
    before = snapshot(reg)
    error = assert_unchanged(reg, before, lambda: reg.delete_mask("nudity@2"), InUseError)
    assert "safe-v1@1, safe-v1@2" in str(error) and "nudity@2" in str(error)
    reg.set_alias("nudity@1", "prod")
    before = snapshot(reg)
    assert_unchanged(reg, before, lambda: reg.delete_mask("nudity@prod"), InUseError, "alias prod")


def test_delete_unused_mask_keeps_object_and_never_reuses_version(reg, model, nudity):
    deleted = reg.delete_mask("nudity@3")
    assert deleted.version == 3
    assert [m.version for m in reg.list_masks("nudity")] == [1, 2]
    assert reg.store.exists(deleted.artifact_oid)  # left for gc
    assert reg.events(1)[0].action == "mask.delete"
    assert reg.add_mask("nudity", make_mask(30), model).version == 4
    assert reg.resolve_mask("nudity").version == 4


# ---------------------------------------------------------------- releases, diff


def test_compose_is_order_independent(reg, model, nudity):
    reg.add_concept("van-gogh", "style")
    reg.add_mask("van-gogh", make_mask(20), model)
    first = reg.compose("safe-v1", ["nudity@1", "van-gogh", "nudity@3"], notes="first")
    second = reg.compose("safe-v1", ["nudity@3", "nudity@1", "van-gogh@1", "nudity@1"])
    assert isinstance(first, Release)
    assert (first.ref, second.ref) == ("safe-v1@1", "safe-v1@2")
    assert first.union_oid == second.union_oid
    assert first.members == ("nudity@1", "van-gogh@1", "nudity@3")
    assert second.members == ("nudity@3", "nudity@1", "van-gogh@1")  # duplicates dropped
    expected = union([make_mask(1), make_mask(20), make_mask(3)])
    assert reg.load_release_mask("safe-v1").equals(expected)
    assert reg.load_release_mask(first).num_masked == first.masked_total == expected.num_masked
    assert reg.resolve("safe-v1").version == 2
    assert reg.resolve_release("safe-v1@1").notes == "first"
    assert [r.ref for r in reg.list_releases()] == ["safe-v1@1", "safe-v1@2"]
    assert reg.load("safe-v1@1").equals(expected)
    with pytest.raises(InvalidNameError):
        reg.resolve_release("safe-v1@prod")


def test_compose_incompatible_masks_changes_nothing(reg, model, nudity):
    other = reg.ensure_base_model("tiny/sdxl", FP_B)
    for name in ("van-gogh", "church", "car"):
        reg.add_concept(name, "style" if name == "van-gogh" else "object")
    reg.add_mask("van-gogh", make_mask(21, fingerprint=FP_B), other)
    reg.add_mask("church", make_mask(22, hook="ffn_in"), model)
    reg.add_mask("car", make_mask(23, shapes={"down_blocks.0.ff.net.2": (8, 16)}), model)
    before = snapshot(reg)
    cases = [
        (["nudity@1", "van-gogh", "nudity@2"], "van-gogh.*base model"),
        (["nudity@1", "nudity@2", "church@1"], "church@1 has hook 'ffn_in'"),
        (["nudity@1", "car"], "car has other layers"),
    ]
    for refs, message in cases:
        assert_unchanged(reg, before, lambda refs=refs: reg.compose("safe", refs), IncompatibleMasksError, message)
    assert_unchanged(reg, before, lambda: reg.compose("safe", []), RegistryError, "at least one")
    assert_unchanged(reg, before, lambda: reg.compose("safe", ["nudity@1", "ghost"]), NotFoundError, "ghost")


def test_diff_reports_iou(reg, model):
    reg.add_concept("a", "custom")
    reg.add_concept("b", "custom")
    reg.add_mask("a", mask_from_sets({LAYER: list(range(10))}), model)
    reg.add_mask("b", mask_from_sets({LAYER: list(range(5, 15))}), model)
    result = reg.diff("a", "b@1")
    assert (result["ref_a"], result["ref_b"]) == ("a@1", "b@1")
    assert (result["a"], result["b"], result["both"]) == (10, 10, 5)
    assert result["iou"] == pytest.approx(5 / 15)
    assert result["layers"][LAYER]["iou"] == pytest.approx(5 / 15)
    release = reg.compose("ab", ["a", "b"])
    against_release = reg.diff("a@1", release.ref)
    assert against_release["both"] == 10 and against_release["iou"] == pytest.approx(10 / 15)
    assert reg.diff("ab", "ab@1")["iou"] == 1.0


# ---------------------------------------------------------------- calibrations


def test_calibrations_are_idempotent_and_checked(reg, model):
    prompts = reg.ensure_prompt_set(["a naked man", "a naked woman"], ["a man", "a woman"])
    assert reg.ensure_prompt_set(["a naked man", "a naked woman"], ["a man", "a woman"]) == prompts
    assert reg.ensure_prompt_set(["a naked woman", "a naked man"], ["a man", "a woman"]).id != prompts.id
    stats = make_stats(1)
    kwargs = dict(dtype=torch.float16, device="cpu", duration_s=2.5, library_versions={"torch": torch.__version__})
    cal = reg.add_calibration(stats, model, prompts, created_by="alice", git_rev="abc123", **kwargs)
    assert (cal.dtype, cal.num_inference_steps, cal.tau, cal.seed, cal.hook, cal.created_by) == (
        "float16",
        4,
        3,
        1,
        "ffn_out",
        "alice",
    )
    assert reg.add_calibration(stats, model, prompts.content_hash, **kwargs).id == cal.id
    loaded = reg.load_stats(cal)
    assert all(torch.equal(loaded.target[name], stats.target[name]) for name in SHAPES)
    assert reg.list_calibrations(model) == [cal] == [reg.get_calibration(cal.id)]
    before = snapshot(reg)
    assert_unchanged(
        reg, before, lambda: reg.add_calibration(make_stats(2, FP_B), model, prompts, **kwargs), ConflictError
    )
    assert_unchanged(
        reg, before, lambda: reg.add_calibration(make_stats(2, targets=3), model, prompts, **kwargs), ConflictError
    )
    assert_unchanged(reg, before, lambda: reg.add_calibration(stats, model, "0" * 64, **kwargs), NotFoundError)
    assert_unchanged(reg, before, lambda: reg.ensure_prompt_set("a naked man", ["a man"]), RegistryError)
    mask = reg.add_mask(reg.add_concept("nudity", "nudity"), make_mask(1), model, cal)
    assert mask.calibration_id == cal.id
    assert cal.stats_oid in reg.referenced_objects()


# ---------------------------------------------------------------- events, gc, verify


def test_every_mutation_is_an_event(reg, model, nudity):
    reg.set_alias("nudity@1", "prod")
    reg.compose("safe", ["nudity@prod"])
    reg.tag_mask("nudity@2", ["x"], created_by="bob")
    reg.delete_mask("nudity@3")
    events = reg.events()
    assert [e.action for e in events] == [
        "mask.delete", "mask.tag", "release.compose", "alias.set",
        "mask.add", "mask.add", "mask.add", "concept.add", "base_model.add",
    ]  # fmt: skip
    assert events[1].actor == "bob" and events[0].actor == "tester"
    assert events[2].subject == "release:safe@1" and events[2].details["members"] == ["nudity@1"]
    assert [e.id for e in reg.events(limit=2)] == [events[0].id, events[1].id]


def test_gc_dry_run_then_delete(reg, model, nudity):
    release = reg.compose("safe", ["nudity@1", "nudity@2"])
    gone = reg.delete_mask("nudity@3")
    stray = reg.store.put(b"not referenced by anything")
    garbage = sorted([gone.artifact_oid, stray])
    assert sorted(reg.gc()) == garbage
    assert all(reg.store.exists(oid) for oid in garbage)  # dry run deletes nothing
    assert sorted(reg.gc(dry_run=False)) == garbage
    assert not any(reg.store.exists(oid) for oid in garbage)
    assert reg.gc() == []
    kept = reg.referenced_objects()
    assert kept == {nudity[0].artifact_oid, nudity[1].artifact_oid, release.union_oid}
    assert all(reg.store.exists(oid) for oid in kept)
    assert reg.events(1)[0].action == "gc" and reg.verify() == []


def test_verify_finds_corrupt_and_missing_objects(reg, model, nudity):
    assert reg.verify() == []
    path = object_file(reg, nudity[0].artifact_oid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    reg.store.delete(nudity[1].artifact_oid)
    problems = dict(reg.verify())
    assert set(problems) == {nudity[0].artifact_oid, nudity[1].artifact_oid}
    assert "corrupt" in problems[nudity[0].artifact_oid]
    assert "missing" in problems[nudity[1].artifact_oid] and "mask nudity@2" in problems[nudity[1].artifact_oid]
    with pytest.raises(ValueError, match=nudity[0].artifact_oid):
        reg.load_mask("nudity@1")


def test_compose_restores_an_object_removed_meanwhile(reg, model, nudity):
    """A writer re-stores its object under the write lock, so a concurrent gc cannot orphan a row."""
    oid = reg.compose("safe", ["nudity@1"]).union_oid
    reg.store.delete(oid)
    assert reg.compose("safe", ["nudity@1"]).union_oid == oid
    assert reg.store.exists(oid)


def test_release_rows_reference_members(reg, model, nudity):
    release = reg.compose("safe", ["nudity@2", "nudity@1"])
    assert release.member_ids == (nudity[1].id, nudity[0].id)
    assert release.base_model_fingerprint == FP_A and release.hook == "ffn_out"
    with reg._engine.connect() as connection:
        assert connection.execute(ReleaseRow.__table__.select()).all()[0].name == "safe"


def test_concept_default_prompts_and_release_members(reg, model, nudity):
    prompts = reg.ensure_prompt_set(["a starry night painting"], ["a night painting"])
    concept = reg.add_concept("van-gogh", "style", "Van Gogh", prompt_set=prompts)
    assert concept.prompt_set_id == prompts.id and reg.get_concept("nudity").prompt_set_id is None
    assert reg.get_prompt_set(concept.prompt_set_id) == prompts == reg.get_prompt_set(prompts.content_hash)
    assert reg.events(1)[0].details["prompt_set"] == prompts.content_hash
    before = snapshot(reg)
    assert_unchanged(reg, before, lambda: reg.add_concept("church", "object", prompt_set=999), NotFoundError)
    with pytest.raises(NotFoundError):
        reg.get_prompt_set("f" * 64)
    # Member refs can be ambiguous across base models; release_members is not.
    other = reg.ensure_base_model("tiny/sdxl", FP_B)
    reg.add_mask("nudity", make_mask(40, fingerprint=FP_B), other)
    release = reg.compose("safe", ["nudity@3", "nudity@1"], base_model=FP_A)
    members = reg.release_members(release)
    assert [m.id for m in members] == [nudity[2].id, nudity[0].id]
    assert all(m.base_model_fingerprint == FP_A for m in members)


def test_a_lost_version_race_is_retried(reg, model, nudity, monkeypatch):
    """What PostgreSQL writers do when two pick the same number: the unique constraint rejects the
    second insert and the whole transaction runs again from a fresh snapshot."""
    real = Registry._next_version
    calls = []

    def stale_then_real(session, concept_id, base_model_id):
        calls.append(concept_id)
        return 2 if len(calls) == 1 else real(session, concept_id, base_model_id)  # 2: taken meanwhile

    monkeypatch.setattr(Registry, "_next_version", staticmethod(stale_then_real))
    assert reg.add_mask("nudity", make_mask(50), model).version == 4
    assert len(calls) == 2
    assert [m.version for m in reg.list_masks("nudity")] == [1, 2, 3, 4]
    assert [e.action for e in reg.events(2)] == ["mask.add", "mask.add"]  # no trace of the lost try
    assert len([e for e in reg.events() if e.action == "mask.add"]) == 4
