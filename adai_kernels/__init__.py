"""adai-kernels: fused Adai (Adaptive Inertia) optimizer kernels for PyTorch."""
from .optimizer import Adai, AdaiV2, AdaiW

__all__ = ["Adai", "AdaiW", "AdaiV2"]
__version__ = "0.1.0"
