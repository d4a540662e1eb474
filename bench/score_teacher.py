"""score-teacher benchmarks: storage of the teacher columns per codec, and memory of the statistics step.

    python bench/score_teacher.py            # V = 151,936 (Qwen3), k = 20; writes bench/RESULTS-score_teacher.md
    python bench/score_teacher.py --quick    # fewer tokens, smaller memory shape; prints only
    python bench/score_teacher.py --only storage

storage: bytes per response token on disk of ALL teacher-added columns (top-k ids, top-k log-probs,
  entropy, token log-prob), written by the stage's own writer (pipeline.shards.write_shard: Parquet,
  zstd level 3, pyarrow defaults otherwise), per codec, against 303,872 bytes for one fp16 logit row;
  plus the log-prob reconstruction error and the decode speed. The teacher distributions come from
  `teacher_logits` below (a documented synthetic LM; entropy quantiles are printed).
memory: peak extra RSS of chunked_token_stats vs the naive path (full fp32 logits = hidden @ W^T,
  then token_stats_naive), V = 151,936, T = 4,096, H = 1,024, each variant in a fresh subprocess.
accuracy: both paths against a float64 log_softmax at V = 151,936.

Each benchmark is a function in BENCHES returning a Markdown section; more (e.g. the stage vs a bare
teacher forward) are added there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eopd.teacher_stats import chunked_token_stats, token_stats_naive  # noqa: E402
from pipeline.codec import DEFAULT_CODEC, IDS_COLUMN, LOGPROBS_COLUMN, get_codec  # noqa: E402
from pipeline.shards import write_shard  # noqa: E402

VOCAB, K = 151_936, 20
FP16_ROW_BYTES = 2 * VOCAB  # 303,872: one full fp16 logit row per token
STORAGE_TARGET, MEMORY_TARGET = 64.0, 0.25
CODECS = [("packed", {"step": 1 / 16}), ("packed", {"step": 1 / 32}), ("packed", {"step": 1 / 64}),
          ("uint8", {"step": 1 / 8}), ("float16", {}), ("float32", {})]


# ----------------------------------------------------------------------------- the synthetic teacher

def zipf_logprior(vocab: int, s: float = 1.0) -> torch.Tensor:
    """log popularity of the token of popularity rank r: -s log(1 + r) (Zipf), unnormalised."""
    return -s * torch.log1p(torch.arange(vocab, dtype=torch.float64)).float()


def id_of_rank(vocab: int, order: str, seed: int = 0) -> torch.Tensor:
    """Token id of each popularity rank. 'bpe': ids follow popularity loosely (BPE merges frequent
    pieces first): ids sorted by log(1 + rank) + N(0, 1.5^2). 'random': ids unrelated to popularity
    (pessimistic for the id codecs)."""
    g = torch.Generator().manual_seed(seed)
    if order == "random":
        return torch.randperm(vocab, generator=g)
    key = torch.log1p(torch.arange(vocab, dtype=torch.float64)) + 1.5 * torch.randn(vocab, generator=g, dtype=torch.float64)
    ids = torch.empty(vocab, dtype=torch.long)
    ids[key.argsort()] = torch.arange(vocab)
    return ids


def teacher_logits(n: int, logprior: torch.Tensor, g: torch.Generator, context: int = 64, max_cands: int = 8) -> torch.Tensor:
    """[n, V] logits in popularity-rank space, one row per position:

    1. background: 0.5 log-prior + N(0, 1) over the whole vocabulary;
    2. context: `context` related tokens, drawn by popularity, fresh at every position, lifted to
       (background max) + 6 U^2, U ~ U(0, 1): they fill the top-k tail (fresh ids per position);
    3. candidates: 1 + Geometric(0.65) (at most `max_cands`) plausible continuations drawn by
       popularity; the first at logsumexp(row) + M, M ~ Gamma(2.5, rate 0.2) (mean 12.5 nats), each
       next one lower by a gap E1 * E2 * 2, E ~ Exp(1) (mostly small: competing continuations).
    Calibrated so that the entropy distribution is that of an LM's response tokens: about half of
    the tokens below 0.01 nats, about a fifth above 0.672 (the 80th percentile reported for Qwen3
    chain-of-thought tokens by Wang et al. 2025, "Beyond the 80/20 rule"), a tail of 1-3 nats.
    """
    V = logprior.shape[0]
    rows = torch.arange(n)
    popularity = (logprior.double().exp() / logprior.double().exp().sum()).float()
    z = 0.5 * logprior + torch.randn(n, V, generator=g)
    base = z.max(1).values
    ctx = torch.multinomial(popularity, n * context, replacement=True, generator=g).view(n, context)
    lift = base[:, None] + 6 * torch.rand(n, context, generator=g) ** 2
    for j in range(context):  # a loop, not scatter: duplicate ids get a defined (the last) value
        z[rows, ctx[:, j]] = lift[:, j]
    n_cands = 1 + torch.distributions.Geometric(probs=torch.tensor(0.65)).sample((n,)).long().clamp_max(max_cands - 1)
    margin = torch.distributions.Gamma(torch.tensor(2.5), torch.tensor(0.2)).sample((n,))
    gaps = torch.empty(n, max_cands).exponential_(generator=g) * torch.empty(n, 1).exponential_(generator=g) * 2
    gaps[:, 0] = 0
    top = torch.logsumexp(z, 1) + margin
    cands = torch.multinomial(popularity, n * max_cands, replacement=True, generator=g).view(n, max_cands)
    cand_logit = top[:, None] - gaps.cumsum(1)
    for j in range(max_cands):
        keep = n_cands > j
        z[rows[keep], cands[keep, j]] = cand_logit[keep, j]
    return z


def teacher_rows(tokens: int, seed: int = 0, chunk: int = 256) -> dict:
    """Responses (lognormal lengths, median 400, 16..4096 tokens) with per-token teacher statistics
    in rank space; the sampled token is drawn from the teacher itself (inverse CDF)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    logprior = zipf_logprior(VOCAB)
    parts = []
    for t0 in range(0, tokens, chunk):
        n = min(chunk, tokens - t0)
        z = teacher_logits(n, logprior, g)
        cdf = torch.softmax(z, -1).cumsum_(1)
        sampled = torch.searchsorted(cdf, torch.rand(n, 1, generator=g) * cdf[:, -1:]).squeeze(1).clamp_max(VOCAB - 1)
        del cdf
        parts.append(token_stats_naive(z, sampled, K))
    stats = [torch.cat(x).numpy() for x in zip(*parts)]
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(int(np.clip(rng.lognormal(np.log(400), 0.8), 16, 4096)), tokens - sum(lengths)))
    bounds = np.cumsum([0] + lengths)
    return {"lengths": lengths, "bounds": bounds, "ranks": stats[0], "logprobs": stats[1], "entropy": stats[2],
            "token_logprob": stats[3]}


