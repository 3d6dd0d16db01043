"""What the entry points (train.py, eval.py, scripts/compare.py) share: flag parsing that turns
every bad flag into one line, and a --help that exits 0 and shows the config's fields.

    define_config_flag(os.path.join(CHECKOUT, "configs", "lm.py"), root=CHECKOUT)  # --config
    app.run(main, flags_parser=parse_flags_or_exit)
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")
# Where a relative --config=FILE is looked for when the current directory has no FILE (the
# checkout holding the entry point): set by define_config_flag.
_config_root: str | None = None


def define_config_flag(default: str, root: str | None = None) -> None:
  """Defines --config (an ml_collections config file, locked) for an entry point's __main__.

  default: the config file used without --config= (absolute, so it resolves from any directory).
  root: where a relative --config=FILE is looked for when the current directory has none (the
  checkout: the README's `--config=configs/lm.py:...` then works from anywhere).

  Without --config= on the command line, config_flags loads the default file and applies every
  --config.x=y override while the flag is being *defined*, outside parse_flags_or_exit, so a
  misspelt override became a traceback; naming the default on the command line defers that to
  the parse, where every error is one line.
  """
  from ml_collections import config_flags

  global _config_root
  _config_root = root
  if not any(_CONFIG_ARG.match(a) for a in sys.argv[1:]):
    sys.argv.insert(1, f"--config={default}")
  config_flags.DEFINE_config_file("config", default, "Experiment config file[:arg].",
                                  lock_config=True)


def resolve_config_args(argv: list[str], root: str | None = None) -> list[str]:
  """argv with a relative --config=FILE[:ARG] that is missing from the current directory but
  present under `root` made absolute; ValueError naming --config when FILE is in neither."""
  out = []
  for i, a in enumerate(argv):
    if i and a.startswith(("--config=", "-config=")):
      flag, spec = a.split("=", 1)
      path, sep, arg = spec.partition(":")
      if not os.path.isfile(path):
        there = os.path.join(root, path) if root and not os.path.isabs(path) else None
        if there and os.path.isfile(there):
          a = f"{flag}={there}{sep}{arg}"
        else:
          where = f" (looked in {os.getcwd()}" + (f" and {root})" if there else ")")
          raise ValueError(f"--config: no such file {path!r}{where}")
    out.append(a)
  return out


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's parser, but --help prints the usage and exits 0, and a bad flag is one line naming it
  on stderr and exit 1: no traceback (an unknown --config.x key, or an error inside the config
  file) and no usage hint after it."""
  try:
    argv = resolve_config_args(argv, _config_root)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(help_text(argv))
    sys.exit(0)
  try:
    rest = FLAGS(argv)
    if "config" in FLAGS:  # a config file that failed to load raises only when first read
      getattr(FLAGS["config"].value, "lock", None)
    return rest
  except OSError as e:  # ml_collections' deferred load error: its first line
    message = f"--config: {str(e).splitlines()[0]}"
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
  except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown key>
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = str(e.args[0] if e.args else e)
    key = text.splitlines()[0].strip("'\"") if text else "?"
    bad = [a.split("=", 1)[0] for a in argv[1:]
           if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
    message = (f"flag {bad[0] if bad else '--config'}: unknown config field {key!r}"
               + "".join(f"; {line.strip()}" for line in text.splitlines()[1:] if line.strip()))
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def quiet_and_require(*names: str) -> None:
  """Start of a converter script (scripts/import_hf.py, export_hf.py, convert_mha2mla.py): absl
  and orbax logs down to warnings, and one line (exit 1) naming the first missing flag."""
  from absl import logging

  from mla_jax.storage.checkpoint import quiet_orbax_logs

  logging.set_verbosity(logging.WARNING)
  quiet_orbax_logs()
  missing = [f"--{n}" for n in names if getattr(FLAGS, n) in (None, "")]
  if missing:
    print(f"error: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required",
          file=sys.stderr)
    sys.exit(1)


def check_args(argv: list[str], workdir: str | None, what: str) -> None:
  """Exits with one line for stray positional arguments (2) or a missing --workdir (1);
  `what` says what the workdir is, e.g. 'the directory train.py wrote'."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not workdir:
    print(f"error: --workdir is required: {what} (e.g. --workdir=runs/default)", file=sys.stderr)
    sys.exit(1)


def help_text(argv: list[str]) -> str:
  """The main module's docstring, its flags with defaults and, for a --config flag, every config
  field with its value (after --config=FILE[:ARG] if given): what --config.x=y can override."""
  main = sys.modules["__main__"]
  parts = [(main.__doc__ or "").strip(), "", "flags:"]
  for flag in sorted(FLAGS.get_key_flags_for_module(main), key=lambda f: f.name):
    if flag.name == "config":
      continue
    default = "" if flag.default is None else f" (default: {flag.default!r})"
    parts.append(f"  --{flag.name}: {flag.help}{default}")
  if "config" in FLAGS:
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")),
                FLAGS["config"].default_as_str.strip("'\""))
    parts.append(f"  --config: experiment file[:arg] (default: {FLAGS['config'].default_as_str})")
    parts += ["", f"config fields of {spec} (override any with --config.GROUP.FIELD=VALUE):"]
    parts.append(describe_config(spec))
  return "\n".join(parts)


def describe_config(spec: str) -> str:
  """'  model.d_model = 256' lines for every field of an experiment config, group by group."""
  from mla_jax.experiment import load_config

  try:
    config = load_config(spec)
  except Exception as e:  # noqa: BLE001 - a broken config file still gets the flag list
    return f"  (could not load {spec}: {type(e).__name__}: {e})"
  lines = []
  for group in config:
    lines.append(f"  {group}:")
    for field, value in config[group].items():
      lines.append(f"    {group}.{field} = {value!r}")
  return "\n".join(lines)
