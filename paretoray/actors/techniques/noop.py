"""No model work: the trial holds its actor for `sleep_s`, then reports a synthetic trade-off.

For the orchestration itself: tests that kill an actor mid-trial need a trial of known length,
and the controller's overhead benchmark needs trials that cost nothing but the controller.
Its metrics lie on a known curve (accuracy = knob, latency = 1 + 9·knob² ms), so a front exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from paretoray.actors.techniques.base import Technique, param, register


@register
@dataclass(frozen=True)
class Noop(Technique):
    sleep_s: float = param("float", 0.0, low=0.0, high=3600.0, doc="seconds the trial holds its actor")
    knob: float = param("float", 0.5, low=0.0, high=1.0, doc="position on the synthetic accuracy/latency curve")

    name = "noop"
    phase = "none"
    uses_model = False
    examples = {"default": {}, "high": {"knob": 0.9}}
    trial_timeout_s = 3660.0  # its longest sleep, and a minute

    def measure_without_model(self) -> dict[str, float]:
        time.sleep(self.sleep_s)
        latency_ms = 1.0 + 9.0 * self.knob**2
        return {"accuracy": self.knob, "latency_ms_per_token": latency_ms, "tokens_per_s": 1000.0 / latency_ms}
