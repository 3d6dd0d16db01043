"""Sharding: logical axes -> mesh axes on 8 fake CPU devices (set up by conftest.py).

Parameters are born sharded inside `jax.jit(..., out_shardings=param_shardings(abstract state))`;
each one's actual placement must be what DEFAULT_RULES says for its `axes` metadata.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_helpers import FAST_COMPILE, tiny

from mla_jax.core import sharding
from mla_jax.core.model import Transformer, init_cache

CONFIGS = {"gqa2": dict(attention="gqa", n_kv_heads=2), "mqa": dict(attention="mqa"),
           "mla_q8": dict(attention="mla", q_lora_rank=8)}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest.py should give 8 fake CPU devices"
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@functools.lru_cache(maxsize=None)
def build_sharded(variant):
  """Abstract model -> shardings -> real params created already sharded, on the data=2, fsdp=2,
  tensor=2 mesh. Returns (mesh, graphdef, state, the shardings tree); cached per variant."""
  cfg = tiny(**CONFIGS[variant])
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = sharding.param_shardings(abstract_state, mesh)
  init = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))[1], out_shardings=shardings,
                 compiler_options=FAST_COMPILE)
  return mesh, graphdef, init(), shardings


def rules_spec(axes, shape, mesh):
  """What the DEFAULT_RULES table says, derived independently of sharding.logical_to_spec:
  each logical name's mesh axes, keeping those of size > 1 that divide the dim (cumulatively)."""
  spec = []
  for name, dim in zip(axes, shape):
    target = sharding.DEFAULT_RULES[name]
    kept, size = [], 1
    for axis in ((target,) if isinstance(target, str) else target or ()):
      if mesh.shape[axis] > 1 and dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return tuple(spec)


