"""What a train step costs: FLOPs, achieved FLOP/s, MFU and device memory.

FLOPs per step come from XLA's cost analysis of the lowered step (the whole program, before
it is split across devices), read once the first step has run: the lowering is cached by
then, so the analysis adds no compilation. Where XLA gives no count, the usual estimate
``6 · N · tokens`` stands in (2 for the forward pass, 4 for the backward, per parameter and
token; it leaves out attention's quadratic term).

MFU (model FLOPs utilisation) is achieved FLOP/s over the devices' peak:
``flops_per_step / step_time / (peak_per_device · devices)``. JAX does not report a
device's peak, so it is read from ``PEAK_FLOPS`` by ``device_kind`` (published dense bf16
figures); for other devices, the CPU among them, no MFU is given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax

PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
}
"""Peak dense bfloat16 FLOP/s of one device, by ``jax.Device.device_kind``."""


def estimated_flops(num_params: int, tokens: int) -> float:
    """``6 · N · tokens``: a training step's FLOPs for ``N`` parameters (forward and backward)."""
    return 6.0 * num_params * tokens


def xla_flops(lowered: Any) -> float | None:
    """The FLOPs XLA's cost analysis counts in a lowered computation, if it counts any."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(analysis, Sequence) and not isinstance(analysis, dict):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_flops(devices: Sequence[Any]) -> float | None:
    """The summed peak FLOP/s of ``devices``, if every one's kind is in ``PEAK_FLOPS``."""
    peaks = [PEAK_FLOPS.get(getattr(d, "device_kind", "")) for d in devices]
    return float(sum(peaks)) if peaks and all(peaks) else None


def device_memory() -> dict[str, float]:
    """Bytes in use and their peak, on the busiest local device (where the backend says)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    stats = [s for s in stats if s]
    if not stats:
        return {}
    values = {"device_memory_bytes": max(s.get("bytes_in_use", 0) for s in stats)}
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        values["device_memory_peak_bytes"] = max(peaks)
    return {k: float(v) for k, v in values.items()}


class StepCost:
    """FLOPs per step for a run: the estimate at once, XLA's count when it is ready.

    ``analyse(lower)`` starts XLA's cost analysis on a thread of its own (it reads the
    step's cached lowering; it takes a fraction of a second and must not hold up steps).

    Attributes:
      flops_per_step: XLA's count once known, else the ``6 · N · tokens`` estimate.
      source: ``"xla"`` or ``"6N"``.
      peak: the devices' summed peak FLOP/s, or ``None``.
    """

    def __init__(self, num_params: int, tokens_per_step: int, devices: Sequence[Any]):
        self.flops_per_step = estimated_flops(num_params, tokens_per_step)
        self.source = "6N"
        self.peak = peak_flops(devices)
        self._thread: threading.Thread | None = None

    def analyse(self, lower: Callable[[], Any]) -> None:
        """Count the step's FLOPs with XLA in the background (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._count, args=(lower,), daemon=True)
            self._thread.start()

    def _count(self, lower: Callable[[], Any]) -> None:
        try:
            flops = xla_flops(lower())
        except Exception:  # the estimate stays
            return
        if flops is not None:
            self.flops_per_step, self.source = flops, "xla"

    def metrics(self, step_time_seconds: float | None) -> dict[str, float]:
        """``flops_per_step``, ``flops_per_second`` and ``mfu`` for a measured step time."""
        values = {"flops_per_step": self.flops_per_step}
        if step_time_seconds:
            achieved = self.flops_per_step / step_time_seconds
            values["flops_per_second"] = achieved
            if self.peak:
                values["mfu"] = achieved / self.peak
        return values
