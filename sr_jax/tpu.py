"""TPU generations and topologies, for compiling ahead of time without a TPU (`sr-jax plan --topology`).

With the `libtpu` wheel installed (`pip install -e ".[tpu]"`), `jax.experimental.topologies`
describes any TPU slice on a CPU host, and `jit(...).lower(...).compile()` runs the real TPU
compiler for its devices: its `memory_analysis()` is the TPU's HBM plan, its `cost_analysis()`
the TPU program's FLOPs and bytes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str               # our generation name (as in topology names: v5p:2x2x1, v6e-16)
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float    # bytes/s per chip
    hbm_bytes: int          # HBM per chip
    cores_per_chip: int     # TensorCores per chip: `vN-<count>` names count cores on v4/v5p
    dims: int               # topology dimensions (3-D torus or 2-D)
    ici_bandwidth: float | None = None  # bidirectional inter-chip interconnect bytes/s per chip
    chips_per_host: int = 4            # chips one TPU VM host drives (full host)
    min_chips: int = 1                 # smallest slice Cloud TPU provisions


GiB = 2**30
# Published per-chip figures, checked against the Cloud TPU system architecture pages (Nov 2026).
# Units as the page gives them: GiB where it says GiB, GB (1e9) where it says GB, so a plan that
# fits here fits the published capacity.
CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GBps, 2 TensorCores
    # per chip. The page lists no per-chip ICI figure; a v4-8 (2x2x1, 4 chips) is one host.
    "v4": TpuChip("v4", 275e12, 1200e9, 32 * GiB, 2, 3, None, 4, 4),
    # https://docs.cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GBps, ICI 400 GBps
    # bidirectional per chip, 8 chips per host, slices from 1 chip (v5litepod-1).
    "v5e": TpuChip("v5e", 197e12, 819e9, 16 * GiB, 1, 2, 400e9, 8, 1),
    # https://docs.cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GBps, ICI 1200 GBps
    # bidirectional per chip, 2 TensorCores per chip, 4-chip VMs; the smallest slice is 2x2x1 (v5p-8).
    "v5p": TpuChip("v5p", 459e12, 2765e9, 95 * GiB, 2, 3, 1200e9, 4, 4),
    # https://docs.cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps
    # bidirectional per chip, 8 chips per host, slices from 1 chip (v6e-1). (libtpu's compiler itself
    # reports 31.25 GiB available on a v6e chip; the published 32 GB = 29.8 GiB is the safer bound.)
    "v6e": TpuChip("v6e", 918e12, 1638e9, 32 * 10**9, 1, 2, 800e9, 8, 1),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: TpuChip
    shape: tuple[int, ...]  # chips along each torus axis

    @property
    def name(self) -> str:
        """The topology in `jax.experimental.topologies` form, e.g. v5p:2x4x4."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)


def _balanced(chips: int, dims: int) -> tuple[int, ...]:
    """Powers-of-two torus shape for `chips`, as even as possible, smallest axis first
    (the shapes Cloud TPU provisions: v5p-64 is 2x4x4, v6e-16 is 4x4, v6e-8 is 2x4)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: only powers of two have a standard slice shape; give the shape "
                         f"explicitly, e.g. v5p:2x2x3")
    shape = [1] * dims
    for _ in range(chips.bit_length() - 1):
        shape[shape.index(min(shape))] *= 2
    shape = sorted(shape)
    if dims == 3 and shape[0] == 1 and chips >= 4:  # a 3-D slice of 4 chips is 2x2x1
        shape = sorted(shape[1:]) + [1]
    return tuple(shape)


def parse_topology(text: str) -> Topology:
    """`v5p-64` (Cloud TPU accelerator type: TensorCores on v4/v5p, chips on v5e/v6e) or
    `v5p:4x4x2` / `v6e:2x2` (chips per torus axis)."""
    m = re.fullmatch(r"\s*([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))\s*", text.lower())
    gen = None if m is None else ALIASES.get(m.group(1), m.group(1))
    if m is None or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {text!r}: expected e.g. v5p-64, v6e-16, v5e-8, v4-32 or "
                         f"v5p:4x4x2, v6e:2x2 (generations {sorted(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(2):
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(f"{text}: {gen} accelerator types count TensorCores ({chip.cores_per_chip} per chip)")
        return Topology(chip, _balanced(count // chip.cores_per_chip, chip.dims))
    shape = tuple(int(x) for x in m.group(3).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
        raise ValueError(f"{text}: a {gen} topology has {chip.dims} axes of at least 1 chip")
    return Topology(chip, shape)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """The TPU devices of `topology` (no TPU needed; libtpu must be installed)."""
    from jax.experimental import topologies

    if not libtpu_available():
        raise RuntimeError("libtpu is not installed: pip install -e \".[tpu]\"")
    kwargs = {}
    if topology.chips < 4:  # libtpu assumes 2x2x1 chips per host: a 1- or 2-chip slice is one smaller host
        kwargs["chips_per_host_bounds"] = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **kwargs).devices)
