"""TFDS builder for the synthetic edit data (optional: needs `tensorflow-datasets`, not TensorFlow).

TFDS writes ArrayRecord shards; `load_split(builder, split)` reads them back as SpatialExamples
with the PNG bytes verbatim. Features:
  id, task, instruction, reasoning, target (canonical answer JSON), meta (JSON text): text
  score: float32 (2,); images: sequence of encoded image bytes (PNG);
  edit_region: sequence of {id: int32, label: text, bbox_2d: int32 (4,)}
Builder configs fix the seed, image size range and split sizes, so a build is reproducible.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from sr_jax.data.records import Region, SpatialExample
from sr_jax.data.synthetic import SynthConfig, generate_examples


@dataclasses.dataclass(eq=False)
class SynthBuilderConfig(tfds.core.BuilderConfig):
    seed: int = 0
    image_size: tuple[int, int] = (96, 256)
    split_sizes: tuple[tuple[str, int], ...] = (("train", 2000), ("validation", 100), ("test", 100))


FEATURES = {
    "id": tfds.features.Text(),
    "task": tfds.features.Text(),
    "instruction": tfds.features.Text(),
    "reasoning": tfds.features.Text(),
    "target": tfds.features.Text(),
    "meta": tfds.features.Text(),
    "score": tfds.features.Tensor(shape=(2,), dtype=np.float32),
    # Encoded bytes, not tfds Image: its decoder cannot be skipped without TensorFlow.
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "edit_region": tfds.features.Sequence({
        "id": tfds.features.Scalar(dtype=np.int32),
        "label": tfds.features.Text(),
        "bbox_2d": tfds.features.Tensor(shape=(4,), dtype=np.int32),
    }),
}  # fmt: skip


def to_features(e: SpatialExample) -> dict:
    return {
        "id": e.id, "task": e.task, "instruction": e.instruction, "reasoning": e.reasoning,
        "target": e.target_json(), "meta": json.dumps(e.meta), "score": np.asarray(e.score, np.float32),
        "images": list(e.images),
        "edit_region": {
            "id": np.asarray([r.id for r in e.edit_region], np.int32),
            "label": [r.label for r in e.edit_region],
            "bbox_2d": np.asarray([r.bbox_2d for r in e.edit_region], np.int32).reshape(-1, 4),
        },
    }  # fmt: skip


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_features(d: dict) -> SpatialExample:
    regions = d["edit_region"]
    return SpatialExample(
        id=_text(d["id"]),
        task=_text(d["task"]),
        images=[bytes(im) for im in d["images"]],
        instruction=_text(d["instruction"]),
        edit_region=[
            Region(int(i), _text(label), tuple(int(v) for v in box))
            for i, label, box in zip(regions["id"], regions["label"], regions["bbox_2d"])
        ],
        reasoning=_text(d["reasoning"]),
        score=tuple(float(s) for s in d["score"]),
        meta=json.loads(_text(d["meta"])),
    )


class SrJaxSynthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic spatial-edit examples (see sr_jax.data.synthetic for the rules)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [SynthBuilderConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(FEATURES))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name, n) for name, n in self.builder_config.split_sizes}

    def _generate_examples(self, split: str, n: int):
        cfg = SynthConfig(image_size=tuple(self.builder_config.image_size))
        for e in generate_examples(n, self.builder_config.seed, split, config=cfg):
            yield e.id, to_features(e)


def build(data_dir: str, config: SynthBuilderConfig | None = None) -> SrJaxSynthetic:
    builder = SrJaxSynthetic(config=config or SynthBuilderConfig(name="default"), data_dir=data_dir,
                             file_format="array_record")  # fmt: skip
    builder.download_and_prepare()
    return builder


def load_split(builder: SrJaxSynthetic, split: str) -> list[SpatialExample]:
    source = builder.as_data_source(split)
    return [from_features(source[i]) for i in range(len(source))]
