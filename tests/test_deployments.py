"""deployments/prefect.yaml points at real flows with parameters those flows accept."""

import importlib.util
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("prefect")

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def _load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location("deploy_entry", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_entrypoint_and_parameters(deployment):
    flow = _load_flow(deployment["entrypoint"])
    accepted = set(flow.parameters.properties)
    given = set(deployment.get("parameters", {}))
    for trigger in deployment.get("triggers", []):
        given |= set(trigger.get("parameters", {}))
    assert given <= accepted, f"unknown parameters {given - accepted}"
    required = set(flow.parameters.required or [])
    if deployment.get("schedules") or deployment.get("triggers"):  # runs nobody starts by hand
        assert required <= given, f"required parameters not provided: {required - given}"
    # non-templated values must validate against the flow's own signature
    concrete = {k: v for k, v in deployment.get("parameters", {}).items() if not (isinstance(v, str) and "{{" in v)}
    flow.validate_parameters({**{r: "x" for r in required if r not in concrete}, **concrete})
    assert deployment["work_pool"]["name"] in {"tracin-cpu", "tracin-gpu"}
    assert deployment["work_pool"]["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tracin_tasks"


def test_nightly_schedule_is_a_valid_cron():
    from prefect.client.schemas.schedules import CronSchedule

    (nightly,) = [d for d in SPEC["deployments"] if d["name"] == "nightly-audit"]
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad expression


def test_event_trigger_matches_what_training_emits():
    from tracin_tasks.orchestration.events import TRAINING_FINISHED, run_resource

    (deployment,) = [d for d in SPEC["deployments"] if d["name"] == "audit-on-training-finished"]
    (trigger,) = deployment["triggers"]
    assert trigger["expect"] == [TRAINING_FINISHED]
    pattern = trigger["match"]["prefect.resource.id"].replace(".", r"\.").replace("*", ".*")
    assert re.fullmatch(pattern, run_resource("abc123")["prefect.resource.id"])
    assert trigger["parameters"]["run_id"] == "{{ event.payload.run_id }}"


def test_relabel_automation_matches_what_the_audit_emits():
    """Every value the automation templates from the event is in the event the audit emits."""
    import inspect

    from tracin_tasks.orchestration import relabel
    from tracin_tasks.orchestration.events import run_resource

    (deployment,) = [d for d in SPEC["deployments"] if d["name"] == "relabel-on-audit-flagged"]
    (trigger,) = deployment["triggers"]
    assert trigger["expect"] == [relabel.AUDIT_FLAGGED]
    pattern = trigger["match"]["prefect.resource.id"].replace(".", r"\.").replace("*", ".*")
    assert re.fullmatch(pattern, run_resource("abc123")["prefect.resource.id"])
    source = inspect.getsource(relabel.emit_audit_flagged)
    for value in trigger["parameters"].values():
        (key,) = re.findall(r"event\.payload\.(\w+)", value)
        assert f'"{key}":' in source, f"the audit's event has no payload key {key!r}"
    for sink in deployment["parameters"]["sinks"]:
        assert "api_key" not in sink and "secret_block=" in sink  # credentials never in parameters


#: parameters that decide which code an audit runs or what it may read: the operator sets them in
#: the deployment, and no event may (whoever can emit an event would choose the code)
OPERATOR_ONLY = {"trusted_modules", "model_factory", "model_kwargs", "allow_pickle", "max_parameters",
                 "mlflow_secret_block"}


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_no_trigger_chooses_code_or_trust(deployment):
    for trigger in deployment.get("triggers", []):
        assert not OPERATOR_ONLY & set(trigger.get("parameters", {})), trigger["parameters"]
