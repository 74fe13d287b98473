"""Tiling and stitching: run a network over a whole volume in windows and blend the results."""

from medseg.tiling.sliding import sliding_window_probabilities

__all__ = ["sliding_window_probabilities"]
