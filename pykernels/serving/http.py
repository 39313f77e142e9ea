"""Old home of ``pykernels serve``, kept only for ``pykernels/cli.py``'s import.

Delete this file once the CLI imports ``add_serve_arguments`` and ``run_serve``
from ``pykernels.serving.command``; nothing else may import it.
"""
from .command import add_serve_arguments, run_serve

__all__ = ["add_serve_arguments", "run_serve"]
