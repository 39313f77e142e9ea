"""The benchmark harness behind ``pykernels bench`` and the pytest-benchmark
suites in ``bench/``: one module per job.

``timing``   measure, check-then-time, baseline thread limits, fp32 peak
``machine``  the machine record of every figure, and ``pykernels info``
``results``  best-of, table cells, the ``--json`` document, exit status
``gemm``, ``linear``, ``attention``  each suite: shapes, problems (inputs and
             float64 references from ``pykernels.testing``), runner and tables

The CLI and ``bench/`` import the same shapes and problems from here, so the
table and the pytest-benchmark JSON measure the same thing. Nothing below the
harness (kernels, policy, models, serving) imports it.
"""
