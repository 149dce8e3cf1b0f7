"""GRPO for the SpatialReward vision-language model (`sr-jax rl`)."""
