"""Token Merging (ToMe, Bolya et al., ICLR 2023) for timm Vision Transformers."""

from .context import MergeInfo, merging
from .flops import RCost, cost_table, flops, gmacs
from .merge import MERGE_RULES, bipartite_soft_matching
from .patch import UnsupportedModelError, patch
from .schedule import input_tokens, largest_useful_r, parse_r, parse_r_values, token_counts
from .visualize import visualize

__all__ = [
    "MERGE_RULES",
    "MergeInfo",
    "RCost",
    "UnsupportedModelError",
    "bipartite_soft_matching",
    "cost_table",
    "flops",
    "gmacs",
    "input_tokens",
    "largest_useful_r",
    "merging",
    "parse_r",
    "parse_r_values",
    "patch",
    "token_counts",
    "visualize",
]
