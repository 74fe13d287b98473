"""Tiling and stitching: plan windows, run a network over them, blend the answers back into a volume.

``settings`` (what the config asks) → ``plan`` (where the windows go) → ``engine`` (cut, run, flip
TTA) → ``merge`` (weighted accumulation, full or memory-bounded) → ``slab``/``sinks`` (finished boxes to
labels, probabilities in memory or on disk) → ``to_source`` (probabilities resampled slab by slab to
the source grid, then labels).
"""

from medseg.tiling.engine import TilingResult, infer
from medseg.tiling.merge import Merger
from medseg.tiling.plan import PatchLocation, PatchPlan, axis_starts, network_divisors, plan_patches
from medseg.tiling.settings import TilingSettings, choose_memory_mode, plan_for
from medseg.tiling.sinks import LabelSink, ProbabilitySink, ProbabilityWriter
from medseg.tiling.slab import Slab, argmax_channels
from medseg.tiling.sliding import sliding_window_probabilities
from medseg.tiling.weights import ImportanceMap, importance_map

__all__ = [
    "ImportanceMap",
    "LabelSink",
    "Merger",
    "PatchLocation",
    "PatchPlan",
    "ProbabilitySink",
    "ProbabilityWriter",
    "Slab",
    "TilingResult",
    "TilingSettings",
    "argmax_channels",
    "axis_starts",
    "choose_memory_mode",
    "importance_map",
    "infer",
    "network_divisors",
    "plan_for",
    "plan_patches",
    "sliding_window_probabilities",
]
