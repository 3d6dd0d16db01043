r"""Evaluate a trained workdir: quality, size, KV cache and decode speed, from the workdir alone.

  python eval.py --workdir=runs/mla_small [--json=out.json] [--which=latest|best|STEP]
  python eval.py --workdir=runs/mla_small --data=text:../shared/data/tinyshakespeare.txt
  python eval.py --workdir=runs/mla_small --max_tokens=65536 --decode_lengths=256,1024

Reports (printed table, and JSON with --json):
  val_loss / val_ppl / val_bpb   the whole validation split (deterministic full windows of the
                                 training seq_len, token-weighted); --data=SOURCE[:PATH] scores the
                                 validation split of another corpus (stdlib, text:FILE_OR_GLOB,
                                 tokens:DIR) with the workdir's own tokenizer
  params, attention              parameter counts and the attention variant's dims
  kv_bytes_per_token             analytic (config) and measured (a cache filled by model.extend)
  kv_cache_bytes_at_max          cache bytes at model.max_seq_len x train.global_batch
  decode                         ms per token and tokens/s at batch 1 for each context length
                                 (MLA: absorbed and naive decode paths, same parameters)
  loss_by_position               per window position, and averaged in --buckets buckets
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS

CACHE_FILL_TOKENS = 64  # tokens written by model.extend to measure the cache


class EvalError(Exception):
  """A user-facing problem with the workdir or flags: printed as one line."""


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps (orbax step directories) without touching orbax."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def check_workdir(workdir: str) -> dict:
  """Cheap checks before anything heavy is imported; returns the saved config dict."""
  if not workdir:
    raise EvalError("--workdir is required")
  if not os.path.isdir(workdir):
    raise EvalError(f"{workdir}: no such directory")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise EvalError(f"{workdir}: no config.json; is this a training workdir (train.py --workdir)?")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise EvalError(f"{path}: not valid JSON ({e})") from None
  for key in ("model", "data", "train"):
    if key not in config:
      raise EvalError(f"{path}: no {key!r} section; is this a training workdir?")
  if not checkpoint_steps(workdir):
    raise EvalError(f"{workdir}: no checkpoint under {workdir}/checkpoints; train first "
                    "(python train.py --workdir=...)")
  return config


def parse_data(spec: str | None, config: dict) -> dict:
  """--data value -> load_corpus arguments (default: the training corpus as configured)."""
  d = config["data"]
  if not spec:
    return dict(source=d["source"], path=d.get("path", ""), val_fraction=d.get("val_fraction", .1),
                max_bytes=d.get("max_bytes", 0))
  source, _, path = spec.partition(":")
  if source not in ("stdlib", "text", "tokens"):
    raise EvalError(f"--data: unknown source {source!r} in {spec!r}; use stdlib, text:PATH or "
                    "tokens:DIR")
  if source != "stdlib" and not path:
    raise EvalError(f"--data: source {source!r} needs a path ({source}:PATH)")
  return dict(source=source, path=path, val_fraction=d.get("val_fraction", .1), max_bytes=0)


def load_val(workdir: str, config: dict, spec: dict):
  """(validation tokens, bytes per token, description) with the workdir's tokenizer."""
  from mla_jax.data import corpus as data_lib
  from mla_jax.data import tokenizer as tok_lib

  tok_dir = os.path.join(workdir, "tokenizer")
  tok_file = os.path.join(tok_dir, tok_lib.META_FILE)
  has_tok = os.path.isfile(tok_file)
  if spec["source"] == "tokens":
    # workdir=None: load_corpus would otherwise copy the token dir's tokenizer over the workdir's.
    corpus = data_lib.load_corpus("tokens", spec["path"], workdir=None)
    if has_tok and corpus.tokenizer is not None:
      meta_path = data_lib._token_path(spec["path"], "meta.json")
      with open(meta_path) as f:
        theirs = os.path.join(os.path.dirname(meta_path), json.load(f)["tokenizer"]["dir"],
                              tok_lib.META_FILE)
      with open(tok_file) as a, open(theirs) as b:
        if json.load(a) != json.load(b):
          raise EvalError(f"--data: {spec['path']} was tokenized with another tokenizer than "
                          f"{tok_dir}")
  else:
    if not has_tok:
      raise EvalError(f"{workdir}: no tokenizer/ (trained on token files?); evaluate with "
                      "--data=tokens:DIR")
    kind = tok_lib.load_tokenizer(tok_dir).name
    corpus = data_lib.load_corpus(spec["source"], spec["path"], kind, workdir=workdir,
                                  val_fraction=spec["val_fraction"], max_bytes=spec["max_bytes"])
  vocab = config["model"]["vocab_size"]
  if corpus.vocab_size > vocab:
    raise EvalError(f"--data: corpus vocabulary {corpus.vocab_size} exceeds the model's {vocab}")
  return corpus.val, corpus.val_bytes_per_token, {**spec, "val_tokens_total": len(corpus.val),
                                                  "val_bytes": corpus.val_bytes}


