"""Token Merging (ToMe, Bolya et al., ICLR 2023) for timm Vision Transformers."""

from .context import MergeInfo, merging
from .flops import flops
from .merge import bipartite_soft_matching
from .patch import UnsupportedModelError, patch
from .schedule import parse_r, token_counts
from .visualize import visualize

__all__ = [
    "MergeInfo",
    "UnsupportedModelError",
    "bipartite_soft_matching",
    "flops",
    "merging",
    "parse_r",
    "patch",
    "token_counts",
    "visualize",
]
