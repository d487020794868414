"""The typed schema of a ``results.jsonl`` row of ``kvpolicy compare`` (one image of one
configuration): written with ``to_json``, read back by the reports as plain dicts.

Bytes are counted bytes of the whole generate call divided by its images (CFG rows included); the
fidelity fields are None for the reference. The condition is stored under its kind ("prompt" or
"label"), so a row reads ``{"prompt": "a red cube", ...}`` or ``{"label": 3, ...}``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import attrs

from .metric_registry import PER_IMAGE, registered_metrics


@attrs.define(kw_only=True)
class ResultRow:
    key: str
    config_id: str
    model: str
    condition_index: int
    condition_kind: str
    condition: Any
    seed: int
    policy: str
    budget: Optional[str]
    policy_config: Optional[dict]
    budget_tokens: Optional[int]
    images_per_call: int
    kv_bytes_per_scale: list
    full_kv_bytes_per_scale: list
    kv_bytes_final: int
    kv_bytes_last_read: int
    peak_kv_bytes: int
    full_peak_kv_bytes: int
    kept_lengths_last_read: list
    device_peak_bytes: Optional[int]
    seconds_per_image: float
    seconds_per_call_repeats: list
    scale_seconds_per_image: list
    image: str
    settings: dict
    generation_config: Any
    versions: dict
    # registered per-image metrics (benchmarks.metric_registry), {row field: value}; written as
    # top-level fields, every registered one present (None for the reference)
    metrics: dict = attrs.field(factory=dict)
    identical_to_reference: Optional[bool] = None
    token_agreement_per_scale: Optional[list] = None
    finished_at: str = attrs.field(factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        row = attrs.asdict(self, recurse=False)
        kind, condition = row.pop("condition_kind"), row.pop("condition")
        values = row.pop("metrics")
        finished = row.pop("finished_at")
        row.update({m.field: values.get(m.field) for m in registered_metrics(PER_IMAGE)})
        row.update({k: v for k, v in values.items() if k not in row})
        row["finished_at"] = finished
        # the condition sits where the old rows had it: right after condition_index, under its kind
        ordered = {}
        for name, value in row.items():
            ordered[name] = value
            if name == "condition_index":
                ordered[kind] = condition
        return ordered


def jsonable(value):
    """``value`` as JSON would give it back (str() for what JSON cannot hold)."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)