def resolve_step(workdir: str, which: str) -> int:
  steps = checkpoint_steps(workdir)
  if which == "latest":
    return steps[-1]
  if which == "best":
    from mla_jax.storage.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, async_save=False)
    try:
      step = ckpt.best_step()
    finally:
      ckpt.close()
    if step is None:
      raise EvalError(f"--which=best: no checkpoint in {workdir} has a validation loss")
    return step
  if not which.isdigit() or int(which) not in steps:
    raise EvalError(f"--which: {which!r} is not latest, best or one of the steps {steps}")
  return int(which)


def _flat_shapes(tree) -> dict[str, tuple]:
  import jax

  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if keys and keys[-1] == "value":
      keys = keys[:-1]
    out[".".join(keys)] = tuple(leaf.shape)
  return out


def check_checkpoint_matches(workdir: str, step: int, config: dict) -> None:
  """Compares parameter shapes in the checkpoint's metadata with config.json's model before
  restoring: orbax's own error for a mismatch is a page of TensorStore specs."""
  import logging

  import orbax.checkpoint as ocp
  from flax import nnx

  from mla_jax.core.config import ModelConfig
  from mla_jax.core.model import Transformer

  try:
    cfg = ModelConfig.from_mapping(config["model"])
  except (ValueError, TypeError) as e:
    raise EvalError(f"{workdir}/config.json: {e}") from None
  expected = _flat_shapes(nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))))
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "params")
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # orbax warns about a metadata file it does not need
  try:
    meta = ocp.StandardCheckpointer().metadata(path)
    stored = _flat_shapes(getattr(meta, "item_metadata", meta))
  except Exception:  # unreadable metadata: let the restore report what is wrong
    return
  finally:
    absl_log.setLevel(level)
  prefix = f"{workdir}/checkpoints/{step}: checkpoint does not match config.json's model"
  for name in sorted(set(expected) | set(stored)):
    if name not in stored:
      raise EvalError(f"{prefix}: config.json's model has {name} {expected[name]}, the "
                      "checkpoint does not")
    if name not in expected:
      raise EvalError(f"{prefix}: the checkpoint has {name} {stored[name]}, config.json's "
                      "model does not")
    if expected[name] != stored[name]:
      raise EvalError(f"{prefix}: {name} is {stored[name]} in the checkpoint, "
                      f"{expected[name]} from config.json")


def attention_dims(cfg) -> dict:
  if cfg.attention == "mla":
    return dict(variant="mla", n_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.nope_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_dim,
                decode_impl=cfg.mla_decode_impl)
  return dict(variant=cfg.attention, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads,
              head_dim=cfg.qk_head_dim)


def decode_contexts(text: str, max_seq_len: int) -> list[int]:
  out = set()
  for item in filter(None, (s.strip() for s in text.split(","))):
    if item == "max":
      out.add(max_seq_len)
    elif item.isdigit() and int(item) > 0:
      out.add(min(int(item), max_seq_len))
    else:
      raise EvalError(f"--decode_lengths: {item!r} is not a positive integer or 'max'")
  return sorted(out)


