"""`report` and `compare` on run directories shaped as real ones: metrics.jsonl lines with the keys
stages/train.py writes (NaN where it writes NaN) and eval JSONs made by stages/eval.py's own
summary code."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.eval import Response, summarize
from stages.report import compare_runs, make_report, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS_PER_ROUND = 6


def metrics_line(round_index: int, step: int, rng: random.Random, student_entropy: float) -> dict:
    """One line as stages/train.py writes it (same keys; NaN top10_change at a run's first step)."""
    gated = rng.random() < 0.8
    rkl, fkl = rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.9)
    return {"round": round_index, "step": step, "global_step": round_index * STEPS_PER_ROUND + step, "lr": 3e-3,
            "grad_norm": rng.uniform(0.5, 2.0), "loss": rkl + fkl, "rkl": rkl, "fkl": fkl,
            "fkl_high_entropy": rng.uniform(0.5, 1.5) if gated else math.nan,
            "gate_fraction": rng.uniform(0.1, 0.3) if gated else 0.0, "clip_fraction": rng.uniform(0, 0.1),
            "student_entropy": student_entropy, "teacher_entropy": rng.uniform(0.3, 0.6),
            "tokens": 400, "top10_change": math.nan if (round_index, step) == (0, 1) else rng.uniform(0, 0.2),
            "tokens_per_s": 1234.5}


def write_metrics(run: Path, rounds: int, entropy_slope: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    for r in range(rounds):
        path = run / f"round-{r:04d}" / "train" / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        lines = [metrics_line(r, s, rng, 1.5 + entropy_slope * (r * STEPS_PER_ROUND + s)) for s in range(1, STEPS_PER_ROUND + 1)]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))  # json writes NaN, as train does


def eval_result(model: str, correct: list[int], samples: int = 8) -> dict:
    """An eval JSON as run_eval writes it, from per-problem correct counts."""
    per_problem = {}
    for j, c in enumerate(correct):
        per_problem[f"p{j}"] = [Response(f"text {j} {i % 3}", i < c, str(i % 2), 20 + i, 25.0, False) for i in range(samples)]
    return {"model": model, "model_path": f"/models/{model}", "round": None, "verifier": "toy", "problems": len(correct),
            "samples": samples, "temperature": 1.0, "top_p": 0.8, "max_tokens": 64, "seed": 0, "notes": [],
            **summarize(per_problem, samples)}


def write_run(root: Path, objective: str, *, rounds: int = 2, entropy_slope: float = 0.0, final_correct=None,
              with_base: bool = True, seed: int = 0, teacher_correct=None) -> RunDir:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "train": {"objective": objective, "tau": 0.8, "lam": 1.0}}))
    if rounds:
        write_metrics(root, rounds, entropy_slope)
    (root / "eval").mkdir()
    if with_base:
        (root / "eval" / "base.json").write_text(json.dumps(eval_result("base", [0, 1, 2, 0])))
    if teacher_correct is not None:
        (root / "eval" / "teacher.json").write_text(json.dumps(eval_result("teacher", teacher_correct)))
    if final_correct is not None:
        (root / "eval" / "final.json").write_text(json.dumps(eval_result("final", final_correct)))
    return RunDir(root)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 1024, (path, len(data))


def test_report_writes_every_plot(tmp_path):
    run = write_run(tmp_path / "run", "eopd", final_correct=[3, 8, 0, 5])
    paths = make_report(run)
    names = sorted(p.name for p in paths)
    assert names == sorted(["train_loss.png", "train_gate_fraction.png", "train_entropy.png",
                            "train_fkl_high_entropy.png", "train_top10_change.png", "eval_pass_at_k.png"])
    for p in paths:
        assert p.parent == run.root / "report"
        assert_png(p)
    assert not list((run.root / "report").glob(".*"))  # no temporary files left


