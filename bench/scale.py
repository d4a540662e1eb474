"""One round end to end at real shapes (Qwen3's 151,936-row vocabulary, 2,048-token responses),
each stage through the real CLI and against its bare baseline in the same process tree.

    nice -n 10 python bench/scale.py [--preset cpu] [--prompts 2] [--n 2] [--max-tokens 2048]
                                     [--lengths 512,1024,2048] [--sweep-rows 1] [--work DIR]

Models: `pipeline.real_shape` (random Qwen3 of real shape; the student never ends early, so every
response is max_tokens long). Stages run as `python -m pipeline.cli STAGE RUN_DIR --config CFG`,
each in its own process, as a user runs them. Baselines, each in its own child process:
  rollout        bare `vllm.LLM.generate` of the same requests (same engine settings, seeds, params)
  score-teacher  bare teacher forward, `model(ids, mask).logits` (full logits), over the stage's batches
  train          the naive objective: the same student forward, full [tokens, V] logits through
                 eopd.losses.naive_objective, backward, clip, AdamW step, one response per micro-batch
Per stage: wall time of the process; its start-up (imports, model load, engine start: wall minus
the stage's own compute seconds, or until train's first line after loading); steady tokens/s (the
stage's own figure: shard work after the model load; train: wall after start-up); peak RSS of the
process tree (psutil, sampled every 0.1 s); bytes per token on disk. Then a sweep: score-teacher
and train alone on `--sweep-rows` responses cut to each of `--lengths` tokens, one sequence per
batch (token_budget = micro_batch_tokens = 1), peak RSS against length: a least-squares slope.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
MIB = 2 ** 20


# --------------------------------------------------------------------------------------------- measuring


def measure(cmd: list[str]) -> dict:
    """Run `cmd` (cwd = repo); wall seconds, peak RSS of its process tree, stdout, timestamped stderr lines."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []  # both streams, timestamped (tqdm.write goes to stdout)
    out: list[str] = []

    def pump(stream, sink: list | None) -> None:
        for line in stream:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if sink is not None:
                sink.append(line)

    threads = [threading.Thread(target=pump, args=(proc.stderr, None), daemon=True),
               threading.Thread(target=pump, args=(proc.stdout, out), daemon=True)]
    for t in threads:
        t.start()
    root, peak, series = psutil.Process(proc.pid), 0, []
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
            peak = max(peak, rss)
            series.append((time.perf_counter() - t0, rss))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(l for _, l in lines[-40:]))
    return {"wall": wall, "peak_rss": peak, "stdout": "".join(out), "stderr": lines, "series": series}


def rss_at(m: dict, t: float) -> float:
    """The tree's RSS last sampled before time t."""
    return max((r for s, r in m["series"] if s <= t), default=0)


def cli(stage: str, run: Path, cfg: Path, *extra: str) -> dict:
    # --allow-config-change: a re-measure (--stages, --set) may change keys of the bench's own run dir
    return measure([sys.executable, "-m", "pipeline.cli", stage, str(run), "--config", str(cfg),
                    "--allow-config-change", *extra])


def child(kind: str, run: Path, cfg_path: Path) -> dict:
    return measure([sys.executable, __file__, "--child", kind, str(run), str(cfg_path)])


def result_of(m: dict) -> dict:
    return json.loads(next(l for l in m["stdout"].splitlines() if l.startswith("RESULT "))[len("RESULT "):])


def stage_rate(m: dict, name: str) -> float:
    """The tokens/s a shard stage prints (its shard work, model load excluded)."""
    line = next(l for l in m["stdout"].splitlines() if l.startswith(f"{name}:") and "tokens/s" in l)
    return float(line.split(" tokens/s")[0].rsplit(" ", 1)[1].replace(",", ""))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.parquet"))


# --------------------------------------------------------------------------------------------- baselines


