"""The quantile sketch behind the serving latency percentiles.

One implementation serves the policy engine and the serving layer:
``pykernels.policy.sketch`` (a DDSketch-style log-bucket sketch, 1% relative
error by default; the Cython build when it is there, else its pure-Python twin).
This module re-exports it under its historical name.
"""
from pykernels.policy.sketch import IMPLEMENTATION, PyQuantileSketch, QuantileSketch

__all__ = ["IMPLEMENTATION", "PyQuantileSketch", "QuantileSketch"]
