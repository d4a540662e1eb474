"""Peer benchmark: TRL's DistillationTrainer against eopd-pipe's default, same toy, same budget.

    pip install -e '.[bench]'          # trl + accelerate; or: pip install --no-deps trl==1.16.0 accelerate==1.15.0
    python bench/trl_peer.py --assets toy-assets --out runs/peer --seed 0
    python bench/trl_peer.py --assets toy-assets --out runs/peer --seed 0 --ours runs/seeds/eopd-topk-s0 \\
        --curve 200 400 800 1200         # reuse a finished run; pass@1 against wall-clock at those steps

Both systems distil the same make-toy teacher into the same base student for the same optimiser
steps, each step on 16 fresh responses of the current student (temperature 1, top-p 1, up to
rollout.max_tokens tokens), with the same AdamW (lr, weight decay 0), the same schedule
(`pipeline.training.lr_factor`: linear warm-up, cosine to min_lr_ratio) and the same gradient clip,
all read from configs/default.yaml (plus --set overrides). Then `eopd-pipe eval` scores both
students on the same eval problems with the same per-sample seeds, and one table prints pass@1,
pass@8 and time per step of both.

- TRL 1.16 `DistillationTrainer` (online teacher; generalised JSD at beta = 1 = reverse KL over
  the full vocabulary; HF-generate rollouts every step; `use_cpu=True, bf16=False`, no gradient
  checkpointing, dropout off). Time: its train loop (`train_runtime`), model loading excluded.
- eopd-pipe: `eopd-pipe run OURS` with configs/default.yaml (rounds of rollout.n x
  prompts_per_round responses, batch_rows per step, the teacher's top-k cached), unless --ours
  names a finished run. Time: from round 0's first stage start to the last round's student
  (engine start-up and evals excluded), split into rollout / score-teacher / train.

Threads: each system as it runs fastest here. TRL gets --threads torch threads, set before torch
loads (OMP_NUM_THREADS too; on the 2-core machine 1 thread is its fastest: 347-402 s against 524 s
on 2, bench/RESULTS.md); eopd-pipe runs with its config's `cpu_threads` (configs/default.yaml: 1
per process: vLLM's engine process, and the teacher and trainer in `run`'s process). They run one
after the other on the same machine: only a ratio measured in one sitting means anything.
Results: OUT/peer-sSEED.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def toy_sets(assets: Path, seed: int) -> list[str]:
    return [f"seed={seed}", f"student.path={assets}/student", f"teacher.path={assets}/teacher",
            f"prompts.path={assets}/train_prompts.jsonl", f"eval.prompts.path={assets}/eval_prompts.jsonl"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def check_trl() -> None:
    try:
        import accelerate  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench/trl_peer.py needs TRL and accelerate ({e}); install the bench extra: "
                         "pip install -e '.[bench]' (or pip install --no-deps trl==1.16.0 accelerate==1.15.0)")


# ----------------------------------------------------------------------------- TRL


def trl_config_kwargs(cfg, steps: int, seed: int) -> dict[str, Any]:
    """DistillationConfig arguments equal to eopd-pipe's settings `cfg` (a pipeline Config)."""
    tc, rc = cfg.train, cfg.rollout
    return dict(max_steps=steps, per_device_train_batch_size=tc.batch_rows, gradient_accumulation_steps=1,
                learning_rate=tc.lr, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm,
                beta=1.0,  # generalised JSD at beta 1 = reverse KL(q || p), full vocabulary
                temperature=rc.temperature, top_p=rc.top_p, top_k=0, max_completion_length=rc.max_tokens,
                use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
                seed=seed, data_seed=seed, shuffle_dataset=True, dataloader_num_workers=0, logging_steps=50,
                save_strategy="no", report_to=[], remove_unused_columns=False)


def make_optimizer(model, cfg, steps: int):
    """AdamW and the schedule exactly as eopd-pipe's trainer builds them (pipeline/training.py)."""
    import torch

    from pipeline.training import lr_factor

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, cfg.train))
    return opt, sched