def bare_rollout(run: Path, cfg) -> dict:
    """The stage's requests (prompts, seeds, sampling params) straight into `LLM.generate`."""
    t0 = time.perf_counter()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.models import make_llm
    from pipeline.shards import iter_stage
    from pipeline.work import derive_seed
    from stages.rollout import STAGE

    r = cfg.rollout
    requests, params = [], []
    for _, t in iter_stage(run / "round-0000" / "rollouts", "rollouts", ""):
        for pid, s, toks in zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist(),
                                t.column("prompt_token_ids").to_pylist()):
            requests.append(TokensPrompt(prompt_token_ids=toks))
            params.append(SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                         max_tokens=r.max_tokens, logprobs=0, seed=derive_seed(cfg.seed, STAGE, 0, pid, s)))
    llm = make_llm(cfg.student.path, r.vllm, seed=derive_seed(cfg.seed, STAGE, 0))
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    return {"startup": startup, "compute": time.perf_counter() - t0,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def bare_teacher(run: Path, cfg) -> dict:
    """`model(ids, mask).logits` over the stage's batches (length-sorted, same token budget)."""
    t0 = time.perf_counter()
    import torch

    from pipeline.models import length_sorted_batches, pad_right
    from pipeline.shards import iter_stage
    from stages.score_teacher import load_teacher

    seqs, tokens = [], 0
    for _, t in iter_stage(run / "round-0000" / "rollouts", "rollouts", ""):
        for p, r in zip(t.column("prompt_token_ids").to_pylist(), t.column("response_token_ids").to_pylist()):
            seqs.append(p + r)
            tokens += len(r)
    model = load_teacher(Path(cfg.teacher.path), cfg.score_teacher)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in length_sorted_batches([len(s) for s in seqs], cfg.score_teacher.token_budget):
            ids, mask = pad_right([seqs[i] for i in batch])
            model(input_ids=ids, attention_mask=mask).logits
    return {"startup": startup, "compute": time.perf_counter() - t0, "tokens": tokens}


def naive_train(run: Path, cfg) -> dict:
    """The same optimiser steps with full logits: student forward, naive_objective, backward, AdamW."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from eopd.losses import ObjectiveConfig, entropy_gate, naive_objective
    from pipeline.models import response_hidden_states
    from pipeline.teacher_data import load_teacher_rows

    tc = cfg.train
    rows = load_teacher_rows(run / "round-0000" / "teacher", cfg.score_teacher.top_k, "")
    model = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=torch.float32).train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    objective = ObjectiveConfig(objective=tc.objective, rkl_estimator=tc.rkl_estimator, fkl_mode=tc.fkl_mode,
                                tau=tc.tau, lam=tc.lam, clip_eps=tc.clip_eps)
    startup = time.perf_counter() - t0
    print("LOADED", file=sys.stderr, flush=True)  # the parent reads the RSS here: extra = peak - this
    t0 = time.perf_counter()
    head = model.get_output_embeddings().weight
    order = list(range(rows.num_rows))
    for a in range(0, len(order), tc.batch_rows):
        step = order[a : a + tc.batch_rows]
        normalizer = float(sum(rows.response_length(i) for i in step))
        for i in step:  # one response per micro-batch, as micro_batch_tokens = one sequence gives
            seq = np.concatenate([rows.prompt_ids[i], rows.response_tokens(i)])
            hidden = response_hidden_states(model, [seq], [len(rows.prompt_ids[i])], torch.device("cpu"))
            batch = rows.token_batch([i])
            loss, _ = naive_objective(hidden, head, batch, objective, normalizer, entropy_gate(batch.teacher_entropy, tc.tau))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"startup": startup, "compute": time.perf_counter() - t0, "tokens": int(rows.offsets[-1])}


# --------------------------------------------------------------------------------------------- the round


def write_config(path: Path, assets, args, **override) -> Path:
    import yaml

    vllm = {"enforce_eager": True, "dtype": "float32", "cpu_kvcache_gib": 1.0, "max_model_len": args.max_tokens + 64}
    one_seq = args.max_tokens + 64
    cfg = {"seed": 0, "student": {"path": str(assets.student)}, "teacher": {"path": str(assets.teacher)},
           "prompts": {"path": str(assets.train_prompts), "limit": args.prompts},
           "rollout": {"n": args.n, "max_tokens": args.max_tokens, "prompts_per_shard": max(1, args.prompts // 2),
                       "vllm": vllm},
           # two sequences per teacher batch (the bare forward's full logits: 2 x 2,100 x 151,936 fp32 = 2.5 GB)
           "score_teacher": {"top_k": 16, "token_budget": 2 * one_seq, "token_chunk": 1024},
           # one step over all responses; one sequence per micro-batch (the naive path's logits: 1.2 GB each)
           "train": {"batch_rows": args.prompts * args.n, "micro_batch_tokens": one_seq, "lr": 1e-5,
                     "checkpoint_every": 50},
           "eval": {"prompts": {"path": str(assets.eval_prompts), "limit": args.eval_prompts}, "verifier": "toy",
                    "samples": 2, "max_tokens": args.eval_tokens, "models": ["final"], "vllm": vllm}}
    for key, value in override.items():
        cfg[key] = {**cfg[key], **value}
    for item in args.overrides:
        key, _, value = item.partition("=")
        section, name = key.split(".", 1)
        cfg[section][name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(cfg))
    return path


def truncated_run(src: Path, dest: Path, length: int, rows: int) -> None:
    """A run dir whose rollouts are the first `rows` responses of `src`, cut to `length` tokens."""
    import pyarrow as pa

    from pipeline.shards import iter_stage
    from pipeline.work import ShardResult, run_shards

    table = pa.concat_tables([t for _, t in iter_stage(src / "round-0000" / "rollouts", "rollouts", "")]).slice(0, rows)
    cols = {name: table.column(name).to_pylist() for name in ("response_token_ids", "response_logprobs")}
    table = table.set_column(table.schema.get_field_index("response_token_ids"), table.schema.field("response_token_ids"),
                             pa.array([r[:length] for r in cols["response_token_ids"]], pa.list_(pa.int32())))
    table = table.set_column(table.schema.get_field_index("response_logprobs"), table.schema.field("response_logprobs"),
                             pa.array([r[:length] for r in cols["response_logprobs"]], pa.list_(pa.float32())))
    run_shards(dest / "round-0000" / "rollouts", 1, {"bench": length}, lambda: lambda i: ShardResult(table, rows * length),
               {"stage": "rollouts"}, desc=f"rollouts cut to {length}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--assets", help="real-shape assets dir (built if missing or different)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--eval-prompts", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--sweep-rows", type=int, default=1)
    ap.add_argument("--work", help="working dir (default: a temp dir, removed at the end)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config key for the round's stages (e.g. train.loss_chunk=256)")
    ap.add_argument("--stages", default="rollout,score-teacher,train,eval,sweep",
                    help="a subset re-measures those on --work's earlier run (its rollouts kept, later outputs redone)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "RUN_DIR", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from pipeline.config import load_config

        kind, run, cfg = args.child
        fn = {"bare-rollout": bare_rollout, "bare-teacher": bare_teacher, "naive-train": naive_train}[kind]
        print("RESULT " + json.dumps(fn(Path(run), load_config(Path(cfg)))), flush=True)
        return

    from pipeline.real_shape import make_real_shape

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    assets = make_real_shape(args.assets or work / "assets", args.preset)
    build_s = time.perf_counter() - t0
    s_info, t_info = assets.info["student"], assets.info["teacher"]
    print(f"models ({args.preset}, built or reused in {build_s:.0f} s): student {s_info['parameters'] / 1e6:.1f}M params "
          f"(hidden {s_info['hidden_size']}, {s_info['num_hidden_layers']} layers, tied), teacher "
          f"{t_info['parameters'] / 1e6:.1f}M (hidden {t_info['hidden_size']}, {t_info['num_hidden_layers']} layers), "
          f"{s_info['rows']:,} rows, tokenizer {s_info['tokenizer_entries']:,} entries", flush=True)
    cfg = write_config(work / "scale.yaml", assets, args)
    run = work / "run"
    todo = set(args.stages.split(","))
    if "rollout" in todo:
        shutil.rmtree(run, ignore_errors=True)
    else:  # re-measure the named stages on the kept earlier outputs
        later = {"score-teacher": ["teacher", "train", "student"], "train": ["train", "student"]}
        for stage in ("score-teacher", "train"):
            for name in later[stage] if stage in todo else []:
                shutil.rmtree(run / "round-0000" / name, ignore_errors=True)
        shutil.rmtree(run / "eval", ignore_errors=True)
    rows_out: list[dict] = []

    def report(name: str, stage: dict, stage_startup: float, stage_work: float, tokens: int, base: dict,
               base_m: dict) -> None:
        row = {"stage": name, "tokens": tokens, "wall": stage["wall"], "startup": stage_startup, "work": stage_work,
               "tok_s": tokens / stage_work, "peak_mib": stage["peak_rss"] / MIB, "base_wall": base_m["wall"],
               "base_startup": base["startup"], "base_work": base["compute"], "base_tok_s": base["tokens"] / base["compute"],
               "base_peak_mib": base_m["peak_rss"] / MIB}
        rows_out.append(row)
        print(f"{name}: {tokens:,} tokens; stage work {stage_work:.1f} s ({row['tok_s']:,.0f} tok/s) vs bare "
              f"{base['compute']:.1f} s: {stage_work / base['compute']:.3f}x; wall {stage['wall']:.1f} s vs "
              f"{base_m['wall']:.1f} s; start-up {stage_startup:.1f} s vs {base['startup']:.1f} s; peak RSS "
              f"{row['peak_mib']:,.0f} vs {row['base_peak_mib']:,.0f} MiB: {row['peak_mib'] / row['base_peak_mib']:.3f}x",
              flush=True)

    from pipeline.shards import iter_stage

    if "rollout" in todo:  # the stage, then the bare engine on the same requests
        st = cli("rollout", run, cfg)
        rate = stage_rate(st, "rollout")
        base_m = child("bare-rollout", run, cfg)
        base = result_of(base_m)
    lengths = [len(r) for _, t in iter_stage(run / "round-0000" / "rollouts", "rollouts", "")
               for r in t.column("response_token_ids").to_pylist()]
    tokens = sum(lengths)
    if "rollout" in todo:
        assert base["tokens"] == tokens, f"bare engine made {base['tokens']} tokens, the stage {tokens}"
        report("rollout", st, st["wall"] - tokens / rate, tokens / rate, tokens, base, base_m)
    print(f"  responses: {len(lengths)}, lengths {min(lengths)}..{max(lengths)}", flush=True)

    if "score-teacher" in todo:
        st = cli("score-teacher", run, cfg)
        rate = stage_rate(st, "score-teacher")
        base_m = child("bare-teacher", run, cfg)
        report("score-teacher", st, st["wall"] - tokens / rate, tokens / rate, tokens, result_of(base_m), base_m)
    if "train" not in todo:
        todo -= {"eval"}  # it needs the trained student (the sweep needs only the round's rollouts)

    if "train" in todo:
        st = cli("train", run, cfg)
        loaded = next(t for t, l in st["stderr"] if l.startswith("train round 0:"))
        base_m = child("naive-train", run, cfg)
        report("train", st, loaded, st["wall"] - loaded, tokens, result_of(base_m), base_m)
        # Above the loaded state (model, imports; the optimiser state comes in the step in both)
        base_loaded = next(t for t, l in base_m["stderr"] if l == "LOADED")
        extra, base_extra = st["peak_rss"] - rss_at(st, loaded), base_m["peak_rss"] - rss_at(base_m, base_loaded)
        print(f"  train peak above the loaded model: {extra / MIB:,.0f} MiB vs naive {base_extra / MIB:,.0f} MiB: "
              f"{extra / base_extra:.3f}x (target <= 0.3)", flush=True)

    if "eval" in todo:
        ev = cli("eval", run, cfg, "--model", "final")
        print(f"eval (final student, {args.eval_prompts} problems x 2 samples, up to {args.eval_tokens} tokens): wall "
              f"{ev['wall']:.1f} s, peak RSS {ev['peak_rss'] / MIB:,.0f} MiB", flush=True)

    r0 = run / "round-0000"
    roll_b, teach_b = dir_bytes(r0 / "rollouts"), dir_bytes(r0 / "teacher")
    ckpt = sum(p.stat().st_size for p in (r0 / "train").rglob("*") if p.is_file())
    student_b = sum(p.stat().st_size for p in (r0 / "student").rglob("*") if p.is_file())
    V = s_info["rows"]
    print(f"disk: rollouts {roll_b / tokens:.2f} B/token (bare int32 id + float32 log-prob: 8); teacher shards "
          f"{teach_b / tokens:.2f} B/token, teacher columns alone {(teach_b - roll_b) / tokens:.2f} (an fp16 logit row: "
          f"{2 * V:,}); checkpoint {ckpt / MIB:,.0f} MiB, student dir {student_b / MIB:,.0f} MiB", flush=True)

    # memory against response length: one sequence per batch, so each batch grows with the length
    sweep = []
    for L in [int(x) for x in args.lengths.split(",")] if "sweep" in todo else []:
        d = work / f"sweep-{L}"
        shutil.rmtree(d, ignore_errors=True)
        truncated_run(run, d, L, args.sweep_rows)
        c = write_config(work / f"sweep-{L}.yaml", assets, args, score_teacher={"token_budget": 1},
                         train={"micro_batch_tokens": 1, "batch_rows": args.sweep_rows})
        s = cli("score-teacher", d, c)
        t = cli("train", d, c)
        sweep.append((L, s["peak_rss"] / MIB, t["peak_rss"] / MIB, s["wall"], t["wall"]))
        print(f"sweep length {L}: score-teacher peak {s['peak_rss'] / MIB:,.0f} MiB ({s['wall']:.1f} s), "
              f"train peak {t['peak_rss'] / MIB:,.0f} MiB ({t['wall']:.1f} s)", flush=True)

    def slope(ys: list[float]) -> float:
        xs = [p[0] for p in sweep]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    print("\n| stage | tokens | wall s | start-up s | work s | tokens/s | peak RSS MiB | bare wall s | bare start-up s "
          "| bare work s | bare tokens/s | time ratio | peak RSS ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['stage']} | {r['tokens']:,} | {r['wall']:.1f} | {r['startup']:.1f} | {r['work']:.1f} | {r['tok_s']:,.0f} "
              f"| {r['peak_mib']:,.0f} | {r['base_wall']:.1f} | {r['base_startup']:.1f} | {r['base_work']:.1f} "
              f"| {r['base_tok_s']:,.0f} | **{r['work'] / r['base_work']:.3f}x** | {r['peak_mib'] / r['base_peak_mib']:.3f}x |")
    if len(sweep) > 1:
        print(f"\nsweep ({args.sweep_rows} responses, one sequence per batch): peak RSS slope score-teacher "
              f"{slope([p[1] for p in sweep]) * 1024:,.0f} MiB per 1k response tokens, train "
              f"{slope([p[2] for p in sweep]) * 1024:,.0f} MiB per 1k")
        # Below score_teacher.token_chunk (1,024) the statistics block [min(T, chunk), V] itself grows with
        # T; above it only activations and per-token outputs do: the increments show both regimes.
        print("| length | score-teacher peak MiB | increment MiB per 1k tokens | train peak MiB | increment MiB per 1k |"
              "\n|---:|---:|---:|---:|---:|")
        for j, (L, a, b, _, _) in enumerate(sweep):
            inc = ("", "") if j == 0 else tuple(f"{(y - y0) / (L - sweep[j - 1][0]) * 1024:,.0f}" for y, y0 in
                                               ((a, sweep[j - 1][1]), (b, sweep[j - 1][2])))
            print(f"| {L:,} | {a:,.0f} | {inc[0]} | {b:,.0f} | {inc[1]} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
