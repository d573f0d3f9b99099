"""Planning an audit: read the run once, check everything that can be checked, split the work.

Nothing from the run is trusted before it is checked: the model factory must be trusted
(:mod:`tracin_tasks.integrations.model_factory`) and is first built on PyTorch's meta device (its
size against the ceiling, nothing allocated); each checkpoint's declared tensors are then compared
with that model before their data is read. A broken factory, a checkpoint of another
architecture or a diverged run, a missing layer or labels the model does not have fail the plan,
before any cell is stored.
"""

from __future__ import annotations

from tracin_tasks.core.preflight import check_finite_weights, check_labels_fit
from tracin_tasks.core.tracin import TracIn
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, plan_cells
from tracin_tasks.orchestration.sources import make_source
from tracin_tasks.orchestration.store import ResultsStore


def plan_audit(settings: AuditSettings, store: ResultsStore) -> AuditPlan:
    """Discover checkpoints and data, check them, check the store is writable, and plan the cells."""
    source = make_source(settings)
    refs = source.checkpoint_refs()
    table = source.training_table()
    spec = source.model_spec()
    meta_model = source.build_meta_model(spec)
    expected, name = meta_model.state_dict(), type(meta_model).__name__
    last = None
    for ref in refs:  # one at a time: each is downloaded into the cache the cells then read
        last = source.fetch(ref, expected=expected, model_name=name)
        check_finite_weights(last.load_state_dict(), last.step, settings.run_id)
    model = source.build_model(spec)
    TracIn(model, [last], settings.loss, settings.layer_selection())
    check_labels_fit(model, table.inputs(slice(0, 1)), table.labels, table.row_ids, settings.loss, settings.run_id)
    store.check_writable()
    checkpoints = [
        {"step": r.step, "learning_rate": r.learning_rate, "lr_source": r.lr_source, "kind": r.kind,
         "location": r.location}
        for r in refs
    ]
    plan = plan_cells(settings, checkpoints, len(table), table.fingerprint(), source.warnings, spec.to_dict())
    store.save_plan(plan)
    return plan
