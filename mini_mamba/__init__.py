"""mini-mamba: Mamba's selective scan, read top to bottom — and the Mamba block and language model built on it."""
from .mamba import MambaConfig, MambaLM
from .scan import selective_scan

__all__ = ["MambaConfig", "MambaLM", "selective_scan"]
