"""Public text corpora by name, fetched and checked against their SHA-256 (scripts/download_data.py
is the command line): a truncated or changed download is refused, never trained on."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request

DATASETS = {
    # Karpathy's char-rnn corpus (40k lines of Shakespeare), the one nanoGPT's char recipe uses.
    "tinyshakespeare": dict(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt",
        file="tinyshakespeare.txt", bytes=1_115_394,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


def download(name: str, out_dir: str, url: str | None = None, timeout: float = 60.0) -> str:
  """Fetches dataset `name` into out_dir (skipped when a verified copy is there); returns its
  path. url overrides the source (a mirror, or file:// for tests). Raises ValueError (one line)."""
  if name not in DATASETS:
    raise ValueError(f"--dataset: unknown {name!r}; known: {', '.join(DATASETS)}")
  spec = DATASETS[name]
  path = os.path.join(out_dir, spec["file"])
  if os.path.isfile(path) and _sha256(path) == spec["sha256"]:
    return path
  url = url or spec["url"]
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      data = response.read()
  except (urllib.error.URLError, OSError) as e:
    raise ValueError(f"{url}: download failed ({getattr(e, 'reason', e)}); offline, copy the file "
                     f"to {path} by hand or pass any text file as --config.data.path") from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != spec["sha256"]:
    raise ValueError(f"{url}: got {len(data):,} bytes with SHA-256 {digest[:12]}..., expected "
                     f"{spec['bytes']:,} bytes with {spec['sha256'][:12]}...; not saved")
  os.makedirs(out_dir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)  # never a half-written file under the final name
  return path


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
