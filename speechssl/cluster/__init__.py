"""Clustering on arrays and tensors (no data or model imports): :class:`KMeans` for discrete speech units."""
from speechssl.cluster.kmeans import KMeans

__all__ = ["KMeans"]
