"""The token-level algorithms, plain PyTorch: which completion tokens carry the policy gradient. Forking-token
selection (``selection.py``: exact top-k per scope unit, the controls, loss weights, ``ForkingConfig``; its
names are re-exported here), the record of forking tokens a run writes (``log.py``) and the entropy
interventions as token rules (``token_rules.py``: Clip-Cov, KL-Cov, entropy-based advantage shaping). May import only
:mod:`rlvr.utils` (no TRL); the training components apply them (with the sparse LM head,
:mod:`rlvr.training.sparse_head`).
"""

from rlvr.forking.selection import (
    LOSS_NORMALIZATION_UNITS,
    NORMALIZATIONS,
    SCOPES,
    SELECTIONS,
    ForkingConfig,
    SelectionStats,
    count_to_keep,
    loss_normalization_unit,
    loss_weights,
    mask_gradient,
    quantile_threshold_mask,
    select_forking_tokens,
    selection_stats,
)

__all__ = [
    "LOSS_NORMALIZATION_UNITS",
    "NORMALIZATIONS",
    "SCOPES",
    "SELECTIONS",
    "ForkingConfig",
    "SelectionStats",
    "count_to_keep",
    "loss_normalization_unit",
    "loss_weights",
    "mask_gradient",
    "quantile_threshold_mask",
    "select_forking_tokens",
    "selection_stats",
]
