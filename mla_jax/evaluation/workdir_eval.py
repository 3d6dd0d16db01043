"""Evaluate a trained workdir from the workdir alone: what eval.py prints and compare.py records.

    result = evaluate_workdir("runs/mla", which="best", progress=print)
    print(format_table(result))

Reports:
  val_loss / val_ppl / val_bpb   the whole validation split (deterministic full windows of the
                                 training seq_len, token-weighted), or its first max_tokens;
                                 data=SOURCE[:PATH] scores the validation split of another corpus
                                 (stdlib, text:FILE_OR_GLOB, tokens:DIR) with the run's tokenizer
  params, attention              parameter counts and the attention variant's dims
  kv_bytes_per_token             analytic (config) and measured (a cache filled by model.extend)
  kv_cache_bytes_at_max          cache bytes at model.max_seq_len x train.global_batch
  dmc                            a DMC model's compression on the first validation windows, with
                                 the cache bytes used and allocated (dmc.compression_stats)
  decode                         ms per token and tokens/s at batch 1 for each context length
                                 (MLA: absorbed and naive decode paths, same parameters); with a
                                 mesh, on it, with the cache bytes each device holds
  loss_by_position               per window position, and averaged in `buckets` buckets
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.core import cache as cache_lib
from mla_jax.core import dmc as dmc_lib
from mla_jax.core import sharding as shd
from mla_jax.core.config import kv_cache_bytes_per_token
from mla_jax.core.decode_plan import DecodePlan
from mla_jax.core.model import count_params, init_cache
from mla_jax.data import corpus as data_lib
from mla_jax.data import tokenizer as tok_lib
from mla_jax.evaluation import decode_speed, metrics
from mla_jax.experiment import resolve_source
from mla_jax.storage.workdir import Workdir, WorkdirError

CACHE_FILL_TOKENS = 64  # tokens written by model.extend to measure the cache
DMC_WINDOWS = 8  # validation windows a DMC model's achieved compression is measured on


class EvalError(ValueError):
  """A user-facing problem with the workdir or the arguments: one line."""


def parse_data(spec: str | None, config: dict) -> dict:
  """A data spec ('stdlib', 'text:PATH', 'tokens:DIR'; None: the training corpus) ->
  load_corpus arguments."""
  d = config["data"]
  if not spec:
    return dict(source=resolve_source(d["source"], d.get("path", "")), path=d.get("path", ""),
                val_fraction=d.get("val_fraction", .1), max_bytes=d.get("max_bytes", 0))
  source, _, path = spec.partition(":")
  if source not in ("stdlib", "text", "tokens"):
    raise EvalError(f"--data: unknown source {source!r} in {spec!r}; use stdlib, text:PATH or "
                    "tokens:DIR")
  if source != "stdlib" and not path:
    raise EvalError(f"--data: source {source!r} needs a path ({source}:PATH)")
  return dict(source=source, path=path, val_fraction=d.get("val_fraction", .1), max_bytes=0)


def load_val(wd: Workdir, spec: dict):
  """(validation tokens, bytes per token, description) with the workdir's tokenizer."""
  tok = wd.tokenizer()
  if spec["source"] == "tokens":
    corpus = data_lib.load_corpus("tokens", spec["path"])
    if tok is not None and corpus.tokenizer is not None:
      mine = os.path.join(wd.tokenizer_dir, tok_lib.META_FILE)
      theirs = os.path.join(data_lib.tokens_tokenizer_dir(spec["path"]), tok_lib.META_FILE)
      with open(mine) as a, open(theirs) as b:
        if json.load(a) != json.load(b):
          raise EvalError(f"--data: {spec['path']} was tokenized with another tokenizer than "
                          f"{wd.tokenizer_dir}")
  else:
    if tok is None:
      raise EvalError(f"{wd.path}: no tokenizer/ (trained on token files?); evaluate with "
                      "--data=tokens:DIR")
    corpus = data_lib.load_corpus(spec["source"], spec["path"], tok.name,
                                  tokenizer_dir=wd.tokenizer_dir,
                                  val_fraction=spec["val_fraction"], max_bytes=spec["max_bytes"])
  vocab = wd.config["model"]["vocab_size"]
  if corpus.vocab_size > vocab:
    raise EvalError(f"--data: corpus vocabulary {corpus.vocab_size} exceeds the model's {vocab}")
  return corpus.val, corpus.val_bytes_per_token, {**spec, "val_tokens_total": len(corpus.val),
                                                  "val_bytes": corpus.val_bytes}


def attention_dims(cfg) -> dict:
  if cfg.attention == "mla":
    return dict(variant="mla", n_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.nope_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_dim,
                decode_impl=cfg.mla_decode_impl)
  return dict(variant=cfg.attention, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
              head_dim=cfg.qk_head_dim)


