"""plan_cells and AuditSettings: deterministic, settings-keyed cells; validation of settings.

Pure functions: no Prefect run, no MLflow, no file system.
"""

from __future__ import annotations

import json
import re

import pytest

from tracin_tasks.exceptions import ConfigurationError, TracInError
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, Cell, plan_cells

N_ROWS = 1797
FINGERPRINT = "f" * 16
CHECKPOINTS = [
    {"step": s, "learning_rate": lr, "lr_source": "metric", "kind": "artifact",
     "location": f"checkpoints/step_{s}/state_dict.pt"}
    for s, lr in ((1, 0.05), (2, 0.0375), (3, 0.0125))
]


def make_plan(checkpoints=CHECKPOINTS, n_rows=N_ROWS, fingerprint=FINGERPRINT, **settings) -> AuditPlan:
    settings.setdefault("run_id", "run-abc")
    settings.setdefault("shard_size", 600)
    return plan_cells(AuditSettings(**settings), checkpoints, n_rows, fingerprint)


def keys(plan: AuditPlan) -> dict[tuple[int, int, int], str]:
    """(step, row_start, row_stop) -> cell key."""
    return {(c.step, c.row_start, c.row_stop): c.key for c in plan.cells}


# -- the cells ---------------------------------------------------------------------------------
def test_cells_are_checkpoint_by_shard_in_order():
    plan = make_plan()
    assert [(c.step, c.row_start, c.row_stop) for c in plan.cells] == [
        (s, a, b) for s in (1, 2, 3) for a, b in ((0, 600), (600, 1200), (1200, 1797))
    ]
    assert [c.learning_rate for c in plan.cells[::3]] == [0.05, 0.0375, 0.0125]
    assert {c.location for c in plan.cells if c.step == 2} == {"checkpoints/step_2/state_dict.pt"}
    assert plan.n_rows == N_ROWS and plan.fingerprint == FINGERPRINT
    assert len({c.key for c in plan.cells}) == len(plan.cells), "every cell has its own key"
    assert len({c.name for c in plan.cells}) == len(plan.cells)


def test_names_and_keys_are_deterministic():
    a, b = make_plan(), make_plan()
    assert a == b
    assert [c.name for c in a.cells] == [c.name for c in b.cells]
    assert re.fullmatch(r"[0-9a-f]{16}", a.audit_key)
    first = a.cells[0]
    assert re.fullmatch(r"[0-9a-f]{12}", first.key)
    assert first.name == f"step000001_rows000000000-000000600_{first.key}"
    assert first.label == "checkpoint step 1, rows 0-599"
    # independent of how the checkpoint dicts are ordered internally or what extra fields they carry
    shuffled = [dict(reversed(list(c.items())), extra="ignored") for c in CHECKPOINTS]
    assert keys(make_plan(checkpoints=shuffled)) == keys(a)


def test_plan_and_cells_round_trip_through_json():
    plan = make_plan(layers=["fc1", "fc2"], steps=[1, 2, 3], max_checkpoints=3, device="cpu")
    back = AuditPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert Cell.from_dict(json.loads(json.dumps(plan.cells[4].to_dict()))) == plan.cells[4]


@pytest.mark.parametrize(
    "change",
    [
        {"layers": "last"},
        {"layers": ["fc2"]},
        {"loss": "mse"},
        {"fingerprint": "0" * 16},
        {"run_id": "another-run"},
        {"model_factory": "pkg.mod:build"},
    ],
    ids=["layers-last", "layers-names", "loss", "fingerprint", "run", "model-factory"],
)
def test_scoring_settings_change_every_key(change):
    base = make_plan()
    other = make_plan(**change)
    assert other.audit_key != base.audit_key
    assert keys(other).keys() == keys(base).keys()
    for where, key in keys(base).items():
        assert keys(other)[where] != key, where


