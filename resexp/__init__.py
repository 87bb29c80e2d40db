"""resexp: the plain-vs-residual experiments of He et al. 2015 (arXiv:1512.03385)."""

__version__ = "0.9.0"
