"""compt-scale: Chain-of-Models Pre-Training at scale."""
__version__ = "0.1.0"
