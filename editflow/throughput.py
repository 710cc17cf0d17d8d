"""FLOPs of the real training step (counted once with torch's FlopCounterMode) and MFU."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; MFU is reported only when known.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


def device_peak_tflops(override: float | None = None) -> float | None:
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in name), None)


def count_step_flops(step_fn) -> tuple[object, int]:
    """Run `step_fn` (forward + backward of one micro-batch) under the FLOP counter: (result, flops)."""
    counter = FlopCounterMode(display=False)
    with counter:
        result = step_fn()
    return result, counter.get_total_flops()


def flop_rates(flops_per_step: int | None, steps: float, seconds: float, processes: int,
               peak_tflops: float | None) -> dict[str, float]:
    """`tflops_per_s` per device over `steps` optimizer steps of the counted step's FLOPs, and `mfu` against
    the device's peak where it is known."""
    if not flops_per_step:
        return {}
    rates = {"tflops_per_s": flops_per_step * steps / max(seconds, 1e-9) / 1e12 / processes}
    if peak_tflops:
        rates["mfu"] = rates["tflops_per_s"] / peak_tflops
    return rates
