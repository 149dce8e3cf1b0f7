"""The reward stack: read an answer (`parse`), turn its scores into a reward (`aggregate`,
`RewardWeights`), check its boxes against the changed pixels (`grounding`), and the model-driven
`Scorer` (`sr_jax.reward.scorer`).

The package root re-exports the parser, the formula and grounding, which need only numpy and
PIL (data workers import `SCORE_RANGE`/`BOX_GRID` from here); `Scorer` pulls in JAX, so it is
imported from `sr_jax.reward.scorer`.
"""

from sr_jax.reward.aggregate import (
    AGGREGATION_MODES,
    OPTION_KEYS,
    RewardWeights,
    aggregate,
    aggregate_batch,
    clamp_for_parse_mode,
)
from sr_jax.reward.grounding import changed_mask, grounding_check, grounding_report, mask_bbox
from sr_jax.reward.parse import BOX_GRID, PARSE_MODES, SCORE_RANGE, parse_output

__all__ = [
    "AGGREGATION_MODES", "BOX_GRID", "OPTION_KEYS", "PARSE_MODES", "SCORE_RANGE", "RewardWeights",
    "aggregate", "aggregate_batch", "changed_mask", "clamp_for_parse_mode", "grounding_check",
    "grounding_report", "mask_bbox", "parse_output",
]
