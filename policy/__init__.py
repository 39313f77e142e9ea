"""pykernels.policy: chooses kernel variant, precision, batch size and threads
from SLO targets (installed from the top-level ``policy/`` folder).

    from pykernels.policy import SLO, Policy, Profile, ops

    profile = Profile.load(recalibrate=True)          # or Profile.calibrate(quick=True)
    policy = Policy(SLO(p99_ms=5, max_rel_error=1e-2), profile)
    plan = policy.plan(ops.Linear(384, 1536), queued=3, arrival_rate=2000)
    print(plan.explain())
    policy.observe(plan, seconds=0.0021)               # measured service time of one batch
    with policy.active():                              # variant="auto" follows the policy
        pykernels.gemm(x, w)

Modules: ``slo`` (targets), ``ops`` (= ``pykernels.work``: work descriptions),
``profile`` (measured service times, cache files), ``calibration`` (measuring
them), ``cost`` (predictions), ``planning`` (the pure decision), ``plan`` (its
result), ``feedback`` (observed service times), ``planner`` (``Policy``, the
facade over them), ``adapter`` (service times for plan/observe-only policies).
Newcomers: docs/policy.md.
"""
from pykernels import work as ops  # the work descriptions live below the policy

from . import cost
from .cost import CostModel, ErrorReport, Prediction, cross_validate, heldout_error
from .planner import Alternative, Plan, Policy
from .profile import Measurement, Profile, ProfileWarning
from .slo import SLO

__all__ = [
    "Alternative", "CostModel", "ErrorReport", "Measurement", "Plan", "Policy", "Prediction",
    "Profile", "ProfileWarning", "SLO", "cost", "cross_validate", "heldout_error", "ops",
]