def normalise(spec, ndim):
  """PartitionSpec -> tuple of length ndim; 1-tuples of mesh axes become the bare name."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries)


def assert_placed(array, mesh, want):
  assert normalise(array.sharding.spec, array.ndim) == tuple(want), (array.sharding.spec, want)
  assert array.sharding.is_equivalent_to(NamedSharding(mesh, P(*want)), array.ndim)


def params_by_name(state):
  """{'blocks.0.attn.wq': Param, ...}"""
  flat = jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
          for path, v in flat}


# What DEFAULT_RULES gives on data=2, fsdp=2, tensor=2 for tiny() (D 32, H 4, F 128, V 64).
COMMON = {
    "embed.table": ("tensor", "fsdp"),  # (vocab, embed)
    "final_norm.scale": (None,),
    "blocks.0.attn_norm.scale": (None,),
    "blocks.0.mlp.gate": ("fsdp", "tensor"),  # (embed, mlp)
    "blocks.0.mlp.up": ("fsdp", "tensor"),
    "blocks.0.mlp.down": ("tensor", "fsdp"),  # (mlp, embed)
    "blocks.0.attn.wo": ("tensor", None, "fsdp"),  # (heads, head_dim, embed)
}
EXPECTED = {
    "gqa2": {**COMMON,
             "blocks.0.attn.wq": ("fsdp", "tensor", None),  # (embed, heads, head_dim)
             "blocks.0.attn.wk": ("fsdp", "tensor", None),  # 2 kv heads split over tensor=2
             "blocks.0.attn.wv": ("fsdp", "tensor", None)},
    "mqa": {**COMMON,
            "blocks.0.attn.wq": ("fsdp", "tensor", None),
            "blocks.0.attn.wk": ("fsdp", None, None),  # the single kv head stays whole
            "blocks.0.attn.wv": ("fsdp", None, None)},
    "mla_q8": {**COMMON,
               "blocks.0.attn.wq_a": ("fsdp", None),  # (embed, q_latent)
               "blocks.0.attn.q_norm.scale": (None,),
               "blocks.0.attn.wq_b": (None, "tensor", None),  # (q_latent, heads, head_dim)
               "blocks.0.attn.wkv_a": ("fsdp", None),  # (embed, kv_latent)
               "blocks.0.attn.kv_norm.scale": (None,),
               "blocks.0.attn.wkv_b": (None, "tensor", None)},  # (kv_latent, heads, head_dim)
}


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_params_are_born_sharded_as_the_rules_say(variant):
  mesh, _, state, shardings = build_sharded(variant)
  params = params_by_name(state)
  assert set(EXPECTED[variant]) <= set(params)
  for name, want in EXPECTED[variant].items():
    assert_placed(params[name][...], mesh, want)
  # Every parameter, named above or not, follows the table for its own `axes` metadata.
  for var in params.values():
    value = var[...]
    assert_placed(value, mesh, rules_spec(var.get_metadata()["axes"], value.shape, mesh))
  # The shardings tree handed to jit says the same thing.
  for name, var in params_by_name(shardings).items():
    assert var.get_value().is_equivalent_to(params[name][...].sharding, params[name][...].ndim)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward_and_decode(graphdef, state, tokens, cache):
  """Full forward logits, and logits of a prefill of all but the last token + one decode step."""
  model = nnx.merge(graphdef, state)
  prefill, cache = model.extend(tokens[:, :-1], cache)
  last, cache = model.extend(tokens[:, -1:], cache)
  return model(tokens), jnp.concatenate([prefill, last], axis=1)


@pytest.mark.parametrize("variant", ["gqa2", "mla_q8"])
def test_sharded_forward_and_decode_equal_unsharded(variant):
  mesh, graphdef, state, _ = build_sharded(variant)
  cfg = tiny(**CONFIGS[variant])
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, cfg.vocab_size)
  empty = init_cache(cfg, 4, 8)
  sharded = _forward_and_decode(graphdef, state,
                                jax.device_put(tokens, sharding.batch_sharding(mesh)),
                                jax.device_put(empty, sharding.cache_shardings(empty, mesh)))
  local_state = jax.device_put(state, jax.devices()[0])
  assert len(jax.tree.leaves(local_state)[0].sharding.device_set) == 1
  local = _forward_and_decode(graphdef, local_state, tokens, empty)
  for a, b in zip(sharded, local):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(local[1], local[0], atol=1e-5)  # decode == forward, for good measure
  assert float(jnp.std(local[0])) > 0.3


# Caches -------------------------------------------------------------------------------------------


def _placed_cache(cfg, mesh, batch):
  cache = init_cache(cfg, batch, 8)
  shardings = sharding.cache_shardings(cache, mesh)
  return jax.device_put(cache, shardings), shardings


@pytest.mark.parametrize("variant, want", [
    ("gqa2", (("data", "fsdp"), None, "tensor", None)),  # [B, S, G, K]
    ("mqa", (("data", "fsdp"), None, None, None)),  # one kv head: not split
])
def test_kv_cache_shardings(mesh, variant, want):
  cfg = tiny(**CONFIGS[variant])
  cache, shardings = _placed_cache(cfg, mesh, batch=4)
  for layer, layer_sh in zip(cache.layers, shardings.layers):
    for x, sh in ((layer.k, layer_sh.k), (layer.v, layer_sh.v)):
      assert sh.is_equivalent_to(NamedSharding(mesh, P(*want)), 4)
      assert_placed(x, mesh, want)
  assert_placed(cache.lengths, mesh, (("data", "fsdp"),))


def test_mla_cache_shardings_have_batch_split_and_no_head_axis(mesh):
  cache, _ = _placed_cache(tiny(attention="mla"), mesh, batch=4)
  for layer in cache.layers:
    assert layer.c.shape == (4, 8, 16) and layer.k_rope.shape == (4, 8, 8)
    assert_placed(layer.c, mesh, (("data", "fsdp"), None, None))
    assert_placed(layer.k_rope, mesh, (("data", "fsdp"), None, None))


def test_cache_batch_not_divisible_by_both_axes_uses_what_divides(mesh):
  cache, _ = _placed_cache(tiny(attention="gqa", n_kv_heads=2), mesh, batch=2)
  assert_placed(cache.layers[0].k, mesh, ("data", None, "tensor", None))


def test_cache_length_on_the_sequence_axis():
  seq_mesh = sharding.make_mesh({"data": 2, "sequence": 2, "tensor": 2})
  cache, _ = _placed_cache(tiny(attention="gqa", n_kv_heads=2), seq_mesh, batch=4)
  assert_placed(cache.layers[0].k, seq_mesh, ("data", "sequence", "tensor", None))
  cache, _ = _placed_cache(tiny(attention="mla"), seq_mesh, batch=4)
  assert_placed(cache.layers[0].c, seq_mesh, ("data", "sequence", None))


# Rules and mesh shapes ----------------------------------------------------------------------------


def test_rule_overrides_change_param_shardings(mesh):
  rules = sharding.make_rules({"heads": None, "kv_heads": None, "batch": ["data"]})
  assert rules["heads"] is None and rules["batch"] == ("data",)
  assert sharding.DEFAULT_RULES["heads"] == "tensor"  # the defaults are not mutated
  abstract = nnx.eval_shape(lambda: Transformer(tiny(attention="gqa", n_kv_heads=2),
                                                rngs=nnx.Rngs(0)))
  shardings = params_by_name(sharding.param_shardings(nnx.state(abstract), mesh, rules))
  assert shardings["blocks.0.attn.wq"].get_value().is_equivalent_to(
      NamedSharding(mesh, P("fsdp", None, None)), 3)
  assert shardings["blocks.0.mlp.gate"].get_value().is_equivalent_to(
      NamedSharding(mesh, P("fsdp", "tensor")), 2)


@pytest.mark.parametrize("overrides, field", [
    ({"head": "tensor"}, "head"),  # unknown logical name
    ({"heads": "model"}, "heads"),  # unknown mesh axis
    ({"batch": ["data", "bogus"]}, "batch"),
])
def test_make_rules_errors_name_the_rule(overrides, field):
  with pytest.raises(ValueError, match=rf"^mesh\.rules\.{field}: "):
    sharding.make_rules(overrides)


@pytest.mark.parametrize("shape, want", [
    ({"data": -1}, dict(data=8, fsdp=1, tensor=1, sequence=1)),
    ({"data": -1, "tensor": 2}, dict(data=4, fsdp=1, tensor=2, sequence=1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, dict(data=2, fsdp=2, tensor=2, sequence=1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, dict(data=2, fsdp=2, tensor=2, sequence=1)),
])
def test_resolve_mesh_shape_fills_minus_one(shape, want):
  assert sharding.resolve_mesh_shape(shape, 8) == want


@pytest.mark.parametrize("shape, pattern", [
    ({"data": -1, "tensor": 3}, r"^mesh\.data: .*do not divide"),  # 3 does not divide 8
    ({"data": 3}, r"^mesh: .*3 devices but 8"),  # no -1 and the product is wrong
    ({"data": -1, "fsdp": -1}, r"^mesh\.fsdp: only one"),
    ({"tensr": 2}, r"^mesh\.tensr: unknown mesh axis"),
    ({"data": 0}, r"^mesh\.data: must be a positive"),
    ({"tensor": -2}, r"^mesh\.tensor: must be a positive"),
])
def test_resolve_mesh_shape_errors(shape, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.resolve_mesh_shape(shape, 8)


def test_make_mesh_shape_and_errors():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, sequence=1)
  assert sharding.data_parallel_size(mesh.shape) == 4
  with pytest.raises(ValueError, match=r"^mesh\.data: "):
    sharding.make_mesh({"data": -1, "tensor": 3})