def decode_contexts(text: str, max_seq_len: int) -> list[int]:
  """'256,1024,max' -> sorted context lengths, each capped at max_seq_len."""
  out = set()
  for item in filter(None, (s.strip() for s in text.split(","))):
    if item == "max":
      out.add(max_seq_len)
    elif item.isdigit() and int(item) > 0:
      out.add(min(int(item), max_seq_len))
    else:
      raise EvalError(f"--decode_lengths: {item!r} is not a positive integer or 'max'")
  return sorted(out)


def eval_mesh(sizes: dict, impl: str = "shard_map"):
  """--mesh.data/fsdp/tensor/sequence (None: not given) -> a DecodePlan over all devices, or None
  when no size is given. As in train.py, data fills (-1) unless set and the others default to 1.
  A shape the devices cannot take is one line naming the flags given."""
  given = {k: v for k, v in sizes.items() if v is not None}
  if not given:
    return None
  try:
    mesh = shd.make_mesh({"data": -1, **given})
    return DecodePlan.make(mesh, impl=impl)
  except ValueError as e:
    named = " ".join(f"--mesh.{k}={v}" for k, v in given.items())
    raise EvalError(f"{named}: {str(e).splitlines()[0]}") from None


def measured_cache_bytes(model, tokens) -> float:
  """Bytes per token of a cache exactly as long as the tokens model.extend wrote into it."""
  n = tokens.shape[-1]
  graphdef, state = nnx.split(model)
  fill = jax.jit(lambda s, t: nnx.merge(graphdef, s).extend(
      t, init_cache(model.cfg, 1, n)))  # jitted: eager extend compiles op by op
  _, cache = fill(state, jnp.asarray(tokens[None], jnp.int32))
  assert int(cache.lengths[0]) == n
  return cache_lib.cache_bytes_per_token(cache)