@pytest.mark.parametrize(
    "field,value",
    [("learning_rate", 0.5), ("location", "checkpoints/step_2/other.pt"), ("kind", "logged_model")],
)
def test_a_changed_checkpoint_changes_only_its_cells(field, value):
    base = make_plan()
    changed = [dict(c, **({field: value} if c["step"] == 2 else {})) for c in CHECKPOINTS]
    other = make_plan(checkpoints=changed)
    assert other.audit_key != base.audit_key
    for (step, a, b), key in keys(base).items():
        if step == 2:
            assert keys(other)[(step, a, b)] != key
        else:
            assert keys(other)[(step, a, b)] == key


def test_a_changed_step_changes_that_checkpoints_cells():
    changed = [dict(c, step=4) if c["step"] == 3 else c for c in CHECKPOINTS]
    base, other = make_plan(), make_plan(checkpoints=changed)
    assert other.audit_key != base.audit_key
    assert {k for (s, *_), k in keys(base).items() if s == 3}.isdisjoint(keys(other).values())
    assert {k for (s, *_), k in keys(base).items() if s < 3} <= set(keys(other).values())


def test_the_row_range_is_in_the_key():
    by_600, by_1200 = keys(make_plan(shard_size=600)), keys(make_plan(shard_size=1200))
    for step in (1, 2, 3):
        assert by_600[(step, 0, 600)] != by_1200[(step, 0, 1200)]
        # rows 1200-1797 are a shard of both plans: same rows, same key (the stored cell is reused)
        assert by_600[(step, 1200, 1797)] == by_1200[(step, 1200, 1797)]
    assert len({k for (s, *_), k in by_600.items() if s == 1}) == 3


def test_batch_size_device_and_identical_shards_keep_every_key():
    """Settings that do not change scores do not change keys: the stored cells stay valid."""
    base = make_plan(n_rows=500, shard_size=600, batch_size=256)
    for change in ({"batch_size": 7}, {"device": "cpu"}, {"shard_size": 4096}, {"allow_pickle": True}):
        other = make_plan(n_rows=500, **{"shard_size": 600, "batch_size": 256, **change})
        assert other.audit_key == base.audit_key, change
        assert [c.name for c in other.cells] == [c.name for c in base.cells], change


def test_planning_needs_checkpoints_and_rows():
    with pytest.raises(ConfigurationError, match="at least one checkpoint"):
        make_plan(checkpoints=[])
    with pytest.raises(ConfigurationError, match="at least one training row"):
        make_plan(n_rows=0)


# -- AuditSettings -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"run_id": ""}, "run_id"),
        ({"run_id": "   "}, "run_id"),
        ({"run_id": None}, "run_id"),
        ({"run_id": 123}, "run_id"),
        ({"loss": "hinge"}, "loss"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": "64"}, "batch_size"),
        ({"shard_size": 0}, "shard_size"),
        ({"shard_size": False}, "shard_size"),
        ({"device": "tpu"}, "device"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_invalid_settings_raise_configuration_error(kwargs, match):
    kwargs = {"run_id": "run-abc", **kwargs}
    with pytest.raises(ConfigurationError, match=match) as info:
        AuditSettings(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TracInError)


def test_settings_normalise_lists_and_round_trip():
    s = AuditSettings(run_id="r", layers=["fc1", "fc2"], steps=["1", 3], device="cuda:1")
    assert s.layers == ("fc1", "fc2") and s.steps == (1, 3)
    d = s.to_dict()
    assert d["layers"] == ["fc1", "fc2"] and d["steps"] == [1, 3]
    assert json.loads(json.dumps(d)) == d
    assert AuditSettings.from_dict(d) == s
    assert AuditSettings(run_id="r", steps="every:2").to_dict()["steps"] == "every:2"


def test_config_hash_follows_scoring_fields_only():
    base = AuditSettings(run_id="r")
    assert AuditSettings(run_id="r", batch_size=3, shard_size=10, device="cpu").config_hash() == base.config_hash()
    assert AuditSettings(run_id="r", layers="last").config_hash() != base.config_hash()
    assert AuditSettings(run_id="r", loss="mse").config_hash() != base.config_hash()