# ----------------------------------------------------------------------------- storage

def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column (summed over row groups and leaf columns)."""
    md = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def measure_codec(codec, data: dict, ids: np.ndarray, tmp: Path) -> dict:
    b = data["bounds"]
    rows = range(len(data["lengths"]))
    encoded = codec.encode([ids[b[r]:b[r + 1]] for r in rows], [data["logprobs"][b[r]:b[r + 1]] for r in rows])
    table = pa.table({**encoded,
                      "teacher_entropy": pa.array([data["entropy"][b[r]:b[r + 1]] for r in rows], pa.list_(pa.float32())),
                      "teacher_token_logprob": pa.array([data["token_logprob"][b[r]:b[r + 1]] for r in rows], pa.list_(pa.float32()))})
    path = tmp / f"{codec.name}-{codec.params.get('step', 0)}.parquet"
    write_shard(path, table, codec.metadata(K))
    table = pq.read_table(path, columns=[IDS_COLUMN, LOGPROBS_COLUMN])
    decode_s = []
    for _ in range(3):  # best of 3: the machine may be shared
        start = time.perf_counter()
        got_ids, got_lp = codec.decode(table)
        decode_s.append(time.perf_counter() - start)
    assert np.array_equal(got_ids.numpy(), ids), "ids must roundtrip exactly"
    true = data["logprobs"]
    above = true >= codec.floor
    err = np.abs(got_lp.numpy()[above] - true[above])
    assert err.max() <= codec.max_abs_error
    assert (got_lp.numpy()[~above] <= codec.floor + codec.max_abs_error).all()
    n = len(true)
    sizes = {name: v / n for name, v in column_bytes(path).items()}
    return {"codec": codec.name, "params": codec.params, "ids": sizes[IDS_COLUMN], "logprobs": sizes[LOGPROBS_COLUMN],
            "entropy": sizes["teacher_entropy"], "token_logprob": sizes["teacher_token_logprob"],
            "total": sum(sizes.values()), "file": path.stat().st_size / n, "max_err": float(err.max()),
            "mean_err": float(err.mean()), "below_floor": int((~above).sum()), "decode_mtok_s": n / min(decode_s) / 1e6,
            "max_abs_error": codec.max_abs_error, "floor": codec.floor}


def float_columns_without_dictionary(data: dict, tmp: Path) -> float:
    """Entropy + token log-prob bytes/token if the writer disabled dictionary encoding for them
    (pyarrow tries a dictionary first; for 32-bit floats that are nearly all distinct it only costs)."""
    b = data["bounds"]
    rows = range(len(data["lengths"]))
    table = pa.table({c: pa.array([data[k][b[r]:b[r + 1]] for r in rows], pa.list_(pa.float32()))
                      for c, k in (("teacher_entropy", "entropy"), ("teacher_token_logprob", "token_logprob"))})
    path = tmp / "floats-nodict.parquet"
    pq.write_table(table, path, compression="zstd", compression_level=3, use_dictionary=False)
    return sum(column_bytes(path).values()) / len(data["entropy"])


def layout_alternative(data: dict, ids: np.ndarray, tmp: Path, step: float = 1 / 32) -> float:
    """The other id layout tried: ids sorted ascending per token, stored as deltas (3 byte planes),
    log-probs then in id order as absolute codes (2 planes): the set of ids is cheaper, but the
    log-probs lose the small rank gaps. Same file writer; bytes/token of the two blob columns."""
    b = data["bounds"]
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, 1)
    delta = np.diff(sid, axis=1, prepend=0)
    codes = np.clip(np.rint(-np.take_along_axis(data["logprobs"], order, 1) / step), 0, 65535).astype(np.int64)

    def planes(x: np.ndarray, nbytes: int) -> bytes:
        return x.T.reshape(-1).astype("<u4").view(np.uint8).reshape(-1, 4)[:, :nbytes].T.tobytes()

    rows = range(len(data["lengths"]))
    table = pa.table({"ids": pa.array([planes(delta[b[r]:b[r + 1]], 3) for r in rows], pa.binary()),
                      "lps": pa.array([planes(codes[b[r]:b[r + 1]], 2) for r in rows], pa.binary())})
    path = tmp / "sorted-layout.parquet"
    write_shard(path, table, {})
    return sum(column_bytes(path).values()) / len(ids)


def bench_storage(args: argparse.Namespace) -> str:
    tokens = args.tokens or (4_096 if args.quick else 32_768)
    start = time.perf_counter()
    data = teacher_rows(tokens, seed=0)
    gen_s = time.perf_counter() - start
    H = data["entropy"]
    q = np.quantile(H, [0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99])
    ent_line = (f"teacher entropy over {tokens:,} tokens in {len(data['lengths'])} responses (generated in {gen_s:.0f} s): "
                f"{(H < 0.01).mean():.0%} < 0.01 nats, {(H < 0.5).mean():.0%} < 0.5, {(H > 0.672).mean():.0%} > 0.672, "
                f"{(H > 1).mean():.0%} > 1 nat; quantiles 25/50/75/80/90/95/99%: " + " / ".join(f"{x:.3g}" for x in q) +
                f"; mean top-{K} probability mass {np.exp(data['logprobs']).sum(1).mean():.3f}")
    print(ent_line)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("bpe", "random"):
            ids = id_of_rank(VOCAB, order)[torch.from_numpy(data["ranks"])].numpy()
            results[order] = [measure_codec(get_codec(name, **params), data, ids, Path(tmp)) for name, params in CODECS]
            results[order + "_sorted_layout"] = layout_alternative(data, ids, Path(tmp))
        floats_nodict = float_columns_without_dictionary(data, Path(tmp))

    def find(rows: list[dict], codec: str, params: dict) -> dict:
        return next(r for r in rows if r["codec"] == codec and r["params"] == params)

    def name(r: dict) -> str:
        return r["codec"] + (f" step 1/{round(1 / r['params']['step'])}" if "step" in r["params"] else "")

    lines = ["| codec | ids | log-probs | entropy | token log-prob | **total B/token** | vs fp16 row | "
             "bound (floor) | max abs err | mean abs err | decode Mtok/s |", "|---|" + "---:|" * 10]
    for order in ("bpe", "random"):
        for r in results[order]:
            lines.append(f"| {name(r)}{' (default)' if r['codec'] == DEFAULT_CODEC and r['params'] == get_codec(DEFAULT_CODEC).params else ''}"
                         f" [{order} ids] | {r['ids']:.2f} | {r['logprobs']:.2f} | {r['entropy']:.2f} | "
                         f"{r['token_logprob']:.2f} | **{r['total']:.2f}** | {FP16_ROW_BYTES / r['total']:,.0f}x smaller | "
                         f"{r['max_abs_error']:.4g} ({r['floor']:.4g}) | {r['max_err']:.4g} | {r['mean_err']:.4g} | "
                         f"{r['decode_mtok_s']:.1f} |")
    table = "\n".join(lines)
    default = next(r for r in results["bpe"] if r["codec"] == DEFAULT_CODEC and r["params"] == get_codec(DEFAULT_CODEC).params)
    default_rand = next(r for r in results["random"] if r["codec"] == DEFAULT_CODEC and r["params"] == default["params"])
    packed32 = next(r for r in results["bpe"] if r["codec"] == "packed" and r["params"] == {"step": 1 / 32})
    packed32_rand = next(r for r in results["random"] if r["codec"] == "packed" and r["params"] == {"step": 1 / 32})
    notes = (
        f"- default `{DEFAULT_CODEC}` {default['params']}: **{default['total']:.2f} bytes/token** with BPE-like ids "
        f"({default_rand['total']:.2f} with popularity-unrelated ids) vs {FP16_ROW_BYTES:,} for an fp16 logit row "
        f"({FP16_ROW_BYTES / default['total']:,.0f}x); target <= {STORAGE_TARGET:g}: "
        f"{'met' if default['total'] <= STORAGE_TARGET else 'MISSED'}. Log-prob error <= {default['max_abs_error']:g} nats "
        f"(measured max {default['max_err']:.4g}, mean {default['mean_err']:.4g}).\n"
        f"- other id layout (ids sorted per token, delta-coded; log-probs as absolute codes in id order, step 1/32): "
        f"{results['bpe_sorted_layout']:.2f} bytes/token for the two top-k columns [bpe ids] "
        f"({results['random_sorted_layout']:.2f} [random ids]) vs {packed32['ids'] + packed32['logprobs']:.2f} "
        f"({packed32_rand['ids'] + packed32_rand['logprobs']:.2f}) for `packed` step 1/32"
        f"{': no better' if results['bpe_sorted_layout'] >= packed32['ids'] + packed32['logprobs'] else ': SMALLER'}.\n"
        f"- entropy + token log-prob (exact float32) take {default['entropy'] + default['token_logprob']:.2f} bytes/token with "
        f"the writer's pyarrow defaults, {floats_nodict:.2f} with `use_dictionary=False` for these two columns "
        f"(pyarrow dictionary-encodes each column chunk until its dictionary reaches 1 MiB, i.e. the first ~262k "
        f"distinct float32 values, then falls back to plain; for floats that are nearly all distinct the dictionary only "
        f"costs, in every shard of up to a few hundred thousand tokens).\n"
        f"- choice: `{DEFAULT_CODEC}` {default['params']}, the smallest measured codec whose error bound is at most 1/64 nat "
        f"(1.6% relative in p): the readable float16 codec has the same bound (on [-64, 0] only) at "
        f"{find(results['bpe'], 'float16', {})['total']:.2f} bytes/token, uint8 step 1/8 ({find(results['bpe'], 'uint8', {'step': 1 / 8})['total']:.2f}) "
        f"has 4x the error; step 1/16 would save {default['total'] - find(results['bpe'], 'packed', {'step': 1 / 16})['total']:.2f} bytes/token "
        f"at twice the error, 1/64 costs {find(results['bpe'], 'packed', {'step': 1 / 64})['total'] - default['total']:.2f} more for half. "
        f"Its columns are binary (bytes in pandas/datasets): `codec_from_metadata(meta).decode(table)` reads them.")
    print(table + "\n\n" + notes)
    return (f"### Storage: teacher columns per codec (k = {K}, V = {VOCAB:,})\n\n{ent_line}.\n\n"
            "Bytes per response token, compressed column chunks of the Parquet file written by "
            "`pipeline.shards.write_shard` (zstd level 3, pyarrow defaults otherwise). Error: |decoded - true| over all "
            f"top-k log-probs above the codec's floor ({sum(r['below_floor'] for o in ('bpe', 'random') for r in results[o])} "
            "values, over all codecs, fell below a floor; for those the check is decoded <= floor + bound). [bpe ids]: token ids loosely follow popularity, "
            "as BPE vocabularies do; [random ids]: ids unrelated to popularity (pessimistic).\n\n"
            f"{table}\n\n{notes}\n")


# ----------------------------------------------------------------------------- memory

def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _stats(variant: str, hidden, weight, target, token_chunk: int, vocab_chunk: int | None):
    if variant == "naive":
        return token_stats_naive(hidden @ weight.T, target, K)
    return chunked_token_stats(hidden, weight, target, K, token_chunk=token_chunk, vocab_chunk=vocab_chunk)


def memory_worker(args: argparse.Namespace) -> None:
    """One variant in this (fresh) process: peak RSS during the step minus the RSS once inputs exist."""
    torch.manual_seed(0)
    for v in ("naive", "chunked"):  # warm-up: code pages and thread pools count in the baseline
        _stats(v, torch.randn(64, args.hidden), torch.randn(1000, args.hidden), torch.zeros(64, dtype=torch.long), 16, 256)
    hidden = torch.randn(args.tokens, args.hidden)
    weight = torch.randn(VOCAB, args.hidden) / args.hidden ** 0.5 * 4
    target = torch.randint(0, VOCAB, (args.tokens,))
    gc.collect()
    baseline = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    stats = _stats(args.worker, hidden, weight, target, args.token_chunk, args.vocab_chunk or None)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_extra_mib": (_kib("VmHWM") - baseline) / 1024, "seconds": seconds,
                      "mean_entropy": stats.entropy.mean().item()}))


def bench_memory(args: argparse.Namespace) -> str:
    from pipeline.config import ScoreTeacherConfig

    default_chunk = ScoreTeacherConfig().token_chunk  # what the stage uses unless configured
    T, Hd = (4_096, 128) if args.quick else (4_096, 1_024)  # quick: same T (the ratio depends on T / chunk)
    chunks = [256, 1024] if args.quick else [256, 512, 1024, 2048]
    variants = [("naive", 0, 0)] + [("chunked", c, 0) for c in chunks] + [("chunked", default_chunk, 16_384)]
    rows = []
    for variant, tc, vc in variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(T), "--hidden", str(Hd),
               "--token-chunk", str(tc), "--vocab-chunk", str(vc)]
        # every allocation >= 1 MiB in its own mmap: a freed tensor leaves the RSS at once
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
        rows.append({"variant": variant, "token_chunk": tc, "vocab_chunk": vc, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1])
    naive = rows[0]
    full_logits_mib = T * VOCAB * 4 / 2**20
    lines = ["| variant | token_chunk | vocab_chunk | peak extra MiB | memory ratio | seconds (one run) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        r["ratio"] = r["peak_extra_mib"] / naive["peak_extra_mib"]
        lines.append(f"| {r['variant']} | {r['token_chunk'] or '-'} | {r['vocab_chunk'] or '-'} | {r['peak_extra_mib']:,.0f} | "
                     f"{r['ratio']:.3f} | {r['seconds']:.1f} |")
    table = "\n".join(lines)
    config_default = next(r for r in rows if r["token_chunk"] == default_chunk and not r["vocab_chunk"])
    verdict = (f"chunked, token_chunk {default_chunk} (score_teacher.token_chunk default), whole vocabulary rows: "
               f"{config_default['ratio']:.3f}x the naive peak (target <= {MEMORY_TARGET}): "
               f"{'met' if config_default['ratio'] <= MEMORY_TARGET else 'MISSED'}")
    print(table + "\n\n" + verdict)
    return (f"### Memory: statistics step, chunked vs naive (V = {VOCAB:,}, T = {T:,}, H = {Hd:,}, k = {K}, fp32)\n\n"
            "Each variant in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=1 MiB (freed tensors leave the RSS at once), "
            "after a tiny warm-up call of both paths; inputs (hidden [T, H], W [V, H], targets) are built, the RSS is read "
            "(baseline), the kernel's peak-RSS counter is reset (`/proc/self/clear_refs` = 5), the step runs, and "
            "peak extra = VmHWM - baseline. Naive = `hidden @ W.T` (the full fp32 logits, "
            f"{full_logits_mib:,.0f} MiB) + `token_stats_naive` (log_softmax and its exp: two more full tensors). "
            "Seconds: a single run each, for orientation only.\n\n"
            f"{table}\n\n{verdict}.\n")


# ----------------------------------------------------------------------------- accuracy

def bench_accuracy(args: argparse.Namespace) -> str:
    """Both fp32 paths against a float64 log_softmax of the same fp32 logits, at the real vocabulary size."""
    T, Hd = (64, 256) if args.quick else (256, 1_024)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, Hd, generator=g) * torch.logspace(-0.5, 0.7, T)[:, None]  # entropies from ~0 to ~10 nats
    weight = torch.randn(VOCAB, Hd, generator=g) / Hd ** 0.5 * 4
    target = torch.randint(0, VOCAB, (T,), generator=g)
    logits = hidden @ weight.T
    ref = torch.log_softmax(logits.double(), -1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    ref_top = ref.topk(K, -1)
    ref_target = ref.gather(1, target[:, None])[:, 0]
    lines = ["| path | max abs err entropy | max abs err top-k log-prob | max abs err target log-prob | top-k ids equal |",
             "|---|---:|---:|---:|---|"]
    for label, st in [("naive (fp32 log_softmax)", token_stats_naive(logits, target, K)),
                      ("chunked, token_chunk 1024", chunked_token_stats(hidden, weight, target, K)),
                      ("chunked, token_chunk 64, vocab_chunk 16384", chunked_token_stats(hidden, weight, target, K, 64, 16_384))]:
        lines.append(f"| {label} | {(st.entropy.double() - ref_entropy).abs().max():.2e} | "
                     f"{(st.topk_logprobs.double() - ref_top.values).abs().max():.2e} | "
                     f"{(st.target_logprob.double() - ref_target).abs().max():.2e} | {torch.equal(st.topk_ids, ref_top.indices)} |")
    table = "\n".join(lines)
    print(table)
    return (f"### Accuracy: statistics vs a float64 reference (V = {VOCAB:,}, T = {T}, H = {Hd:,})\n\n"
            f"Entropies of the rows from {ref_entropy.min():.2g} to {ref_entropy.max():.3g} nats; the reference is a float64 "
            "log_softmax of the same fp32 logits.\n\n" + table + "\n")


# ----------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[argparse.Namespace], str]] = {"storage": bench_storage, "memory": bench_memory,
                                                           "accuracy": bench_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens, smaller memory shape; prints only")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    parser.add_argument("--tokens", type=int, help="storage: response tokens to generate (default 32,768; quick 4,096)")
    parser.add_argument("--out", type=Path, help="results file (default bench/RESULTS-score_teacher.md unless --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token-chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    command = "python bench/score_teacher.py" + " ".join([""] + sys.argv[1:])
    sections = []
    for name in args.only or list(BENCHES):
        print(f"== {name}")
        sections.append(BENCHES[name](args))
    out = args.out or (None if args.quick else REPO / "bench" / "RESULTS-score_teacher.md")
    if out:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        out.write_text("## score-teacher: storage and memory (`bench/score_teacher.py`)\n\n"
                       f"Command: `{command}`\n\nCPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                       f"pyarrow {pa.__version__}.\n\n" + "\n".join(sections))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