def prompt_dataset(assets: Path, tokenizer):
    """The toy's training prompts as TRL's `prompt` column; checks TRL tokenises them as eopd-pipe does."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (assets / "train_prompts.jsonl").read_text().splitlines() if line.strip()]
    for r in rows[:32]:
        ours = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        theirs = tokenizer(text=[r["prompt"]])["input_ids"][0]
        if ours != theirs:
            raise SystemExit(f"TRL would tokenise {r['prompt']!r} as {theirs}, eopd-pipe as {ours}: not the same prompts")
    return Dataset.from_list([{"prompt": r["prompt"]} for r in rows])


def train_trl(assets: Path, out: Path, cfg, steps: int, seed: int, save_at: list[int], threads: int) -> dict:
    """Run TRL's DistillationTrainer; save the student at `save_at` steps and at the end."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(threads)
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(assets / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(assets / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher", dtype=torch.float32)
    dataset = prompt_dataset(assets, tokenizer)
    args = DistillationConfig(output_dir=str(out / "trainer"), **trl_config_kwargs(cfg, steps, seed))
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        """Wall-clock of each saved step from the train loop's start, the saving itself excluded."""

        def __init__(self) -> None:
            self.t0, self.paused = None, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step in save_at:
                marks[state.global_step] = time.perf_counter() - self.t0 - self.paused
                t = time.perf_counter()
                save(model, out / f"step-{state.global_step:05d}")
                self.paused += time.perf_counter() - t

    def save(model, where: Path) -> None:
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)

    clock = Clock()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[clock],
                                  optimizers=make_optimizer(student, cfg, steps))
    load_s = time.perf_counter() - t_load
    result = trainer.train()
    train_s = result.metrics["train_runtime"] - clock.paused
    save(trainer.model, out / "final")
    marks[steps] = train_s
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"load_s": load_s, "train_s": train_s, "s_per_step": train_s / steps, "saved_s": clock.paused,
            "step_wall_s": {str(k): v for k, v in sorted(marks.items())}, "first_losses": losses[:3],
            "last_losses": losses[-3:], "log_history": trainer.state.log_history}


# ----------------------------------------------------------------------------- eopd-pipe


def run_ours(run_dir: Path, assets: Path, seed: int, sets: list[str], env: dict) -> float:
    """`eopd-pipe run` of the default (resumes; a finished run is not redone). Returns its wall."""
    t0 = time.time()
    cmd = cli("run", str(run_dir), *set_args(toy_sets(assets, seed) + ["eval.models=[base, final]"] + sets))
    print("$", " ".join(cmd[1:]).replace("-m pipeline.cli", "eopd-pipe"), flush=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "ab") as log:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"eopd-pipe run {run_dir} failed (exit {code}); see {run_dir}.log; run again to resume")
    return time.time() - t0


def our_timeline(run_dir: Path) -> dict:
    """From ROUND/timings.jsonl: the wall-clock at which each round's student was written, counted
    from round 0's first stage start, and the stage walls summed (where the time goes)."""
    rounds = sorted(run_dir.glob("round-*/timings.jsonl"))
    if not rounds:
        raise SystemExit(f"{run_dir} has no round-*/timings.jsonl: not an eopd-pipe run directory")
    lines = {p.parent.name: [json.loads(x) for x in p.read_text().splitlines() if x.strip()] for p in rounds}
    start = min(x["end"] - x["wall_s"] for ls in lines.values() for x in ls)
    ends, stages = {}, {}
    for name, ls in lines.items():
        for x in ls:
            stages[x["stage"]] = stages.get(x["stage"], 0.0) + x["wall_s"]
            if x["stage"] == "train":
                ends[int(name.split("-")[1])] = x["end"] - start
    return {"round_end_s": {str(k): v for k, v in sorted(ends.items())}, "train_s": max(ends.values()),
            "stage_wall_sum_s": stages, "rounds": len(ends)}


# ----------------------------------------------------------------------------- eval


