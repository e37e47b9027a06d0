"""Transfer faults armed at run time: the injector a transport calls at its named fault points.

    test ──DecodeReplica.arm_transfer_fault(route, FaultPlan)──▶ ArmedFaults.arm(plan)
    NixlTransport.read_blocks / send_notification ──▶ ArmedFaults(point): fail or delay, `times` times

A decode replica builds its transport with an `ArmedFaults` only when the app's config says
`decode.transfer_fault_injection: true` (test deployments); otherwise the transport has no injector
and arming is refused. The faults act inside the real transport on the real request path: a
"fail" makes the transport raise KVTransferError at that point, a "delay" sleeps there (past the
caller's timeout it becomes a timeout).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

from mixquant_serve.transfer.base import FAULT_POINT_AFTER_POST, FAULT_POINT_BEFORE_NOTIFY, FAULT_POINT_BEFORE_READ

FAULT_POINTS = (FAULT_POINT_BEFORE_READ, FAULT_POINT_AFTER_POST, FAULT_POINT_BEFORE_NOTIFY)
MAX_FAULT_DELAY_S = 600.0


@dataclass(frozen=True)
class FaultPlan:
    """At `point`, `action` ("fail" or "delay" by `delay_s`) the next `times` times the transport passes there."""

    point: str
    action: Literal["fail", "delay"]
    delay_s: float = 0.0
    times: int = 1

    def __post_init__(self) -> None:
        if self.point not in FAULT_POINTS:
            raise ValueError(f"point must be one of {FAULT_POINTS}, got {self.point!r}")
        if self.action not in ("fail", "delay"):
            raise ValueError(f"action must be 'fail' or 'delay', got {self.action!r}")
        if self.action == "delay" and not 0 < self.delay_s <= MAX_FAULT_DELAY_S:
            raise ValueError(f"delay_s must lie in (0, {MAX_FAULT_DELAY_S}] for a delay, got {self.delay_s}")
        if self.times < 1:
            raise ValueError(f"times must be >= 1, got {self.times}")


class InjectedFault(RuntimeError):
    """Raised at a fault point by a "fail" plan (the transport turns it into KVTransferError)."""


class ArmedFaults:
    """A FaultInjector (callable on a point name) whose plans are armed while the transport runs. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._remaining: list[tuple[FaultPlan, int]] = []
        self.fired: dict[str, int] = {point: 0 for point in FAULT_POINTS}

    def arm(self, plan: FaultPlan) -> None:
        with self._lock:
            self._remaining.append((plan, plan.times))

    def disarm(self) -> None:
        with self._lock:
            self._remaining.clear()

    def num_armed(self) -> int:
        with self._lock:
            return sum(times for _, times in self._remaining)

    def __call__(self, point: str) -> None:
        plan = self._take(point)
        if plan is None:
            return
        if plan.action == "delay":
            time.sleep(plan.delay_s)
        else:
            raise InjectedFault(f"injected failure at {point}")

    def _take(self, point: str) -> FaultPlan | None:
        """The first armed plan for `point`, one use spent; None when none is armed there."""
        with self._lock:
            for index, (plan, times) in enumerate(self._remaining):
                if plan.point == point:
                    if times == 1:
                        del self._remaining[index]
                    else:
                        self._remaining[index] = (plan, times - 1)
                    self.fired[point] += 1
                    return plan
        return None
