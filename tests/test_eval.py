"""`eopd-pipe eval`: the verifiers, the scoring, which model a name means, bad inputs, and one real
vLLM evaluation of the tiny toy student through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tree_snapshot, write_config
from eopd.passk import mean_pass_at_k
from pipeline.config import validate
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from stages.eval import Response, check_answer, format_eval_table, resolve_model, run_eval, summarize, toy_paths

# ----------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize("response, gold, correct, answer", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True, "1/2"),   # plain gold, LaTeX response
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "1/2"),                    # the other way round (0.5 -> 1/2)
    ("The answer is $\\frac{1}{2}$.", "$\\frac12$", True, "1/2"),      # gold already in $...$
    ("\\boxed{3}", "4", False, "3"),
    ("first 4, then \\boxed{5}", "4", False, "5"),                     # the boxed answer counts
])
def test_math_verifier(response, gold, correct, answer):
    assert check_answer("math", response, gold) == (correct, answer)


@pytest.mark.parametrize("garbage", ["", "   ", "\\boxed{", "}}}{{{\\frac{", "\\boxed{\\frac{1}{}}", "$$$$",
                                     "no answer at all", "\x00\x01 \\left( " * 50])
def test_math_verifier_garbage_is_wrong_without_raising(garbage):
    correct, _ = check_answer("math", garbage, "4")
    assert correct is False


def test_math_unparsable_gold_counts_as_wrong_but_keeps_the_answer():
    assert check_answer("math", "\\boxed{3}", "}}{{") == (False, "3")


def test_toy_verifier_through_the_dispatch():
    assert check_answer("toy", " 7+9=16 16+3=19 #19<|endoftext|>", "19") == (True, "19")
    assert check_answer("toy", " 7+9=16 16+3=19 #19", " 19 ") == (True, "19")
    assert check_answer("toy", " 7+9=16 16+3=19 #18", "19") == (False, "18")
    assert check_answer("toy", " 7+9=16 #16 #19", "19") == (False, None)  # hedged: two answers
    assert check_answer("toy", " 7+9=16", "16") == (False, None)
    with pytest.raises(ValueError, match="unknown verifier"):
        check_answer("regex", "x", "y")


# ----------------------------------------------------------------------------- scoring


def R(text: str, correct: bool, answer: str | None, tokens: int = 10, nll: float = 5.0, truncated: bool = False) -> Response:
    return Response(text, correct, answer, tokens, nll, truncated)


def test_summarize_counts_and_pass_at_k():
    per_problem = {
        # 4 correct, two distinct correct texts, one distinct answer
        "a": [R("x #7", True, "7", 4, 2.0), R("x #7", True, "7", 4, 2.0), R("y #7", True, "7", 4, 2.0), R("x #7", True, "7", 4, 2.0)],
        # 1 correct; answers 5, 6, 7 and none; one response truncated
        "b": [R("p #5", False, "5", 8, 12.0), R("q #6", False, "6", 8, 4.0), R("r #7", True, "7", 8, 0.0),
              R("s", False, None, 16, 8.0, True)],
    }
    s = summarize(per_problem, 4)
    assert s["pass_at_k"]["1"] == pytest.approx((1 + 0.25) / 2)
    assert s["pass_at_k"]["2"] == pytest.approx((1 + (1 - 3 / 6)) / 2)  # 1 - C(3,2)/C(4,2) for problem b
    assert s["pass_at_k"]["4"] == 1.0
    assert list(s["pass_at_k"]) == ["1", "2", "3", "4"]
    assert s["avg_at_k"] == pytest.approx(5 / 8)
    assert s["mean_token_entropy"] == pytest.approx((4 * 2.0 + 12 + 4 + 0 + 8) / (16 + 8 * 3 + 16))
    assert s["mean_distinct_answers"] == pytest.approx((1 + 3) / 2)
    assert s["mean_distinct_correct"] == pytest.approx((2 + 1) / 2)
    assert s["mean_response_tokens"] == pytest.approx((16 + 40) / 8)
    assert s["no_answer_fraction"] == pytest.approx(1 / 8)
    assert s["truncated_fraction"] == pytest.approx(1 / 8)
    assert [r["prompt_id"] for r in s["per_problem"]] == ["a", "b"]
    assert [r["correct"] for r in s["per_problem"]] == [4, 1]
    with pytest.raises(ValueError, match="exactly 3 responses"):
        summarize(per_problem, 3)


def test_format_eval_table_aligns_models_with_different_k():
    a = {"model": "base", "problems": 2, "samples": 8, **summarize({"p": [R("t", i < 2, "1") for i in range(8)]}, 8)}
    b = {"model": "round-0", "problems": 2, "samples": 4, **summarize({"p": [R("t", i < 3, "1") for i in range(4)]}, 4)}
    lines = format_eval_table([a, b]).splitlines()
    assert lines[0].split()[:6] == ["model", "problems", "pass@1", "pass@2", "pass@4", "pass@8"]
    base = lines[2].split()
    assert base[0] == "base" and base[2] == "25.0" and base[5] == f"{100 * mean_pass_at_k(8, [2], 8):.1f}"
    rnd = lines[3].split()
    assert rnd[0] == "round-0" and rnd[2] == "75.0" and rnd[5] == "-"  # no pass@8 from 4 samples


def test_toy_paths_count_valid_orders_only():
    prompts = {"a": "add 1 2 3 =", "b": "add 4 5 =", "c": "add 7 8 9 ="}
    ok = lambda t: R(t, True, t.split("#")[-1])  # noqa: E731
    per_problem = {
        # two valid orders (one twice), a right answer with a wrong step, a wrong answer
        "a": [ok(" 1+2=3 3+3=6 #6"), ok(" 3+1=4 4+2=6 #6"), ok(" 1+2=3 3+3=6 #6"), ok(" 1+2=4 4+2=6 #6")],
        "b": [ok(" 4+5=9 #9"), ok(" 5+4=9 #9"), R(" 4+5=8 #8", False, "8"), ok(" 4+5=9 #9")],
        "c": [R("junk", False, None)] * 4,
    }
    res = toy_paths(per_problem, prompts)
    assert res["steps_valid_fraction"] == pytest.approx(6 / 12)
    assert res["mean_distinct_valid_paths"] == pytest.approx((2 + 2 + 0) / 3)
    assert res["valid_path_coverage"] == pytest.approx(4 / (4 + 2 + 4))  # min(4 samples, 3!), min(4, 2!), min(4, 3!)
    table = format_eval_table([{"model": "base", "problems": 3, "samples": 4, **summarize(per_problem, 4), **res}])
    header, _, row = table.splitlines()[:3]
    assert header.split()[-4:] == ["steps", "ok", "paths", "tokens"]
    assert row.split()[-3:] == ["50.0", "1.33", row.split()[-1]]


# ----------------------------------------------------------------------------- models and bad inputs


def fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def cfg_and_run(tmp_path):
    cfg = validate({"student": {"path": str(fake_model(tmp_path / "student"))},
                    "teacher": {"path": str(fake_model(tmp_path / "teacher"))},
                    "prompts": {"path": str(tmp_path / "p.jsonl")}}, "test")
    return cfg, RunDir(tmp_path / "run")


def test_resolve_model(cfg_and_run, tmp_path):
    cfg, run = cfg_and_run
    assert resolve_model(run, cfg, "base").path == tmp_path / "student"
    assert resolve_model(run, cfg, "teacher").path == tmp_path / "teacher"
    with pytest.raises(UserError, match="no round of .* has a trained student yet"):
        resolve_model(run, cfg, "final")
    fake_model(run.student_dir(0))
    fake_model(run.student_dir(2))
    run.student_dir(3).mkdir(parents=True)  # round 3 still training: no config.json
    final = resolve_model(run, cfg, "final")
    assert (final.path, final.round) == (run.student_dir(2), 2)
    assert resolve_model(run, cfg, "round-0").path == run.student_dir(0)
    with pytest.raises(UserError, match="round-0003/student does not exist"):
        resolve_model(run, cfg, "round-3")
    for bad in ("latest", "round-x", "round-", "Base"):
        with pytest.raises(UserError, match="unknown model; use base, teacher, final or round-N"):
            resolve_model(run, cfg, bad)


def test_missing_base_model_dir(tmp_path):
    cfg = validate({"student": {"path": str(tmp_path / "nope")}, "teacher": {"path": str(tmp_path / "nope")},
                    "prompts": {"path": "x.jsonl"}}, "test")
    with pytest.raises(UserError, match="student model directory .*nope does not exist"):
        resolve_model(RunDir(tmp_path / "run"), cfg, "base")


def test_eval_without_prompts_is_refused_before_any_work(cfg_and_run):
    cfg, run = cfg_and_run
    with pytest.raises(UserError, match="eval.prompts is not set"):
        run_eval(run, cfg, "base")
    assert not run.root.exists()


def test_missing_answer_column_is_refused_and_run_dir_untouched(toy, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"add 1 {i} =", "solution": str(1 + i)}) + "\n"
                                for i in range(2, 5)))
    cfg = write_config(tmp_path / "cfg.yaml", toy, eval={"prompts": {"path": str(problems)}, "verifier": "toy"})
    run = tmp_path / "run"
    res = run_cli("eval", run, "--config", cfg, "--model", "base")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "answer column 'answer' not found" in res.stderr and "eval.answer_field" in res.stderr
    assert not run.exists()
    res = run_cli("eval", run, "--config", cfg, "--model", "round-0")
    assert res.returncode == 2 and "round-0000/student does not exist" in res.stderr
    assert tree_snapshot(run) == {}


def test_empty_reference_answer_is_refused(toy, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "q1", "prompt": "add 1 2 =", "answer": "3"}) + "\n"
                        + json.dumps({"id": "q2", "prompt": "add 1 3 =", "answer": " "}) + "\n")
    cfg = validate(yaml.safe_load(write_config(tmp_path / "cfg.yaml", toy, eval={"prompts": {"path": str(problems)}}).read_text()), "test")
    with pytest.raises(UserError, match="1 problem\\(s\\), e.g. 'q2', have no answer in column 'answer'"):
        run_eval(RunDir(tmp_path / "run"), cfg, "base")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one real evaluation


@pytest.mark.slow
def test_eval_base_with_vllm(toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", toy, eval={
        "prompts": {"path": str(toy.eval_prompts), "limit": 8}, "verifier": "toy", "samples": 4,
        "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "vllm": {"enforce_eager": True, "dtype": "float32"}})
    run = tmp_path / "run"
    res = run_cli("eval", run, "--config", cfg, "--model", "base")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run / "eval" / "base.json").read_text())

    ids = [json.loads(line)["id"] for line in toy.eval_prompts.read_text().splitlines()[:8]]
    assert result["model"] == "base" and result["model_path"] == str(toy.student) and result["round"] is None
    assert (result["problems"], result["samples"], result["verifier"]) == (8, 4, "toy")
    assert [r["prompt_id"] for r in result["per_problem"]] == ids
    assert (run / "eval" / "prompts" / "prompts.parquet").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["eval"]["samples"] == 4  # config frozen

    passk = [result["pass_at_k"][str(k)] for k in range(1, 5)]
    assert list(result["pass_at_k"]) == ["1", "2", "3", "4"]
    assert all(0.0 <= p <= 1.0 for p in passk)
    assert all(a <= b for a, b in zip(passk, passk[1:]))
    correct = [r["correct"] for r in result["per_problem"]]
    assert all(0 <= c <= 4 for c in correct)
    assert passk == pytest.approx([mean_pass_at_k(4, correct, k) for k in range(1, 5)])
    assert result["avg_at_k"] == pytest.approx(sum(correct) / 32) == pytest.approx(passk[0])
    for key in ("no_answer_fraction", "truncated_fraction"):
        assert 0.0 <= result[key] <= 1.0
    assert 1.0 <= result["mean_response_tokens"] <= 16.0
    assert result["mean_response_tokens"] == pytest.approx(sum(r["mean_tokens"] for r in result["per_problem"]) / 8)
    assert result["mean_distinct_answers"] == pytest.approx(sum(r["distinct_answers"] for r in result["per_problem"]) / 8)
    assert all(r["distinct_correct"] <= r["correct"] and r["distinct_answers"] <= 4 for r in result["per_problem"])
    # Sampled at temperature 1 from an untrained model over a ~260-token vocabulary: clearly uncertain, at most log V.
    vocab = json.loads((toy.student / "config.json").read_text())["vocab_size"]
    assert 0.5 < result["mean_token_entropy"] < math.log(vocab)
    assert any("unbiased Monte Carlo estimate" in n for n in result["notes"])
    assert "base" in res.stdout and "pass@4" in res.stdout  # the table on the terminal
