"""Sharded decode (issue 11, section 1) on the 8 fake CPU devices of conftest.py.

generate(..., mesh=) must give the single device's tokens and logits (1e-5) with the cache split
over sequence (per-shard attention merged by log-sum-exp, core.decode_sharded), over batch, and
over kv heads (GQA, tensor); each device must hold 1/N of the cache bytes, counted from the
arrays' addressable shards. Meshes are combined to keep compiles few (each generate compile is a
few seconds): GQA on data=2 x tensor=2 x sequence=2 (all three splits at once), MLA on
data=2 x sequence=4; the byte counts also cover MLA on sequence=8 and on data=4 x tensor=2 (its
latent has no head axis: tensor leaves it whole).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import random_module, tiny

from mla_jax.core import sharding
from mla_jax.core.decode_plan import DecodePlan
from mla_jax.core.generate import decode_step_jit, generate
from mla_jax.core.model import Transformer, init_cache

PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]  # ragged: right-padded, lengths differ
NEW = 7  # 5 + 7 = 12 slots: 6 per shard on sequence=2, 3 on sequence=4
CONFIGS = {"gqa2": dict(attention="gqa", n_kv_heads=2), "mla": dict(attention="mla")}


@functools.lru_cache(maxsize=None)
def model_and_reference(variant):
  model = random_module(Transformer, tiny(**CONFIGS[variant]))
  return model, generate(model, PROMPTS, NEW, return_logits=True)


@pytest.mark.parametrize("variant, shape", [
    ("gqa2", {"data": 2, "tensor": 2, "sequence": 2}),  # batch, kv heads and length split
    ("mla", {"data": 2, "sequence": 4}),  # batch split 2 ways, length 4 ways
])
def test_sharded_generation_equals_one_device(variant, shape):
  model, (tokens, logits) = model_and_reference(variant)
  mesh = sharding.make_mesh(shape)
  out, out_logits = generate(model, PROMPTS, NEW, mesh=mesh, return_logits=True)
  assert out == tokens
  np.testing.assert_allclose(out_logits, logits, atol=1e-5)
  assert logits.shape == (4, NEW, 64) and float(np.std(logits)) > 0.3


@pytest.mark.parametrize("variant, shape, split", [
    ("gqa2", {"data": 2, "tensor": 2, "sequence": 2}, 8),
    ("mla", {"sequence": 8}, 8),
    ("mla", {"data": 4, "tensor": 2}, 4),  # replicated over tensor: no head axis to split
])
def test_each_device_holds_its_share_of_the_cache(variant, shape, split):
  cfg = tiny(**CONFIGS[variant])
  plan = DecodePlan.make(sharding.make_mesh(shape))
  cache = init_cache(cfg, 4, 16, plan)
  total = sum(x.nbytes for x in jax.tree.leaves(cache.layers))  # lengths [B] aside
  per_device = sharding.per_device_bytes(cache.layers)
  assert len(per_device) == 8 and set(per_device.values()) == {total // split}


def test_decode_step_keeps_the_sequence_shards():
  """A decode step over a sequence-sharded cache returns it still split 8 ways, the new token
  written on the shard owning its slot; its compiled code gathers nothing."""
  model, _ = model_and_reference("mla")
  plan = DecodePlan.make(sharding.make_mesh({"sequence": 8}))
  cache = init_cache(model.cfg, 4, 16, plan)
  graphdef, state = nnx.split(model)
  cache = cache.replace(lengths=jnp.array([0, 5, 9, 15], jnp.int32))
  total = sum(x.nbytes for x in jax.tree.leaves(cache.layers))
  tokens = jnp.ones((4, 1), jnp.int32)
  step = decode_step_jit.lower(graphdef, state, cache, tokens, plan).compile()
  assert "all-gather" not in step.as_text()  # only the partials' all-reduces cross devices
  logits, cache = step(state, cache, tokens)
  assert set(sharding.per_device_bytes(cache.layers).values()) == {total // 8}
  np.testing.assert_array_equal(cache.lengths, [1, 6, 10, 16])
  # Token b went to slot lengths[b]: only that slot of the latent is non-zero in its row.
  c = np.asarray(cache.layers[0].c)
  assert [np.flatnonzero(np.abs(c[b]).sum(-1)).tolist() for b in range(4)] == [[0], [5], [9], [15]]
  assert np.isfinite(np.asarray(logits)).all()


def test_more_sequence_shards_than_slots_is_one_line():
  model, _ = model_and_reference("mla")
  with pytest.raises(ValueError, match=r"^mesh\.sequence: 8 sequence shards exceed the cache of 3"):
    generate(model, [[1]], 2, mesh=sharding.make_mesh({"sequence": 8}))


def test_load_model_restores_into_the_mesh_shardings(tmp_path):
  """A checkpoint restored with mesh= lands in the table's shardings (each device reading only
  its shard) with the saved values; the loaded model then generates on that mesh."""
  from mla_jax.storage.checkpoint import Checkpointer
  from mla_jax.storage.workdir import Workdir, load_model

  model, (tokens, _) = model_and_reference("gqa2")
  state = nnx.state(model)
  Workdir.write_config(str(tmp_path), {"model": model.cfg.to_dict(), "data": {},
                                       "train": {"steps": 1}})
  with Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, {"count": jnp.zeros((), jnp.int32)}, None, {"step": 1})
    ckpt.wait()
  mesh = sharding.make_mesh({"data": 2, "tensor": 2, "sequence": 2})
  loaded = load_model(str(tmp_path), mesh=mesh)
  want = sharding.param_shardings(state, mesh)
  for (_, a), (_, b), (_, sh) in zip(*(nnx.to_flat_state(t) for t in (nnx.state(loaded), state,
                                                                       want))):
    assert a.get_value().sharding.is_equivalent_to(sh.get_value(), a.get_value().ndim)
    np.testing.assert_array_equal(a.get_value(), b.get_value())
  assert nnx.state(loaded)["blocks"][0]["attn"]["wq"].get_value().sharding.spec[1] == "tensor"
  assert generate(loaded, PROMPTS, NEW, mesh=mesh) == tokens


def test_eval_mesh_flags_errors_are_one_line():
  from mla_jax.evaluation.workdir_eval import EvalError, eval_mesh

  assert eval_mesh({"data": None, "sequence": None}) is None
  plan = eval_mesh({"sequence": 4})
  assert dict(plan.mesh.shape) == dict(data=2, fsdp=1, tensor=1, sequence=4)
  with pytest.raises(EvalError, match=r"^--mesh\.tensor=3: mesh\.data: .*do not divide the 8"):
    eval_mesh({"tensor": 3})
  with pytest.raises(ValueError, match=r"^--mesh\.sequence: 8 sequence shards do not divide"):
    eval_mesh({"sequence": 8}).check_cache_length(12, flag="--mesh.sequence")
