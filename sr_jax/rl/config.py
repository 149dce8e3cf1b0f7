"""Typed config of `sr-jax rl` (`configs/rl/*.yaml`).

Sections: `model`, `run` and `train` (mesh, optimizer, LoRA, remat, grad_accum_steps) are every
stage's (`sr_jax.train.config`); `data` says where prompts come
from, `grpo` holds the sampling and loss settings and `rewards` lists the reward functions by
name with their weights (see `sr_jax.rl.rewards.REWARD_FUNCTIONS`).
"""

from __future__ import annotations

import dataclasses

from sr_jax.data.image import MIN_PIXELS, RL_MAX_PIXELS
from sr_jax.data.templates import PromptTemplates
from sr_jax.special_tokens import DEFAULT_STOP_IDS
from sr_jax.train.config import ModelSection, RunSection, TrainConfig


@dataclasses.dataclass
class PromptDataConfig:
    # Same source syntax as SFT: ArrayRecord paths or `synthetic:n=...,seed=...,split=...`.
    sources: list[str] = dataclasses.field(default_factory=lambda: ["synthetic:n=256"])
    seed: int = 0
    shuffle: bool = True
    num_epochs: int = 1
    prompts_per_step: int = 4          # distinct prompts per rollout; rows = prompts_per_step * group_size
    tokenizer: str | None = None       # None: the model dir's tokenizer when it has one, else the offline Qwen one
    min_pixels: int = MIN_PIXELS
    max_pixels: int = RL_MAX_PIXELS    # SpatialReward's RL budget (MAX_PIXELS)
    max_prompt_tokens: int | None = None  # longer prompts are skipped (counted)
    templates: PromptTemplates = dataclasses.field(default_factory=PromptTemplates)


@dataclasses.dataclass
class GRPOConfig:
    group_size: int = 4                # completions sampled per prompt (G)
    beta: float = 0.02                 # KL penalty weight (k3 estimator); 0 = no reference model
    epsilon: float = 0.2               # ratio clip: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (symmetric clip)
    num_iterations: int = 1            # optimizer updates per rollout (old log-probs fixed across them)
    advantage_eps: float = 1e-4        # (r - mean) / (std + eps) within each group
    advantage_std_ddof: int = 1        # 1: sample std of the group (as torch.std), 0: population std
    max_completion_tokens: int = 1024
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.05
    generation_batch_size: int = 0     # rows per generate call; 0 = the whole rollout at once
    stop_ids: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_STOP_IDS))

    def validate(self) -> "GRPOConfig":
        checks = [
            (self.group_size >= 2, "grpo.group_size must be >= 2 (advantages compare completions of a prompt)"),
            (self.beta >= 0, "grpo.beta must be >= 0"),
            (0 < self.epsilon < 1, "grpo.epsilon must lie in (0, 1)"),
            (self.epsilon_high is None or self.epsilon_high > 0, "grpo.epsilon_high must be > 0"),
            (self.num_iterations >= 1, "grpo.num_iterations must be >= 1"),
            (self.max_completion_tokens >= 1, "grpo.max_completion_tokens must be >= 1"),
            (self.temperature > 0, "grpo.temperature must be > 0 (GRPO samples)"),
            (0 < self.top_p <= 1, "grpo.top_p must lie in (0, 1]"),
            (self.top_k >= 0, "grpo.top_k must be >= 0"),
            (self.repetition_penalty > 0, "grpo.repetition_penalty must be > 0"),
            (self.advantage_std_ddof in (0, 1), "grpo.advantage_std_ddof must be 0 or 1"),
            (bool(self.stop_ids), "grpo.stop_ids must not be empty"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("; ".join(errors))
        return self


@dataclasses.dataclass
class RewardSpec:
    name: str                          # a key of REWARD_FUNCTIONS
    weight: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of that reward's factory


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec("format", 0.2), RewardSpec("iou", 1.0), RewardSpec("score_error", 0.5),
            RewardSpec("empty_list", 0.3)]


@dataclasses.dataclass
class RLConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    rewards: list[RewardSpec] = dataclasses.field(default_factory=_default_rewards)
    run: RunSection = dataclasses.field(default_factory=lambda: RunSection(out_dir="runs/rl"))
