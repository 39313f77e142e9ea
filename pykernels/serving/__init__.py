"""pykernels.serving: a dynamic batcher with SLO classes for existing serving stacks.

    from pykernels.serving import DynamicBatcher, Overloaded

``DynamicBatcher(fn, policy=, classes=)`` forms batches per SLO class from the
policy's plans (earliest deadline first, bulk work cut into bounded chunks),
refuses at submit what cannot meet its deadline (``Overloaded``), and reports
per-class metrics (``metrics()``, ``prometheus()``). See ``batcher`` for the
design and ``sketch`` for the quantile sketch behind the latency percentiles.
"""
from .batcher import CLOSED_MESSAGE, DynamicBatcher, Overloaded, TooLarge
from .sizing import EncoderWork
from .sketch import QuantileSketch

__all__ = ["CLOSED_MESSAGE", "DynamicBatcher", "EncoderWork", "Overloaded", "QuantileSketch",
           "TooLarge"]