def evaluate_workdir(workdir: str, data: str | None = None, max_tokens: int = 0,
                     which: str = "latest", decode_lengths: str = "256,max",
                     decode_steps: int = 32, buckets: int = 8,
                     progress: Callable[[str], None] | None = None,
                     plan: DecodePlan | None = None) -> dict:
  """Everything eval.py reports, as a JSON-able dict. Raises EvalError for user errors.
  progress(text), when given, hears each phase as it starts and the scoring as it goes.
  plan (eval_mesh): parameters restored straight into their shardings on its mesh and decode
  timed with the cache sharded there."""
  say = progress or (lambda text: None)
  try:
    wd = Workdir.open(workdir)
    spec = parse_data(data, wd.config)
    step = wd.resolve_step(which)
    contexts = decode_contexts(decode_lengths, wd.model_config.max_seq_len)  # flags first
    for context in contexts if plan is not None else ():
      try:
        plan.check_cache_length(context, flag="--mesh.sequence")
      except ValueError as e:
        raise EvalError(f"{e} (decode context {context}, --decode_lengths)") from None
    seq_len, batch = wd.config["data"]["seq_len"], wd.config["train"]["global_batch"]
    if max_tokens and max_tokens < seq_len:
      raise EvalError(f"--max_tokens: {max_tokens} is below one window (seq_len={seq_len})")
    start = time.perf_counter()
    where = "" if plan is None else f" onto mesh {dict(plan.mesh.shape)}"
    say(f"loading checkpoint step {step} of {workdir}{where}")
    # 'latest' falls back past a damaged step (saying which); an explicit step is refused.
    step, model = wd.load(which if str(which) == "latest" else step,
                          mesh=None if plan is None else plan.mesh, warn=say)
  except WorkdirError as e:  # 'which: ...' is the --which flag here
    raise EvalError(f"--{e}" if str(e).startswith("which") else str(e)) from None
  cfg = model.cfg
  say(f"reading the validation data ({spec['source']}{':' + spec['path'] if spec['path'] else ''})")
  val, bytes_per_token, data_info = load_val(wd, spec)
  if len(val) < seq_len + 1:
    raise EvalError(f"--data: validation split has {len(val)} tokens, fewer than one window "
                    f"of seq_len+1={seq_len + 1}")

  def scored(done: int, total: int):
    say(f"scoring validation: {done:,}/{total:,} tokens")

  quality = metrics.evaluate_model(model, val, bytes_per_token, seq_len, batch, max_tokens,
                                   progress=scored if progress else None)
  say("measuring the KV cache")
  measured = measured_cache_bytes(model, val[:min(CACHE_FILL_TOKENS, seq_len)])
  at_max = jax.eval_shape(lambda: init_cache(cfg, batch, cfg.max_seq_len))
  bytes_at_max = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(at_max.layers))

  compression = None
  if cfg.dmc:  # what the hard decisions achieve (the cache allocates the uncompressed bytes)
    say("measuring DMC's compression")
    n = min(DMC_WINDOWS, len(val) // seq_len)
    compression = dmc_lib.measure(model, np.asarray(val[:n * seq_len]).reshape(n, seq_len))

  decode = {}
  contexts = decode_contexts(decode_lengths, cfg.max_seq_len)
  if contexts:
    say(f"timing decode at contexts {', '.join(map(str, contexts))}")
    steps = max(1, min(decode_steps, min(contexts) - 4))
    decode = decode_speed.time_decode_impls(model, contexts, 1, steps, plan=plan)
  say(f"done in {time.perf_counter() - start:.0f} s")

  by_pos = quality.pop("loss_by_position")
  return {
      "workdir": workdir, "step": step, "which": str(which),
      "tokens_trained": wd.meta(step).get("tokens"),
      "train_steps": wd.config["train"]["steps"], "seed": wd.config["train"].get("seed"),
      "data": {**data_info, "seq_len": seq_len, "bytes_per_token": bytes_per_token,
               "max_tokens": max_tokens},
      **quality,
      "params": count_params(model),
      "attention": attention_dims(cfg),
      "model": {k: getattr(cfg, k) for k in ("attention", "d_model", "n_layers", "n_heads",
                                             "vocab_size", "max_seq_len", "dtype")}
               | {"d_ff": cfg.mlp_dim, "cache_dtype": str(jnp.dtype(cfg.kv_cache_dtype))},
      "kv_bytes_per_token": kv_cache_bytes_per_token(cfg),
      "kv_bytes_per_token_measured": measured,
      "kv_cache_bytes_at_max": {"bytes": bytes_at_max, "max_seq_len": cfg.max_seq_len,
                                "batch": batch},
      "decode": decode,
      "dmc": compression,
      "device": str(jax.devices()[0].device_kind),
      "mesh": None if plan is None else {**dict(plan.mesh.shape), "sharded_impl": plan.impl},
      "loss_by_position": by_pos,
      "loss_by_position_buckets": metrics.position_buckets(by_pos, buckets),
  }


def format_table(r: dict) -> str:
  """Human-readable summary of evaluate_workdir's dict."""
  a = r["attention"]
  dims = ", ".join(f"{k}={v}" for k, v in a.items() if k != "variant")
  d = r["data"]
  whole = r["val_tokens"] >= d["val_tokens_total"] - d["seq_len"]
  rows = [
      ("workdir", f"{r['workdir']} (step {r['step']}, {r['tokens_trained'] or '?'} tokens)"),
      ("data", f"{d['source']}{':' + d['path'] if d['path'] else ''} validation split: "
               f"{r['val_tokens']:,} of its {d['val_tokens_total']:,} tokens scored "
               f"({'the whole split' if whole else 'a prefix, --max_tokens'}), "
               f"{d['bytes_per_token']:.4f} bytes/token"),
      ("val_loss", f"{r['val_loss']:.4f} nats/token"),
      ("val_ppl", f"{r['val_ppl']:.3f}"),
      ("val_bpb", f"{r['val_bpb']:.4f} bits/byte"),
      ("params", f"{r['params']['total']:,} total, {r['params']['non_embedding']:,} non-embedding"),
      ("attention", f"{a['variant']} ({dims})"),
      ("kv_bytes_per_token", f"{r['kv_bytes_per_token']} analytic, "
                             f"{r['kv_bytes_per_token_measured']:g} measured"),
      ("kv_cache_at_max", f"{r['kv_cache_bytes_at_max']['bytes'] / 2**20:.2f} MiB "
                          f"(max_seq_len {r['kv_cache_bytes_at_max']['max_seq_len']} x batch "
                          f"{r['kv_cache_bytes_at_max']['batch']})"),
  ]
  if r.get("dmc"):
    c = r["dmc"]
    rows.append(("dmc", f"{c['compression']:.2f}x compression over {c['tokens']:,} tokens: "
                        f"{c['bytes_used'] / c['tokens']:,.0f} bytes/token used, "
                        f"{c['bytes_allocated'] / c['tokens']:,.0f} allocated (fixed shapes)"))
  for impl, points in r["decode"].items():
    rows.append((f"decode {impl}", ", ".join(
        f"ctx {p['context']}: {p['ms_per_token']:.2f} ms/token ({p['tokens_per_s']:.0f} tok/s"
        + (f", {p['cache_bytes_per_device'] / 2**10:.0f} KiB cache per device)"
           if r.get("mesh") else ")") for p in points)))
  rows.append(("loss_by_position", " ".join(
      f"[{b['start']},{b['end']}):{b['loss']:.3f}" for b in r["loss_by_position_buckets"])))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
