"""Memory and time of the gated EOPD loss through the LM head: chunked_objective vs naive_objective.

    python bench/train_loss.py            # V = 151,936, N = 4,096, H = 1,024, k = 16, fp32, CPU
    python bench/train_loss.py --quick    # a small shape, seconds (a smoke run; writes nothing)

Memory: each variant in its own fresh subprocess (so one variant's freed memory cannot hide
another's peak). A tiny call of both paths first loads code pages and thread pools; then the
inputs (hidden [N, H] and W [V, H] requiring grad, the teacher batch) are built and the resident
set size is read (the baseline); the kernel's peak-RSS counter is reset to the current RSS
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0); one forward + backward runs; peak extra memory
= VmHWM (/proc/self/status) - baseline. MALLOC_MMAP_THRESHOLD_=1 MiB makes glibc mmap every large
tensor, so a freed one leaves the RSS at once. Both variants include the [V, H] weight gradient.

Time: one more fresh subprocess with the default allocator runs the variants round-robin (a
warm-up round, then --repeats rounds), so a drift in background load hits all variants alike;
the median wall clock of forward + backward per variant is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eopd.losses import ObjectiveConfig, TokenBatch, chunked_objective, naive_objective  # noqa: E402

FULL = dict(vocab=151_936, tokens=4_096, hidden=1_024, k=16, repeats=3, chunks=[256, 512, 1024, 2048])
QUICK = dict(vocab=16_384, tokens=1_024, hidden=256, k=16, repeats=2, chunks=[128, 256])
MEMORY_TARGET, TIME_TARGET = 0.3, 1.2


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def make_inputs(vocab: int, tokens: int, hidden: int, k: int, seed: int = 0):
    """Random fp32 inputs with realistic shapes; ~20% of tokens above tau = 0.8 (as in the paper)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden ** 0.5)).requires_grad_(True)
    # k distinct ids per row without a [tokens, vocab] temporary
    topk_ids = (torch.randint(vocab, (tokens, 1), generator=g) + torch.arange(k) * 7_919) % vocab
    topk_logprobs = torch.log_softmax(torch.randn(tokens, k, generator=g) * 2, -1) + torch.log(torch.tensor(0.95))
    batch = TokenBatch(
        sampled_ids=topk_ids[:, 0].clone(),
        behaviour_logprobs=-torch.rand(tokens, generator=g) * 3,
        teacher_token_logprobs=topk_logprobs[:, 0].clone(),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_logprobs,
        teacher_entropy=-torch.log(torch.rand(tokens, generator=g)) * 0.5,
    )
    return h, w, batch


def _fwd_bwd(variant: str, chunk: int, h, w, batch, cfg, tokens: int) -> dict:
    if variant == "naive":
        loss, stats = naive_objective(h, w, batch, cfg, float(tokens))
    else:
        loss, stats = chunked_objective(h, w, batch, cfg, float(tokens), chunk_size=chunk)
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    h.grad = w.grad = None
    return stats


def worker(args: argparse.Namespace) -> None:
    """memory: one forward + backward of one variant; time: every variant round-robin."""
    cfg = ObjectiveConfig()  # the paper's EOPD: sampled RKL + gated renormalised top-k FKL
    # A tiny call first, so that code pages and thread pools loaded on first use are in the baseline.
    for fn in (naive_objective, chunked_objective):
        th, tw, tb = make_inputs(1_000, 64, args.hidden, args.k)
        fn(th, tw, tb, cfg, 64.0)[0].backward()
    del th, tw, tb
    h, w, batch = make_inputs(args.vocab, args.tokens, args.hidden, args.k)
    gc.collect()
    if args.mode == "memory":
        baseline = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        stats = _fwd_bwd(args.worker, args.chunk, h, w, batch, cfg, args.tokens)
        print(f"  memory: {args.worker} {args.chunk or ''} {(_proc_status_kib('VmHWM') - baseline) / 1024:,.0f} MiB",
              file=sys.stderr, flush=True)
        print(json.dumps({"peak_extra_mib": (_proc_status_kib("VmHWM") - baseline) / 1024,
                          "gate_fraction": stats["gated_tokens"] / stats["tokens"]}))
        return
    variants = [("naive", 0)] + [("chunked", c) for c in args.chunks]
    times: dict[str, list[float]] = {f"{v}:{c}": [] for v, c in variants}
    for _ in range(args.repeats + 1):  # round 0 is the warm-up
        for variant, chunk in variants:
            start = time.perf_counter()
            _fwd_bwd(variant, chunk, h, w, batch, cfg, args.tokens)
            times[f"{variant}:{chunk}"].append(time.perf_counter() - start)
            print(f"  round {len(times[f'{variant}:{chunk}']) - 1}: {variant} {chunk or ''} "
                  f"{times[f'{variant}:{chunk}'][-1]:.2f} s", file=sys.stderr, flush=True)
            gc.collect()
    print(json.dumps(times))


