"""Typed training configs: the sections every stage's config holds (`model`, `train`, `run`);
each stage adds its own `data` (and RL its `grpo`, `rewards`).

Load with `sr_jax.config.load_config(TrainConfig, "configs/sft/x.yaml", ["optim.learning_rate=2e-5"])`.
Compute and parameter dtypes are `ModelConfig.dtype` / `ModelConfig.param_dtype`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from sr_jax.lora import LoRAConfig
from sr_jax.sharding import MeshConfig


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1          # of the total optimizer steps, rounded up (as HF's Trainer)
    warmup_steps: int | None = None    # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0          # floor of the decay, as a fraction of learning_rate
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0         # global-norm clipping; 0 disables
    # Parameters without weight decay: a leaf name (bias, scale = norm weights, embedding,
    # pos_embed) or a regex full-matched against the dotted parameter path.
    no_decay: list[str] = dataclasses.field(default_factory=lambda: ["bias", "scale", "embedding", "pos_embed"])


@dataclasses.dataclass
class LossConfig:
    # Static size of the buffer of labelled positions per microbatch (whole global microbatch).
    # The vocabulary projection runs only on these rows; None = every position (B * T).
    max_label_tokens: int | None = None
    # > 0: size that buffer per step instead, as the step's label count (counted on the host,
    # summed over hosts) rounded up to a multiple of this, capped at max_label_tokens. Padding
    # rows cost as much as real ones in the vocabulary projection; each distinct size compiles
    # its own step, so pick a coarse multiple. 0 = always max_label_tokens.
    label_bucket: int = 0
    # Rows per vocabulary-projection chunk (rematerialised in the backward pass); 0 = one chunk.
    chunk_size: int = 0
    # "token": mean over all label tokens of the (accumulated) batch (HF / LLaMA-Factory default;
    # long answers weigh more). "example": mean over examples (packed segments) of each
    # example's mean token loss.
    weighting: Literal["token", "example"] = "token"
    # Extra weight for the loss at positions whose target is one of these tokens, keyed by the
    # token's text (it must encode to exactly one token), e.g. {' [],': 10, ' [{"': 10}: the two
    # ways an SC answer's region list opens, i.e. the "was anything edited?" decision, one token per
    # answer. Under "token" weighting the loss stays a weighted mean (divided by the sum of weights).
    # The SFT stage resolves the texts to model ids (compact ids under a reduced vocabulary).
    token_weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    grad_accum_steps: int = 1          # microbatches per optimizer step (scanned inside one step)
    remat: Literal["none", "full", "save_dots"] = "none"
    freeze_vision: bool = False        # the whole vision tower, mergers included
    freeze: list[str] = dataclasses.field(default_factory=list)  # extra regexes over dotted param paths
    seed: int = 0


@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"                # architecture for random init: preset name or YAML path
    init_from: str | None = None        # start from weights: HF checkpoint or converted directory
    dtype: str = "float32"              # compute dtype
    param_dtype: str = "float32"        # stored parameter dtype
    overrides: list[str] = dataclasses.field(default_factory=list)  # key=value on the ModelConfig
    attention_backend: str | None = None  # auto | cpu | splash | cudnn (sr_jax.models.attention); None: the preset's
    scan_layers: bool | None = None     # run layers as lax.scans (ModelConfig.scan_layers); None: the preset's
    # "regex=std": after random init, parameters whose dotted path fullmatches regex are redrawn
    # from normal(0, std) (std 0 zeroes them). For models trained from scratch: e.g. a vision
    # position table big enough to matter next to the patch features. Presets only (not init_from).
    init_std: list[str] = dataclasses.field(default_factory=list)
    # A reduced vocabulary (sr_jax.data.vocab): None = the full vocabulary; a vocab_map.json path;
    # or `synthetic` = built from data.sources when the run starts. Saved in the run directory
    # (a resumed run keeps it) and in the exported model. A compact `init_from` model brings its own.
    vocab_map: str | None = None


@dataclasses.dataclass
class RunSection:
    out_dir: str = "runs/sft"
    total_steps: int | None = None      # None: epochs x records / global batch (pad-mode estimate)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    num_devices: int | None = None      # use the first N devices (default: all)
    peak_flops_per_device: float | None = None  # for MFU; default: known accelerators, else measured
    max_seconds: float | None = None    # wall-clock budget; stops (and checkpoints) when exceeded
    # With max_seconds: after 10 timed steps and 5% of the budget, shorten the lr schedule (total_steps)
    # to the steps that fit the budget, so a slow machine ends a complete schedule, not one cut mid-way.
    fit_schedule: bool = False
    save_model: bool = True             # write `out_dir/model` (LoRA merged) at the end
