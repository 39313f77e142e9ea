"""Models built on pykernels kernels."""
from .minilm import MiniLM

__all__ = ["MiniLM"]