def evaluate(run_dir: Path, model: str, sets: list[str], env: dict) -> dict:
    """`eopd-pipe eval RUN_DIR --model MODEL` (skipped when its result exists); returns eval/MODEL.json."""
    result = run_dir / "eval" / f"{model}.json"
    if not result.is_file():
        cmd = cli("eval", str(run_dir), "--model", model, *set_args(sets))
        print("$", " ".join(cmd[1:]).replace("-m pipeline.cli", "eopd-pipe"), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def pass_at(result: dict, k: int) -> float:
    return 100.0 * float(result["pass_at_k"][str(k)])


def eval_trl_model(model_dir: Path, eval_dir: Path, assets: Path, seed: int, sets: list[str], env: dict) -> dict:
    """A TRL student through `eopd-pipe eval`: a run directory whose student.path is that model,
    evaluated as --model base (same eval problems and per-sample seeds as every model of the seed)."""
    s = toy_sets(assets, seed) + sets + [f"student.path={model_dir}", "eval.models=[base]"]
    return evaluate(eval_dir, "base", s, env)


def plot_curve(result: dict, path: Path, title: str | None = None) -> Path:
    """pass@1 against train-loop wall-clock for both systems (points at the --curve steps and the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, label, style in (("eopd-pipe", f"eopd-pipe ({result['eopd-pipe']['objective']}, "
                                f"{result['eopd-pipe']['rkl_estimator']} RKL)", "o-"),
                               ("trl", "TRL DistillationTrainer (beta 1)", "s--")):
        pts = result["curve"][name]
        ax.plot([0] + [p["wall_s"] for p in pts], [result["base"]["pass@1"]] + [p["pass@1"] for p in pts], style, label=label)
        for p in pts:
            ax.annotate(f"{p['step']}", (p["wall_s"], p["pass@1"]), textcoords="offset points", xytext=(4, -11), fontsize=7)
    for key, label in (("base", "base student"), ("teacher", "teacher")):
        if key in result:
            ax.axhline(result[key]["pass@1"], color="grey", lw=0.8, ls=":")
            ax.text(0, result[key]["pass@1"] + 0.8, label, fontsize=7, color="grey")
    ax.set_xlabel("train-loop wall-clock, s (labels: optimiser steps)")
    ax.set_ylabel("pass@1 on 256 held-out problems, %")
    ax.set_title(title or f"Learning per minute on the toy, seed {result['seed']}, {result['steps']} steps x 16 responses",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, required=True, help="a make-toy directory")
    ap.add_argument("--out", type=Path, default=Path("runs/peer"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours", type=Path, default=None,
                    help="our run directory (default OUT/ours-sSEED; run with the default config if not finished)")
    ap.add_argument("--curve", type=int, nargs="*", default=[],
                    help="also evaluate both students at these optimiser steps (pass@1 against wall-clock)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1),
                    help="torch threads of the TRL process (default OMP_NUM_THREADS, else all cores; 1 is its fastest on 2 cores)")
    ap.add_argument("--skip-trl", action="store_true", help="only (re)read results already written")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for both systems (repeatable)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when torch loads (check_trl imports it)
    check_trl()

    from pipeline.config import load_config

    assets, out = args.assets.resolve(), args.out.resolve()
    if not (assets / "teacher").is_dir():
        raise SystemExit(f"{assets} is not a make-toy directory (no teacher/); run `eopd-pipe make-toy {assets}`")
    cfg = load_config(None, toy_sets(assets, args.seed) + args.sets)
    steps_per_round = cfg.rollout.n * cfg.prompts.prompts_per_round // cfg.train.batch_rows
    steps = cfg.rounds * steps_per_round
    env = dict(os.environ)
    out.mkdir(parents=True, exist_ok=True)

    # eopd-pipe first, then TRL: adjacent in time, the same environment.
    ours = (args.ours or out / f"ours-s{args.seed}").resolve()
    ours_wall = None
    if not (ours / "eval" / "final.json").is_file():
        ours_wall = run_ours(ours, assets, args.seed, args.sets, env)
    timeline = our_timeline(ours)
    trl_dir = out / f"trl-s{args.seed}"
    summary_path = trl_dir / "train.json"
    if not summary_path.is_file() and not args.skip_trl:
        trl_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        summary = train_trl(assets, trl_dir, cfg, steps, args.seed, sorted(args.curve), args.threads)
        summary.update(threads=args.threads, process_wall_s=time.time() - t0)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    summary = json.loads(summary_path.read_text())

    eval_sets = args.sets
    ours_final = evaluate(ours, "final", [], env)
    trl_final = eval_trl_model(trl_dir / "final", trl_dir / "eval-final", assets, args.seed, eval_sets, env)
    curve: dict[str, list] = {"eopd-pipe": [], "trl": []}
    for step in sorted(args.curve):
        if step % steps_per_round:
            raise SystemExit(f"--curve {step}: our students are written every {steps_per_round} steps (one round)")
        r = step // steps_per_round - 1  # the round whose last step is `step`
        res = evaluate(ours, f"round-{r}", [], env)
        curve["eopd-pipe"].append({"step": step, "wall_s": timeline["round_end_s"][str(r)], "pass@1": pass_at(res, 1)})
        res = eval_trl_model(trl_dir / f"step-{step:05d}", trl_dir / f"eval-step-{step:05d}", assets, args.seed, eval_sets, env)
        curve["trl"].append({"step": step, "wall_s": summary["step_wall_s"][str(step)], "pass@1": pass_at(res, 1)})
    curve["eopd-pipe"].append({"step": steps, "wall_s": timeline["train_s"], "pass@1": pass_at(ours_final, 1)})
    curve["trl"].append({"step": steps, "wall_s": summary["train_s"], "pass@1": pass_at(trl_final, 1)})
    base = evaluate(ours, "base", [], env)
    teacher = evaluate(ours, "teacher", [], env)

    cfg_ours = json.loads(json.dumps(load_config(ours / "config.yaml").train.model_dump()))
    result = {
        "seed": args.seed, "steps": steps, "threads": summary.get("threads"),
        "eopd-pipe": {"run": str(ours), "objective": cfg_ours["objective"], "rkl_estimator": cfg_ours["rkl_estimator"],
                      "pass@1": pass_at(ours_final, 1), "pass@8": pass_at(ours_final, 8),
                      "distinct_correct": ours_final["mean_distinct_correct"],
                      "train_s": timeline["train_s"], "s_per_step": timeline["train_s"] / steps,
                      "stage_wall_sum_s": timeline["stage_wall_sum_s"], "process_wall_s": ours_wall},
        "trl": {"pass@1": pass_at(trl_final, 1), "pass@8": pass_at(trl_final, 8),
                "distinct_correct": trl_final["mean_distinct_correct"], "train_s": summary["train_s"],
                "s_per_step": summary["s_per_step"], "load_s": summary["load_s"],
                "process_wall_s": summary.get("process_wall_s")},
        "base": {"pass@1": pass_at(base, 1), "pass@8": pass_at(base, 8)},
        "teacher": {"pass@1": pass_at(teacher, 1), "pass@8": pass_at(teacher, 8)},
        "curve": curve,
    }
    result["time_ratio"] = result["eopd-pipe"]["train_s"] / result["trl"]["train_s"]
    (out / f"peer-s{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    o, t = result["eopd-pipe"], result["trl"]
    print(f"\nseed {args.seed}, {steps} optimiser steps of {cfg.train.batch_rows} fresh responses each; base pass@1 "
          f"{result['base']['pass@1']:.1f}")
    print("| system | reverse-KL signal | pass@1 | pass@8 | train loop s | s / step |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| eopd-pipe ({o['objective']}, rkl_estimator {o['rkl_estimator']}) | cached teacher top-k | "
          f"{o['pass@1']:.1f} | {o['pass@8']:.1f} | {o['train_s']:.0f} | {o['s_per_step']:.3f} |")
    print(f"| TRL {__import__('trl').__version__} DistillationTrainer, beta 1 | online teacher, full vocabulary | "
          f"{t['pass@1']:.1f} | {t['pass@8']:.1f} | {t['train_s']:.0f} | {t['s_per_step']:.3f} |")
    print(f"time ratio eopd-pipe / TRL: {result['time_ratio']:.2f}x; eopd-pipe stage walls summed: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in o["stage_wall_sum_s"].items()))
    print(f"wrote {out / f'peer-s{args.seed}.json'}, plot {plot_curve(result, out / f'curve-s{args.seed}.png')}")


if __name__ == "__main__":
    main()
