"""Tokenizes a corpus once into token files that `load_corpus('tokens', OUT)` reads.

  python scripts/prepare_data.py --source=text --path=data/input.txt \
      --tokenizer=bpe --vocab_size=4096 --out=/tmp/shakespeare_bpe

Writes OUT/train.bin and OUT/val.bin (raw uint16 if vocab_size <= 65535,
else uint32), OUT/meta.json (vocab_size, dtype, tokenizer, train_bytes,
val_bytes, source) and OUT/tokenizer/ (the saved tokenizer, trained on the
train split only).
"""

from __future__ import annotations

import argparse
import json
import os

from mla_jax.data import corpus as data  # pylint: disable=g-import-not-at-top
from mla_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--source', default='text', choices=['text', 'stdlib'])
  p.add_argument('--path', default='', help="file or glob (source 'text')")
  p.add_argument('--tokenizer', default='bpe', choices=list(tok_lib.KINDS))
  p.add_argument('--vocab_size', type=int, default=0, help="needed for 'bpe' (>= 257)")
  p.add_argument('--val_fraction', type=float, default=0.1, help="source 'text' only")
  p.add_argument('--max_bytes', type=int, default=0, help='read at most this many bytes (0: all)')
  p.add_argument('--out', required=True, help='output directory')
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  """Runs the CLI on argv (default sys.argv[1:]); returns the meta.json dict."""
  args = parse_args(argv)
  # No tokenizer_dir: always train afresh (a stale OUT/tokenizer from an
  # earlier run with other flags must not be reused), then overwrite it below.
  corpus = data.load_corpus(args.source, args.path, args.tokenizer, args.vocab_size,
                            val_fraction=args.val_fraction,
                            max_bytes=args.max_bytes)
  dtype = 'uint16' if corpus.vocab_size <= 65535 else 'uint32'
  os.makedirs(args.out, exist_ok=True)
  corpus.tokenizer.save(os.path.join(args.out, 'tokenizer'))
  for split, tokens in (('train', corpus.train), ('val', corpus.val)):
    tokens.astype(dtype).tofile(os.path.join(args.out, f'{split}.bin'))
  source = args.source + (f':{args.path}' if args.path else '')
  meta = {
      'vocab_size': corpus.vocab_size,
      'dtype': dtype,
      'tokenizer': {'kind': corpus.tokenizer.name, 'dir': 'tokenizer'},
      'train_bytes': corpus.train_bytes,
      'val_bytes': corpus.val_bytes,
      'train_tokens': len(corpus.train),
      'val_tokens': len(corpus.val),
      'source': source,
      'val_fraction': args.val_fraction if args.source == 'text' else None,
      'max_bytes': args.max_bytes,
  }
  with open(os.path.join(args.out, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  print(f'prepare_data: {source} -> {args.out}: {corpus.tokenizer.name} vocab '
        f'{corpus.vocab_size} ({dtype}); train {len(corpus.train)} tokens '
        f'({corpus.train_bytes / len(corpus.train):.3f} bytes/token), val '
        f'{len(corpus.val)} tokens ({corpus.val_bytes_per_token:.3f} bytes/token)')
  return meta


if __name__ == '__main__':
  main()
