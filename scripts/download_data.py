r"""Downloads a public text corpus for `--config.data.path=` (needs internet access).

  python3 scripts/download_data.py           # tiny Shakespeare -> data/tinyshakespeare.txt
  python3 scripts/download_data.py --dataset=tinyshakespeare --out=data

Each dataset is fetched from its source URL and checked against its SHA-256, so a truncated or
changed download is refused instead of silently training on it. Offline, copy the file by hand
from the URL below, or train on any text file you have: `--config.data.path=FILE` works with
any UTF-8 text (a path means data.source=text).
"""

from __future__ import annotations

import argparse
import sys

from mla_jax.data.download import DATASETS, download


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="tinyshakespeare", help=f"one of {', '.join(DATASETS)}")
  p.add_argument("--out", default="data", help="output directory (default: data)")
  p.add_argument("--url", default=None, help="download from this URL instead (a mirror)")
  args = p.parse_args(argv)
  try:
    path = download(args.dataset, args.out, args.url)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{path}: {DATASETS[args.dataset]['bytes']:,} bytes, SHA-256 verified (source "
        f"{args.url or DATASETS[args.dataset]['url']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