def evaluate_workdir(workdir: str, data: str | None = None, max_tokens: int = 0,
                     which: str = "latest", decode_lengths: str = "256,max",
                     decode_steps: int = 32, buckets: int = 8) -> dict:
  """Everything eval.py reports, as a JSON-able dict. Raises EvalError for user errors."""
  config = check_workdir(workdir)
  spec = parse_data(data, config)
  step = resolve_step(workdir, str(which))

  import jax
  from flax import nnx

  from mla_jax.core import cache as cache_lib
  from mla_jax.core.config import kv_cache_bytes_per_token
  from mla_jax.core.model import count_params
  from mla_jax.evaluation import decode_speed
  from mla_jax.evaluation import metrics as evaluation
  from mla_jax.storage import checkpoint as ckpt_lib

  check_checkpoint_matches(workdir, step, config)
  try:
    model = ckpt_lib.load_model(workdir, step)
  except (ValueError, FileNotFoundError) as e:
    raise EvalError(str(e).splitlines()[0]) from None
  except Exception as e:  # orbax / tensorstore errors on a checkpoint the config cannot describe
    raise EvalError(f"{workdir}/checkpoints/{step}: checkpoint does not match config.json's model "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  cfg = model.cfg
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    meta = ckpt.meta(step)
  except Exception:  # meta is informative only
    meta = {}
  finally:
    ckpt.close()

  seq_len, batch = config["data"]["seq_len"], config["train"]["global_batch"]
  val, bytes_per_token, data_info = load_val(workdir, config, spec)
  if len(val) < seq_len + 1:
    raise EvalError(f"--data: validation split has {len(val)} tokens, fewer than one window "
                    f"of seq_len+1={seq_len + 1}")
  if max_tokens and max_tokens < seq_len:
    raise EvalError(f"--max_tokens: {max_tokens} is below one window (seq_len={seq_len})")
  quality = evaluation.evaluate_model(model, val, bytes_per_token, seq_len, batch, max_tokens)

  # Measured cache bytes: a cache exactly as long as the tokens written into it.
  n_fill = min(CACHE_FILL_TOKENS, seq_len)
  graphdef, state = nnx.split(model)
  fill = jax.jit(lambda s, t: nnx.merge(graphdef, s).extend(
      t, cache_lib.init_cache(cfg, 1, n_fill)))  # jitted: eager extend compiles op by op
  _, cache = fill(state, jax.numpy.asarray(val[None, :n_fill], jax.numpy.int32))
  assert int(cache.lengths[0]) == n_fill
  measured = cache_lib.cache_bytes_per_token(cache)
  analytic = kv_cache_bytes_per_token(cfg)
  at_max = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, cfg.max_seq_len))
  bytes_at_max = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(at_max.layers))

  decode = {}
  contexts = decode_contexts(decode_lengths, cfg.max_seq_len)
  if contexts:
    steps = max(1, min(decode_steps, min(contexts) - 4))
    decode = decode_speed.time_decode_impls(model, contexts, 1, steps)

  params = count_params(model)
  by_pos = quality.pop("loss_by_position")
  return {
      "workdir": workdir, "step": step, "which": str(which), "tokens_trained": meta.get("tokens"),
      "train_steps": config["train"]["steps"], "seed": config["train"].get("seed"),
      "data": {**data_info, "seq_len": seq_len, "bytes_per_token": bytes_per_token,
               "max_tokens": max_tokens},
      **quality,
      "params": params,
      "attention": attention_dims(cfg),
      "model": {k: getattr(cfg, k) for k in ("attention", "d_model", "n_layers", "n_heads",
                                             "vocab_size", "max_seq_len", "dtype")}
               | {"d_ff": cfg.mlp_dim, "cache_dtype": str(jax.numpy.dtype(cfg.kv_cache_dtype))},
      "kv_bytes_per_token": analytic,
      "kv_bytes_per_token_measured": measured,
      "kv_cache_bytes_at_max": {"bytes": bytes_at_max, "max_seq_len": cfg.max_seq_len,
                                "batch": batch},
      "decode": decode,
      "device": str(jax.devices()[0].device_kind),
      "loss_by_position": by_pos,
      "loss_by_position_buckets": evaluation.position_buckets(by_pos, buckets),
  }


def format_table(r: dict) -> str:
  """Human-readable summary of evaluate_workdir's dict."""
  a = r["attention"]
  dims = ", ".join(f"{k}={v}" for k, v in a.items() if k != "variant")
  rows = [
      ("workdir", f"{r['workdir']} (step {r['step']}, {r['tokens_trained'] or '?'} tokens)"),
      ("data", f"{r['data']['source']}{':' + r['data']['path'] if r['data']['path'] else ''} "
               f"val, {r['val_tokens']} tokens scored, "
               f"{r['data']['bytes_per_token']:.4f} bytes/token"),
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
  for impl, points in r["decode"].items():
    rows.append((f"decode {impl}", ", ".join(
        f"ctx {p['context']}: {p['ms_per_token']:.2f} ms/token ({p['tokens_per_s']:.0f} tok/s)"
        for p in points)))
  rows.append(("loss_by_position", " ".join(
      f"[{b['start']},{b['end']}):{b['loss']:.3f}" for b in r["loss_by_position_buckets"])))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    config = check_workdir(FLAGS.workdir)  # fail fast, before jax is imported
    parse_data(FLAGS.data, config)
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if FLAGS.platform:
      jax.config.update("jax_platforms", FLAGS.platform)
    result = evaluate_workdir(FLAGS.workdir, FLAGS.data, FLAGS.max_tokens, FLAGS.which,
                              FLAGS.decode_lengths, FLAGS.decode_steps, FLAGS.buckets)
  except (EvalError, ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    sys.exit(1)
  print(format_table(result))
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.json}")


def define_flags():
  """Flags exist only when run as a script: importing this module (tests, compare.py) defines
  none, so it can be imported next to other absl programs."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
  flags.DEFINE_string("data", None, "Corpus to score instead of the training one: stdlib, "
                      "text:PATH or tokens:DIR (its validation split, the workdir's tokenizer).")
  flags.DEFINE_integer("max_tokens", 0, "Cap on validation tokens scored (0: the whole split).")
  flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
  flags.DEFINE_string("decode_lengths", "256,max", "Context lengths for decode timing "
                      "('max' = model.max_seq_len); empty to skip decode timing.")
  flags.DEFINE_integer("decode_steps", 32, "Timed decode steps per context length.")
  flags.DEFINE_integer("buckets", 8, "Position buckets for the loss-by-position summary.")
  flags.DEFINE_string("platform", None, "Force a JAX platform (cpu, gpu, tpu).")


if __name__ == "__main__":
  from mla_jax import host_memory
  host_memory.configure_entry_point()  # malloc settings for fast XLA:CPU runs; see its docstring
  define_flags()
  app.run(main)
