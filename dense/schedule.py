"""When and how strongly the layout acts during sampling (docs/densediffusion.md §7).

DenseDiffusion edits only the first 30% of the steps, with a weight that decays fast from near 1: the layout
matters while the composition forms and is released for the details. The weight reads the sigma before SD3's
time shift (`samplers.schedule.unshifted`), so its decay does not depend on the model's shift.
"""

from __future__ import annotations

from collections.abc import Sequence

from samplers.schedule import unshifted


def active_steps(num_steps: int, fraction: float = 0.3) -> int:
    """How many leading steps are edited: Python's round(fraction·K) (3 of 10, 8 of 28, 15 of 50)."""
    return round(fraction * num_steps)


def step_lambdas(
    sigmas: Sequence[float], num_steps: int, *, shift: float, strength: float = 1.0, power: float = 5.0,
    fraction: float = 0.3,
) -> tuple[float, ...]:
    """λ_k = strength · u_k^p for the active steps k < round(fraction·K); steps past the end are inactive.

    `sigmas` are the sampler's sigmas, σ_k being the one at which step k calls the model (a trailing 0 is
    fine: only the first `num_steps` entries are read).
    """
    if len(sigmas) < num_steps:
        raise ValueError(f"need a sigma for each of the {num_steps} steps, got {len(sigmas)}")
    n = active_steps(num_steps, fraction)
    return tuple(strength * unshifted(float(sigmas[k]), shift) ** power for k in range(n))
