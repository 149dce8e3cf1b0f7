"""Data: records, tokenizer, image preprocessing, prompt templates and the Qwen3-VL processor."""

from sr_jax.data.pipeline import DataConfig, DataPipeline
from sr_jax.data.processor import IGNORE_INDEX, Processor
from sr_jax.data.records import Region, RecordError, SpatialExample
from sr_jax.data.templates import PromptTemplates
from sr_jax.data.tokenizer import QwenTokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "DataPipeline",
    "IGNORE_INDEX",
    "Processor",
    "PromptTemplates",
    "QwenTokenizer",
    "RecordError",
    "Region",
    "SpatialExample",
    "load_tokenizer",
]
