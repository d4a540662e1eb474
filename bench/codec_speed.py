"""Top-k codec encode/decode time, this checkout against the codec of an earlier commit, side by
side in one process on the same rows (shards of the embedded default's shape: 256 responses of
20-48 tokens, k = 16). Also checks that both write the same bytes.

    python bench/codec_speed.py [--against d0ebce1] [--codec packed] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.codec import get_codec

REPO = Path(__file__).resolve().parent.parent


def codec_module_at(rev: str):
    """pipeline/codec.py as it was at `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:pipeline/codec.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "codec_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("codec_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_ms(f_old, f_new, runs: int = 30) -> tuple[float, float]:
    """Mean ms of each, the two interleaved call by call so that load on the machine hits both."""
    spent = [0.0, 0.0]
    for _ in range(runs):
        for j, f in enumerate((f_old, f_new)):
            t0 = time.perf_counter()
            f()
            spent[j] += time.perf_counter() - t0
    return spent[0] / runs * 1000, spent[1] / runs * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="d0ebce1", help="git revision whose codec is the baseline")
    ap.add_argument("--codec", default="packed")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lengths, k = rng.integers(20, 48, 256), 16
    ids = [rng.integers(0, 600, (T, k)) for T in lengths]
    lps = [np.sort(rng.normal(-5, 3, (T, k)).astype(np.float32), axis=1)[:, ::-1].copy() for T in lengths]
    old, new = codec_module_at(args.against).get_codec(args.codec), get_codec(args.codec)
    encoded = new.encode(ids, lps)
    same = all(old.encode(ids, lps)[c].equals(encoded[c]) for c in encoded)
    table = pa.table(encoded)
    print(f"{args.codec} codec, 256 rows x 20-48 tokens x k={k}; same bytes as {args.against}: {same}")
    print(f"{'repeat':>6} {'encode ' + args.against:>16} {'encode now':>11} {'ratio':>6} {'decode ' + args.against:>16} {'decode now':>11} {'ratio':>6}  (ms)")
    ratios = []
    for r in range(args.repeats):
        eo, en = paired_ms(lambda: old.encode(ids, lps), lambda: new.encode(ids, lps))
        do, dn = paired_ms(lambda: old.decode(table), lambda: new.decode(table))
        ratios.append((en / eo, dn / do))
        print(f"{r:>6} {eo:>16.2f} {en:>11.2f} {en / eo:>6.2f} {do:>16.2f} {dn:>11.2f} {dn / do:>6.2f}")
    print(f"median ratio now/{args.against}: encode {statistics.median(e for e, _ in ratios):.2f}, "
          f"decode {statistics.median(d for _, d in ratios):.2f}")
    if not same:
        sys.exit("the codecs wrote different bytes")


if __name__ == "__main__":
    main()
