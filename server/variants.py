"""Which variant of a model version a device gets: the resource rule.

Each variant carries measured figures (`ModelRecord.details`, produced by `server.compression` and signed
with the variant): which runtimes compute it correctly, its accuracy, peak interpreter memory, latency and
bytes on the wire. For one device the rule is:

1. drop variants the operator's tolerance excluded, that the device already refused (bad), and that its
   runtime is not measured to compute correctly;
2. drop variants whose peak memory exceeds the device's memory budget (half its available memory) or whose
   latency exceeds the device's latency budget, when it declares one;
3. of the rest, take the most accurate; on a tie (within 0.1 point), the fewest bytes on the wire.

A deployment can pin one variant; it is still refused for a device whose runtime computes it wrongly.
With no variant that fits, the device gets nothing and the deployment reports why.
"""

from __future__ import annotations

from typing import Any

from server.storage import ModelRecord

MEMORY_BUDGET_FRACTION = 0.5
ACCURACY_TIE_POINTS = 0.1


def fits(record: ModelRecord, capabilities: dict[str, Any]) -> str:
    """Why `record` does not fit this device, or "" when it does."""
    details = record.details
    if details.get("excluded"):
        return f"excluded: {details['excluded']}"
    runtime = capabilities.get("runtime", "")
    correct_on = details.get("runtimes_ok")
    if correct_on is not None and runtime not in correct_on:
        return f"not computed correctly by {runtime or 'an unknown runtime'}"
    peak = int(details.get("peak_memory_bytes", 0))
    available = int(capabilities.get("memory_available_bytes", 0))
    if peak and available and peak > available * MEMORY_BUDGET_FRACTION:
        return f"needs {peak} bytes of memory, the device has {available} available"
    budget = float(capabilities.get("latency_budget_ms", 0) or 0)
    latency = float(details.get("latency_ms", {}).get(runtime, 0) or 0)
    if budget and latency > budget:
        return f"takes {latency:.2f} ms, over the device's {budget} ms budget"
    return ""


def choose_target(
    variants: list[ModelRecord], capabilities: dict[str, Any], bad_targets: list[str], pinned: str = ""
) -> str:
    """The target path this device should run, or "" when no variant fits."""
    candidates = [v for v in variants if v.target_path not in bad_targets and not fits(v, capabilities)]
    if pinned:
        candidates = [v for v in candidates if v.variant == pinned]
    if not candidates:
        return ""

    def accuracy(v: ModelRecord) -> float:
        return float(v.details.get("accuracy", 0.0) or 0.0)

    best = max(accuracy(v) for v in candidates)
    close = [v for v in candidates if best - accuracy(v) <= ACCURACY_TIE_POINTS / 100]
    return min(close, key=lambda v: (int(v.details.get("wire_bytes", v.length)), v.target_path)).target_path
