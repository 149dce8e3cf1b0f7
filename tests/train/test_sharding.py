"""Mesh construction, the logical-axis rules, parameter/batch placement and activation constraints
(8 fake CPU devices, see conftest.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sr_jax import sharding
from sr_jax.lora import LoRAConfig, apply_lora
from sr_jax.config import ConfigError, load_config
from sr_jax.sharding import (DEFAULT_RULES, LOGICAL_AXIS_RULES, MeshConfig, active_rules, batch_shardings, constrain,
                             logical_to_spec, make_mesh, maybe_initialize_distributed, param_shardings, shard_batch,
                             shard_model, use_mesh)
from sr_jax.train.sft import SFTConfig

BATCH = ("data", "fsdp")


def test_mesh_config_resolves_fill_axis_and_rejects_bad_shapes():
    assert MeshConfig().resolve(8) == (1, 8, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=4).resolve(8) == (2, 1, 4)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(data=3, fsdp=-1).resolve(8)


def test_make_mesh_over_all_or_some_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_logical_to_spec_rules_fallback_and_unknown_names():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "seq", "act_embed")) == P(BATCH, None, None)
    assert logical_to_spec(("head_dim", None)) == P(None, None)
    # Not divisible by its mesh axes -> replicated, per dimension.
    assert logical_to_spec(("embed", "mlp"), shape=(6, 8), mesh=mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), shape=(3, 8), mesh=mesh) == P(None, "tensor")
    assert logical_to_spec(("batch", "seq"), shape=(6, 8), mesh=mesh) == P(None, None)  # 6 % 4
    # A mesh axis is used at most once per array.
    assert logical_to_spec(("embed", "vision_embed")) == P("fsdp", None)
    with pytest.raises(KeyError, match="no_such_axis"):
        logical_to_spec(("embed", "no_such_axis"))
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), shape=(4, 4), mesh=mesh)


def test_every_model_axis_has_a_rule(tiny_model):
    names = {a for _, v in nnx.to_flat_state(nnx.state(tiny_model)) for a in v.get_metadata()["logical_axes"]}
    assert names <= set(LOGICAL_AXIS_RULES), names - set(LOGICAL_AXIS_RULES)


def test_param_shardings_and_sharded_forward_equal_unsharded(make_tiny_model):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = make_tiny_model()  # shard_model below moves it
    specs = {k: v.get_value().spec for k, v in nnx.to_flat_state(param_shardings(model, mesh))}
    lm = ("model", "language_model")
    assert specs[lm + ("embed_tokens", "embedding")] == P("tensor", "fsdp")
    assert specs[lm + ("layers", 0, "self_attn", "q_proj", "kernel")] == P("fsdp", "tensor")
    assert specs[lm + ("layers", 0, "self_attn", "o_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[lm + ("layers", 0, "mlp", "down_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[lm + ("layers", 0, "self_attn", "q_norm", "scale")] == P(None)
    assert specs[lm + ("norm", "scale")] == P("fsdp")
    assert specs[("lm_head", "kernel")] == P("fsdp", "tensor")
    assert specs[("model", "visual", "blocks", 0, "attn", "qkv", "kernel")] == P("fsdp", "tensor")
    assert specs[("model", "visual", "pos_embed")] == P(None, "fsdp")
    assert specs[("model", "visual", "patch_embed", "proj", "kernel")] == P(None, "fsdp")
    with_lora = make_tiny_model()
    apply_lora(with_lora, LoRAConfig(rank=4, dropout=0.0))
    specs_lora = {k: v.get_value().spec for k, v in nnx.to_flat_state(param_shardings(with_lora, mesh))}
    q_lora = lm + ("layers", 0, "self_attn", "q_proj", "lora")
    assert specs_lora[q_lora + ("lora_a",)] == P("fsdp", None)  # (embed, lora_rank)
    assert specs_lora[q_lora + ("lora_b",)] == P(None, "tensor")  # (lora_rank, q_heads)

    ids = np.random.default_rng(0).integers(0, 900, (4, 12))
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, position_ids=jnp.broadcast_to(jnp.arange(12), (3, 4, 12)))

    expected = np.asarray(jax.jit(forward)(state, ids))
    shard_model(model, mesh)
    q = model.model.language_model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)
    ids_sharded = jax.device_put(ids, NamedSharding(mesh, P(BATCH, None)))
    with jax.set_mesh(mesh):  # activates the model's constraints
        got = jax.jit(forward)(nnx.state(model), ids_sharded)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "seq", "act_embed")) is x
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "seq", "mlp")))(x)
    assert y.sharding.spec == P(BATCH, None, "tensor")


def test_batch_shardings_and_shard_batch():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    batch = {"input_ids": np.zeros((2, 8, 16), np.int32), "position_ids": np.zeros((2, 3, 8, 16), np.int32),
             "pixel_values": np.zeros((2, 96, 1536), np.float32), "vision_segment": np.zeros((2, 96), np.int32),
             "labels": np.zeros((2, 6, 16), np.int32)}
    specs = {k: v.spec for k, v in batch_shardings(batch, mesh).items()}
    assert specs["input_ids"] == P(None, BATCH, None)
    assert specs["position_ids"] == P(None, None, BATCH, None)
    assert specs["pixel_values"] == P(None, BATCH, None)
    assert specs["vision_segment"] == P(None, BATCH)
    assert specs["labels"] == P(None, None, None)  # 6 rows do not split 8 ways: replicated
    placed = shard_batch(batch, mesh)
    assert placed["input_ids"].sharding.spec == P(None, BATCH, None)
    with pytest.raises(KeyError, match="images"):
        batch_shardings({"images": np.zeros((1, 2))}, mesh)


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert maybe_initialize_distributed() is False and not calls
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert maybe_initialize_distributed() is True and calls == [1]
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert maybe_initialize_distributed() is False and calls == [1]
    # An explicit coordinator takes the process count and id from the environment.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        maybe_initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert maybe_initialize_distributed() is True and calls[-1] == {"num_processes": 2, "process_id": 1}
    assert sharding.MESH_AXES == ("data", "fsdp", "tensor")


def test_use_mesh_sets_the_rules_constrain_applies_and_restores_them(tiny_model):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    x = jnp.ones((8, 4, 16))
    rules = MeshConfig(rules={"batch": ["data"], "mlp": "fsdp"}).axis_rules()
    with use_mesh(mesh, rules):
        assert active_rules() is not DEFAULT_RULES and active_rules()["batch"] == ("data",)
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "seq", "mlp")))(x)
    assert y.sharding.spec == P("data", None, "fsdp")
    assert active_rules() is DEFAULT_RULES  # the block's rules end with it
    with use_mesh(mesh):  # no rules: today's table
        y = jax.jit(lambda a: constrain(a * 3, ("batch", "seq", "mlp")))(x)
    assert y.sharding.spec == P(BATCH, None, "tensor")
    # Parameter and batch placement take the rules explicitly.
    specs = {k: v.get_value().spec for k, v in nnx.to_flat_state(param_shardings(tiny_model, mesh, rules))}
    assert specs[("model", "language_model", "layers", 0, "mlp", "down_proj", "kernel")] == P("fsdp", None)
    assert batch_shardings({"input_ids": np.zeros((1, 8, 4), np.int32)}, mesh, rules)["input_ids"].spec \
        == P(None, "data", None)


def test_rule_overrides_are_checked_by_name():
    rules = MeshConfig(rules={"embed": [], "vocab": None, "mlp": "fsdp", "batch": ["fsdp", "data"]}).axis_rules()
    assert (rules["embed"], rules["vocab"], rules["mlp"], rules["batch"]) == ((), (), ("fsdp",), ("fsdp", "data"))
    assert rules["q_heads"] == LOGICAL_AXIS_RULES["q_heads"] and len(rules) == len(LOGICAL_AXIS_RULES)
    assert MeshConfig().axis_rules() == DEFAULT_RULES and hash(MeshConfig().axis_rules()) == hash(DEFAULT_RULES)
    for override, message in [
        ("train.mesh.rules.mlpp=[fsdp]", "train.mesh.rules.mlpp: unknown logical axis 'mlpp'"),
        ("train.mesh.rules.mlp=[fsdp,pipeline]", "train.mesh.rules.mlp: unknown mesh axis 'pipeline'"),
        ("train.mesh.rules.mlp=[fsdp,fsdp]", "train.mesh.rules.mlp: mesh axis listed twice"),
        ("train.mesh.rules.mlp=3", "train.mesh.rules.mlp: expected a list of mesh axes"),
        ("train.mesh.rules=[fsdp]", "train.mesh.rules: expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(SFTConfig, None, [override])
    cfg = load_config(SFTConfig, None, ["train.mesh.rules.embed=[]", "train.mesh.fsdp=4"])
    assert cfg.train.mesh.rules == {"embed": []} and cfg.train.mesh.fsdp == 4
