"""Models built on pykernels kernels."""
from .bert import BertEmbedder
from .minilm import MiniLM

__all__ = ["BertEmbedder", "MiniLM"]