def test_report_skips_plots_without_data(tmp_path):
    # Training only, one round of one step: no top-10 change yet (NaN) and no eval results.
    run = tmp_path / "run"
    run.mkdir()
    line = metrics_line(0, 1, random.Random(0), 1.0)
    line["fkl_high_entropy"] = math.nan
    (run / "round-0000" / "train").mkdir(parents=True)
    (run / "round-0000" / "train" / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    names = sorted(p.name for p in make_report(RunDir(run)))
    assert names == ["train_entropy.png", "train_gate_fraction.png", "train_loss.png"]


def test_report_eval_only(tmp_path):
    run = write_run(tmp_path / "run", "rkl", rounds=0, final_correct=[1, 2, 3, 4])
    paths = make_report(run)
    assert [p.name for p in paths] == ["eval_pass_at_k.png"]
    assert_png(paths[0])


def test_nothing_to_plot(tmp_path):
    run = tmp_path / "run"
    (run / "round-0000" / "rollouts").mkdir(parents=True)
    with pytest.raises(UserError, match="nothing to plot in RUN_DIR"):
        make_report(RunDir(run))
    assert not (run / "report").exists()
    with pytest.raises(UserError, match="does not exist"):
        make_report(RunDir(tmp_path / "missing"))


def test_torn_last_metrics_line_is_skipped_but_damage_elsewhere_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps(metrics_line(0, 1, random.Random(0), 1.0))
    path.write_text(good + "\n" + good[:20])  # killed while appending
    assert len(read_metrics(path)) == 1
    path.write_text(good[:20] + "\n" + good + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl, line 1: not valid JSON"):
        read_metrics(path)


def test_bad_eval_json_is_named(tmp_path):
    run = write_run(tmp_path / "run", "eopd", rounds=0)
    (run.root / "eval" / "final.json").write_text("{not json")
    with pytest.raises(UserError, match=r"eval/final.json: not valid JSON"):
        make_report(run)


def test_compare_runs(tmp_path):
    rkl = write_run(tmp_path / "rkl", "rkl", entropy_slope=-0.05, final_correct=[2, 8, 0, 1])
    eopd = write_run(tmp_path / "eopd", "eopd", entropy_slope=0.0, final_correct=[4, 8, 1, 3])
    table, png = compare_runs([rkl, eopd], tmp_path / "out")
    assert png == tmp_path / "out" / "compare.png"
    assert_png(png)
    assert (tmp_path / "out" / "compare.txt").read_text() == table + "\n"
    lines = table.splitlines()
    rkl_row = next(l for l in lines if l.startswith("rkl "))
    eopd_row = next(l for l in lines if l.startswith("eopd "))
    assert " rkl " in rkl_row and "eopd tau=0.8 lam=1" in eopd_row
    # pass@1 of the final models: (2+8+0+1)/32 and (4+8+1+3)/32, in percent.
    assert "34.4" in rkl_row.split() and "50.0" in eopd_row.split()
    # Last round's mean student entropy: steps 7..12 of 1.5 - 0.05 * step for rkl, constant 1.5 for eopd.
    assert f"{sum(1.5 - 0.05 * s for s in range(7, 13)) / 6:.3f}" in rkl_row.split()
    assert "1.500" in eopd_row.split()


def test_compare_run_without_final_eval_and_same_names(tmp_path):
    a = write_run(tmp_path / "a" / "run", "rkl", final_correct=None, with_base=False)
    b = write_run(tmp_path / "b" / "run", "full", rounds=1, final_correct=[1, 1, 1, 1])
    table, png = compare_runs([a, b], tmp_path / "out")
    assert_png(png)
    row_a = next(l for l in table.splitlines() if l.startswith("a/run"))
    assert row_a.split()[1:7] == ["rkl", "0", "-", "-", "-", "-"]  # no final eval: dashes, training columns filled
    assert any(l.startswith("b/run") and "full lam=1" in l for l in table.splitlines())


def test_compare_groups_seeds_by_objective_with_mean_and_std(tmp_path):
    finals = {"rkl": [[2, 8, 0, 1], [4, 8, 0, 1], [6, 8, 0, 1]], "eopd": [[4, 8, 1, 3], [4, 8, 1, 3]]}
    runs = [write_run(tmp_path / f"{obj}-s{seed}", obj, seed=seed, final_correct=c, teacher_correct=[8, 8, 8, 7])
            for obj, cs in finals.items() for seed, c in enumerate(cs)]
    table, png = compare_runs(runs, tmp_path / "out")
    assert_png(png)
    per_run, grouped = table.split("\n\n")
    assert "rkl-s2" in per_run and " seed " in per_run.splitlines()[0]
    lines = grouped.splitlines()
    rkl = next(l for l in lines if l.startswith("rkl "))
    eopd = next(l for l in lines if l.startswith("eopd "))
    # rkl pass@1: 11/32, 13/32, 15/32 -> 40.6 ± 6.25 (sample std); eopd: 16/32 twice -> 50.0 ± 0.0.
    assert " 3 " in rkl and "0,1,2" in rkl and "40.6 ± 6.2" in rkl
    assert " 2 " in eopd and "0,1" in eopd and "50.0 ± 0.0" in eopd
    base = next(l for l in lines if l.startswith("base student"))
    teacher = next(l for l in lines if l.startswith("teacher"))
    assert "9.4 ± 0.0" in base and "96.9 ± 0.0" in teacher and " 5 " in teacher
    # The training columns are there too: student entropy constant 1.5 in every run.
    assert rkl.count("1.500 ± 0.000") == 1


def test_mean_std():
    from stages.report import mean_std

    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    m, s, n = mean_std([5.0, math.nan])
    assert (m, n) == (5.0, 1) and math.isnan(s)
    assert mean_std([])[2] == 0


def test_compare_refuses_bad_run_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        compare_runs([RunDir(tmp_path / "nope")], tmp_path / "out")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="no config.yaml"):
        compare_runs([RunDir(tmp_path / "plain")], tmp_path / "out")
    empty = write_run(tmp_path / "empty", "eopd", rounds=0, with_base=False)
    with pytest.raises(UserError, match="nothing to compare"):
        compare_runs([empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