def _run_worker(extra: list[str], sizes: dict, env: dict) -> dict:
    cmd = [sys.executable, __file__, *extra]
    for key in ("vocab", "tokens", "hidden", "k", "repeats"):
        cmd += [f"--{key}", str(sizes[key])]
    # stderr (progress, errors) goes straight to ours; stdout carries the JSON result
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env={**os.environ, **env})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(sizes: dict, chunks: list[int]) -> list[dict]:
    """Memory: a fresh subprocess per variant, with every allocation of 1 MiB or more in its own
    mmap so that a freed tensor leaves the RSS at once (glibc's default threshold adapts upwards
    and keeps freed chunks below 32 MiB resident). Time: one more subprocess with the default
    allocator running the variants round-robin, so background load drifts hit all of them alike."""
    rows = []
    for variant, chunk in [("naive", 0)] + [("chunked", c) for c in chunks]:
        mem = _run_worker(["--worker", variant, "--mode", "memory", "--chunk", str(chunk)], sizes,
                          {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        rows.append({"variant": variant, "chunk": chunk, **mem})
    times = _run_worker(["--worker", "all", "--mode", "time", "--chunks", *map(str, chunks)], sizes, {})
    for row in rows:
        row["times_s"] = times[f"{row['variant']}:{row['chunk']}"]
        row["time_s"] = statistics.median(row["times_s"][1:])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape, 2 chunk sizes; prints only")
    parser.add_argument("--chunks", type=int, nargs="+", help="chunk sizes to measure")
    parser.add_argument("--out", type=Path, help="results file (default bench/RESULTS-train_loss.md unless --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("memory", "time"), help=argparse.SUPPRESS)
    for key in ("vocab", "tokens", "hidden", "k", "repeats"):
        parser.add_argument(f"--{key}", type=int)
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({key: getattr(args, key) for key in ("vocab", "tokens", "hidden", "k", "repeats") if getattr(args, key)})
    if args.worker:
        args.chunks = args.chunks or []
        worker(args)
        return
    chunks = args.chunks or sizes["chunks"]
    command = "python bench/train_loss.py" + (" --quick" if args.quick else "") + \
        "".join(f" --{k} {getattr(args, k)}" for k in ("vocab", "tokens", "hidden", "k", "repeats") if getattr(args, k)) + \
        (" --chunks " + " ".join(map(str, args.chunks)) if args.chunks else "")
    print(f"gated EOPD loss, forward + backward through the LM head: V={sizes['vocab']:,} N={sizes['tokens']:,} "
          f"H={sizes['hidden']:,} k={sizes['k']} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("memory: peak RSS (VmHWM, reset via /proc/self/clear_refs) of one forward + backward minus the RSS once the "
          "inputs exist, a fresh subprocess per variant with MALLOC_MMAP_THRESHOLD_=1MiB (freed tensors leave the RSS)")
    print(f"time: one more subprocess, default allocator, variants round-robin: median of {sizes['repeats']} rounds "
          "after a warm-up round\n")
    load_before = os.getloadavg()
    rows = measure(sizes, chunks)
    load_after = os.getloadavg()
    naive = rows[0]
    lines = ["| variant | chunk | peak extra MiB | memory ratio | median s | time ratio | paired time ratio | all times s (warm-up first) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        row["mem_ratio"] = row["peak_extra_mib"] / naive["peak_extra_mib"]
        row["time_ratio"] = row["time_s"] / naive["time_s"]
        # median over rounds of (this variant / naive in the same round): steadier under drifting load
        row["paired_ratio"] = statistics.median(t / n for t, n in zip(row["times_s"][1:], naive["times_s"][1:]))
        lines.append(f"| {row['variant']} | {row['chunk'] or '-'} | {row['peak_extra_mib']:,.0f} | {row['mem_ratio']:.3f} | "
                     f"{row['time_s']:.2f} | {row['time_ratio']:.3f} | {row['paired_ratio']:.3f} | "
                     f"{', '.join(f'{t:.2f}' for t in row['times_s'])} |")
    table = "\n".join(lines)
    print(table)
    ok = [r for r in rows[1:] if r["mem_ratio"] <= MEMORY_TARGET]
    best = min(ok or rows[1:], key=lambda r: r["time_ratio"])
    verdict = (f"fastest chunk within the memory target: {best['chunk']} -> memory {best['mem_ratio']:.3f}x "
               f"(target <= {MEMORY_TARGET}), time {best['time_ratio']:.3f}x (target <= {TIME_TARGET}): "
               f"{'both targets met' if best['mem_ratio'] <= MEMORY_TARGET and best['time_ratio'] <= TIME_TARGET else 'TARGET MISSED'}")
    print("\n" + verdict)
    out = args.out or (None if args.quick else REPO / "bench" / "RESULTS-train_loss.md")
    if out:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        out.write_text(
            "## Training loss: chunked vs naive LM-head objective (`bench/train_loss.py`)\n\n"
            f"Command: `{command}`\n\n"
            f"Gated EOPD loss (paper defaults), forward + backward through the LM head, V={sizes['vocab']:,}, "
            f"N={sizes['tokens']:,}, H={sizes['hidden']:,}, k={sizes['k']}, fp32 on CPU ({cpu}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}); gate fraction {naive['gate_fraction']:.2f}.\n\n"
            "Memory: one forward + backward in a fresh subprocess per variant, with MALLOC_MMAP_THRESHOLD_=1 MiB so "
            "that freed tensors leave the RSS, after a tiny warm-up call; peak RSS (VmHWM, reset through "
            "/proc/self/clear_refs just before) minus the RSS once the inputs exist. Both include the [V, H] "
            "weight gradient. Time: one more subprocess with the default allocator running the variants "
            f"round-robin, median of {sizes['repeats']} rounds after a warm-up round. Load average "
            f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after.\n\n"
            f"{table}\n\n{verdict}.\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
