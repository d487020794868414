"""kvpolicy: KV-cache policies for next-scale (visual autoregressive) image models.

The core knows no model and no concrete policy. Policies register by name (built-in ones through
the ``kvpolicy.policies`` entry-point group), adapters call ``compress`` once per self-attention
layer and scale, and ``simulate`` plans memory without weights.
"""

from .attention_stats import AttentionStatistics, AttentionStatsCollector, calibration_measures, load_statistics
from .budget import Budget, Ratio, Tokens, parse_budget
from .cache import ByteLedger, CacheReport, KVCache, LayerCache
from .capabilities import Capabilities, capabilities
from .compose import compose
from .compress import CompressionResult, compress, gather_tokens
from .kept import KeptTokens, KeptTokensCache
from .plan import CapacityPlan
from .ragged import Ragged, ragged_attention
from .policy import CompressionContext, Policy, ScoredPolicy, Selection
from .registry import ENTRY_POINT_GROUP, get_policy, list_policies, policy_class, register_policy
from .schedule import ScaleSchedule
from .simulate import simulate
from . import scoring

__version__ = "0.1.0"

__all__ = [
    "AttentionStatistics", "AttentionStatsCollector", "calibration_measures", "load_statistics", "Budget", "Ratio",
    "Tokens", "parse_budget", "ByteLedger", "CacheReport", "KVCache", "LayerCache", "Capabilities", "capabilities",
    "compose", "Ragged", "ragged_attention", "CompressionResult",
    "compress", "gather_tokens", "KeptTokens", "KeptTokensCache", "CapacityPlan", "CompressionContext", "Policy", "ScoredPolicy",
    "Selection", "ENTRY_POINT_GROUP", "get_policy", "list_policies", "policy_class",
    "register_policy", "ScaleSchedule", "simulate", "scoring", "__version__",
]
