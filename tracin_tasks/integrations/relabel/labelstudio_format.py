"""What Label Studio sees of a flagged row, and what comes back: the labeling configuration, a
task's data and prediction, and the reading of annotations into decisions' parts.

Kept apart from the sink (:mod:`.labelstudio`), which only talks to the server.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tracin_tasks._png import png_data_uri, to_pixels
from tracin_tasks.exceptions import ConfigurationError
from tracin_tasks.integrations.relabel.base import FlaggedBatch, FlaggedRow

#: names in the labeling configuration that deliveries and decisions rely on
CHOICES_NAME, NOTE_NAME, SUMMARY_NAME = "label", "note", "summary"


def label_config(classes: Sequence[int], kind: str) -> str:
    """The labeling interface: the example (``kind`` ``image``, ``table`` or ``none``), the audit's
    summary line, one choice per class, an optional note."""
    view = {
        "image": '  <Image name="image" value="$image" maxWidth="256px" zoom="true" zoomControl="true"/>\n',
        "table": '  <Table name="features" value="$features"/>\n',
        "none": "",
    }[kind]
    choices = "".join(f'    <Choice value="{int(c)}"/>\n' for c in classes)
    return (
        "<View>\n"
        '  <Header value="Is the given label right? Choose the correct class, or skip."/>\n'
        f"{view}"
        f'  <Text name="{SUMMARY_NAME}" value="${SUMMARY_NAME}"/>\n'
        f'  <Choices name="{CHOICES_NAME}" toName="{SUMMARY_NAME}" choice="single-radio" required="true" '
        'showInline="true">\n'
        f"{choices}"
        "  </Choices>\n"
        f'  <TextArea name="{NOTE_NAME}" toName="{SUMMARY_NAME}" placeholder="Note (optional)" rows="2" '
        'maxSubmissions="1" editable="true"/>\n'
        "</View>\n"
    )


def task_data(batch: FlaggedBatch, row: FlaggedRow, kind: str) -> dict[str, Any]:
    """What a task carries: the row's identity and audit figures, a summary line, and the example."""
    suggested = "none" if row.suggested_label is None else str(row.suggested_label)
    data: dict[str, Any] = {
        "row_id": row.row_id,
        "fingerprint": batch.fingerprint,
        "run_id": batch.run_id,
        "audit_key": batch.audit_key,
        "audit_run_id": batch.audit_run_id or "",
        "given_label": int(row.given_label),
        "suggested_label": row.suggested_label,
        "score": float(row.score),
        "rank": int(row.rank),
        "self_influence": row.self_influence,
        "reason": row.reason,
        SUMMARY_NAME: (f"Row {row.row_id}: given label {row.given_label}, suggested {suggested}. "
                       f"TracIn score {row.score:.4g}, rank {row.rank}"
                       + (f" ({row.reason})" if row.reason else "") + "."),
    }
    if kind == "image":
        data["image"] = image_data_uri(row.features, batch.input_shape)
    elif kind == "table":
        data["features"] = {f"x{i}": round(float(v), 6) for i, v in enumerate((row.features or [])[:256])}
    return data


def _prediction(batch: FlaggedBatch, row: FlaggedRow) -> dict[str, Any] | None:
    if row.suggested_label is None:
        return None
    return {
        "model_version": f"tracin-{batch.audit_key[:8]}",
        "score": float(row.score),
        "result": [{"from_name": CHOICES_NAME, "to_name": SUMMARY_NAME, "type": "choices",
                    "value": {"choices": [str(int(row.suggested_label))]}}],
    }


def _classes(batch: FlaggedBatch) -> list[int]:
    found = set(int(c) for c in batch.classes)
    for row in batch.rows:
        found.add(int(row.given_label))
        if row.suggested_label is not None:
            found.add(int(row.suggested_label))
    return sorted(found)


def _image_shape(shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    """(channels, height, width) when ``shape`` is an image: 2-D, or 3-D with 1 or 3 channels first or last."""
    if not shape:
        return None
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        if shape[0] in (1, 3) and min(shape[1:]) > 1:
            return shape
        if shape[2] in (1, 3) and min(shape[:2]) > 1:
            return (shape[2], shape[0], shape[1])
    return None


def _view_kind(batch: FlaggedBatch) -> str:
    with_features = [r for r in batch.rows if r.features]
    if not with_features:
        return "none"
    shape = _image_shape(batch.input_shape)
    if shape is not None and all(len(r.features) == math.prod(shape) for r in with_features):
        return "image"
    return "table"


def _config_kind(config: str) -> str:
    if "$image" in config:
        return "image"
    return "table" if "$features" in config else "none"


def _add_choices(config: str, classes: Sequence[int]) -> str:
    extra = "".join(f'<Choice value="{int(c)}"/>' for c in classes)
    pattern = re.compile(rf'(<Choices\b[^>]*\bname="{CHOICES_NAME}"[^>]*>)(.*?)(</Choices>)', re.S)
    if not pattern.search(config):
        raise ConfigurationError(f"Cannot find the Choices named {CHOICES_NAME!r} to add the classes {list(classes)}.")
    return pattern.sub(lambda m: m.group(1) + m.group(2) + extra + m.group(3), config, count=1)


def image_data_uri(features: Sequence[float] | None, input_shape: Sequence[int] | None,
                   min_side: int = 96) -> str:
    """A PNG ``data:`` URI of one example, scaled up (nearest neighbour) to at least ``min_side`` pixels.

    Values are stretched to 0..255 per image. Rows without features (or of another size) get a grey
    placeholder, so every task of an image project has an image.
    """
    shape = _image_shape(input_shape)
    if shape is None or not features or len(features) != math.prod(shape):
        pixels = np.full((8, 8), 200, dtype=np.uint8)
    else:
        pixels = to_pixels(np.asarray(features, dtype=np.float64).reshape(shape))
        pixels = pixels[0] if shape[0] == 1 else np.moveaxis(pixels, 0, -1)
    factor = max(1, -(-min_side // max(pixels.shape[:2])))
    pixels = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    return png_data_uri(pixels)


# -- small helpers -------------------------------------------------------------------------------


def _handled(task: Any) -> bool:
    """Someone submitted or skipped the task (it is then never refreshed)."""
    return bool(getattr(task, "total_annotations", 0) or getattr(task, "cancelled_annotations", 0)
                or getattr(task, "is_labeled", False) or getattr(task, "annotations", None))


def _as_dict(annotation: Any) -> dict[str, Any]:
    if isinstance(annotation, dict):
        return annotation
    return annotation.model_dump() if hasattr(annotation, "model_dump") else dict(vars(annotation))


def _when(annotation: dict[str, Any]) -> tuple[str, int]:
    return (_iso(annotation.get("updated_at") or annotation.get("created_at")) or "", _as_int(annotation.get("id"), 0))


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _chosen(annotation: dict[str, Any]) -> str | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") == CHOICES_NAME and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _note(annotation: dict[str, Any]) -> str | None:
    for item in annotation.get("result") or []:
        if item.get("from_name") == NOTE_NAME and item.get("type") == "textarea":
            text = " ".join(str(t) for t in (item.get("value") or {}).get("text") or [] if str(t).strip())
            return text or None
    return None


def _as_int(value: Any, default: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        text = body.get("detail") or body.get("validation_errors") or body
        return json.dumps(text, default=str)[:500] if not isinstance(text, str) else text[:500]
    return str(body)[:500]
