"""c2mf: concept discovery for vision models (C2MF, CRAFT, PCA) with heatmaps and metrics."""

__version__ = "0.1.0"
