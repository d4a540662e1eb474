"""`eopd-pipe eval`: sample, verify and score one model on the eval problems.

Recipe:
  1. the model: base (student.path), teacher (teacher.path), final (the newest trained student)
     or round-N (round N's trained student) -> its save_pretrained directory
  2. eval problems (eval.prompts), tokenised with that model's tokenizer and cached in
     RUN_DIR/eval/prompts/; they must have the answer column (eval.answer_field)
  3. one vLLM generate call: eval.samples responses per problem; response i of problem p is seeded
     by (run seed, "eval", p, i), the same for every model, so comparisons between models are paired
  4. decode each response and verify it against the problem's answer: math-verify for `math`,
     the embedded task's exact checker for `toy`
  5. per problem: correct count, distinct final answers, distinct correct responses; overall:
     pass@1..pass@n (unbiased estimator, mean over problems), Avg@n, mean token entropy, lengths;
     for the toy task also the solution paths: the share of responses whose every step is right
     and distinct orders of the numbers among those per problem (`toy_paths`)
  6. RUN_DIR/eval/MODEL.json, written atomically (summary + one row per problem)
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from eopd.passk import mean_pass_at_k
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.models import check_model_dir, load_tokenizer
from pipeline.sampler import start_engine
from pipeline.prompts import save_prompt_cache, tokenized_prompts
from pipeline.rundir import RunDir, atomic_write_text, freeze_config
from pipeline.work import derive_seed

STAGE = "eval"
MODEL_NAMES = "base, teacher, final or round-N"
_ROUND = re.compile(r"round-(\d+)")


# ----------------------------------------------------------------------------- which model


@dataclass(frozen=True)
class EvalModel:
    name: str  # as asked for: the result is RUN_DIR/eval/<name>.json
    path: Path
    round: int | None  # the training round that wrote it (None: base or teacher)


def resolve_model(run: RunDir, cfg: Config, model: str) -> EvalModel:
    """base / teacher / final / round-N -> the model directory (UserError when it does not exist)."""
    if model == "base":
        return EvalModel(model, check_model_dir(cfg.student.path, "student"), None)
    if model == "teacher":
        return EvalModel(model, check_model_dir(cfg.teacher.path, "teacher"), None)
    if model == "final":
        trained = [r for r in run.rounds_present() if run.student_done(r)]
        if not trained:
            raise UserError(f"--model final: no round of {run.root} has a trained student yet (round-NNNN/student/); "
                            f"run `eopd-pipe train {run.root}` (or `eopd-pipe run {run.root}`) first, or evaluate --model base")
        return EvalModel(model, check_model_dir(run.student_dir(trained[-1]), "student"), trained[-1])
    m = _ROUND.fullmatch(model)
    if m is None:
        raise UserError(f"--model {model!r}: unknown model; use {MODEL_NAMES} (e.g. round-0)")
    r = int(m.group(1))
    path = run.student_dir(r)
    if not run.student_done(r):
        raise UserError(f"--model {model}: {path} does not exist (round {r} has not finished training); "
                        f"run `eopd-pipe train {run.root} --round {r}` first")
    return EvalModel(model, check_model_dir(path, "student"), r)


# ----------------------------------------------------------------------------- verification


def _math_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere, run without.
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str, *, gold: bool = False) -> list:
    """math-verify's parse (sympy value + extracted string; [] when nothing is found). A plain gold
    answer such as `0.5` or `\\frac{1}{2}` is wrapped in $...$ so that it parses as LaTeX."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    if gold and not any(mark in text for mark in ("$", "\\boxed", "\\(", "\\[")):
        text = f"${text}$"
    try:
        return parse(text, parsing_timeout=_math_timeout())
    except (Exception, TimeoutException):  # malformed LaTeX, sympy failures, timeouts: nothing parsed
        return []


def math_verdict(response: str, gold_parsed: list) -> tuple[bool, str | None]:
    """(correct, the response's final answer as a string) with math-verify; never raises."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    pred = parse_math(response)
    if not pred:
        return False, None
    try:
        ok = bool(gold_parsed) and bool(verify(gold_parsed, pred, timeout_seconds=_math_timeout()))
    except (Exception, TimeoutException):
        ok = False
    return ok, str(pred[0])


def check_answer(verifier: str, response: str, gold: str, gold_parsed: list | None = None) -> tuple[bool, str | None]:
    """(correct, extracted final answer or None) of one response under `verifier` ("math" or "toy").
    For "math", pass `gold_parsed = parse_math(gold, gold=True)` to parse each gold answer once."""
    if verifier == "toy":
        from pipeline import toy  # (imports torch: only when needed)

        return toy.verify(response, gold), toy.extract_answer(response)
    if verifier == "math":
        return math_verdict(response, parse_math(gold, gold=True) if gold_parsed is None else gold_parsed)
    raise ValueError(f"unknown verifier {verifier!r} (math or toy)")


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Response:
    text: str
    correct: bool
    answer: str | None  # extracted final answer (None: none found)
    tokens: int
    neg_logprob_sum: float  # sum over the response's tokens of -log q(y_t)
    truncated: bool  # stopped by max_tokens


def problem_row(prompt_id: str, responses: Sequence[Response]) -> dict[str, Any]:
    """One problem's line of the result: correct count, distinct final answers (found ones),
    distinct correct responses (distinct texts among the correct ones: solution-path diversity)."""
    return {
        "prompt_id": prompt_id,
        "correct": sum(r.correct for r in responses),
        "distinct_answers": len({r.answer for r in responses if r.answer is not None}),
        "distinct_correct": len({r.text for r in responses if r.correct}),
        "mean_tokens": sum(r.tokens for r in responses) / len(responses),
    }


def summarize(per_problem: dict[str, Sequence[Response]], samples: int) -> dict[str, Any]:
    """The summary over problems: pass@1..pass@samples (unbiased, mean over problems), Avg@samples,
    mean token entropy (token-weighted), diversity and length means, plus one row per problem."""
    rows = [problem_row(pid, rs) for pid, rs in per_problem.items()]
    if not rows:
        raise ValueError("no problems to summarise")
    if any(len(rs) != samples for rs in per_problem.values()):
        raise ValueError(f"every problem needs exactly {samples} responses")
    correct = [r["correct"] for r in rows]
    everything = [r for rs in per_problem.values() for r in rs]
    tokens = sum(r.tokens for r in everything)
    return {
        "pass_at_k": {str(k): mean_pass_at_k(samples, correct, k) for k in range(1, samples + 1)},
        "avg_at_k": sum(correct) / (samples * len(rows)),
        "mean_token_entropy": sum(r.neg_logprob_sum for r in everything) / tokens if tokens else math.nan,
        "mean_distinct_answers": sum(r["distinct_answers"] for r in rows) / len(rows),
        "mean_distinct_correct": sum(r["distinct_correct"] for r in rows) / len(rows),
        "mean_response_tokens": tokens / len(everything),
        "no_answer_fraction": sum(r.answer is None for r in everything) / len(everything),
        "truncated_fraction": sum(r.truncated for r in everything) / len(everything),
        "per_problem": rows,
    }


def toy_paths(per_problem: dict[str, Sequence[Response]], prompts: dict[str, str]) -> dict[str, Any]:
    """Solution-path diversity on the toy task: a response's path is the order in which it adds the
    numbers, counted only when every step is right (`pipeline.toy.steps_valid`). Returns the share
    of strictly valid responses, the mean number of distinct valid paths per problem, and that mean
    as a share of the paths the samples could show at most (min(samples, terms!))."""
    from pipeline import toy

    valid_total, distinct, possible, responses = 0, [], [], 0
    for pid, group in per_problem.items():
        prompt = prompts[pid]
        paths = set()
        for r in group:
            responses += 1
            if toy.steps_valid(r.text, prompt):
                valid_total += 1
                steps = r.text.strip().split()[:-1]
                first = steps[0].split("=")[0].split("+")
                paths.add(tuple(first + [st.split("=")[0].split("+")[1] for st in steps[1:]]))
        distinct.append(len(paths))
        possible.append(min(len(group), math.factorial(len(toy.numbers_of(prompt)))))
    return {"steps_valid_fraction": valid_total / max(1, responses),
            "mean_distinct_valid_paths": sum(distinct) / max(1, len(distinct)),
            "valid_path_coverage": sum(distinct) / max(1, sum(possible))}


def entropy_note(temperature: float, top_p: float) -> str:
    base = ("mean_token_entropy: the mean over all sampled response tokens of -log q(y_t), q the model's own "
            "next-token distribution (vLLM's raw log-prob of the sampled token, before temperature and top-p)")
    if temperature == 1.0 and top_p == 1.0:
        return base + ("; the tokens are drawn from q itself, so this is an unbiased Monte Carlo estimate of the "
                       "policy's token entropy along its own responses (token-weighted)")
    return base + (f"; the tokens are drawn with temperature {temperature:g} and top-p {top_p:g}, not from q itself, so "
                   "this is the cross-entropy of the sampling distribution against q, an unbiased Monte Carlo "
                   "estimate of the policy's entropy only when temperature = top_p = 1")


# ----------------------------------------------------------------------------- the stage


def run_eval(run: RunDir, cfg: Config, model: str, allow_config_change: bool = False, sampler=None,
             problems: int | None = None, out: Path | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `model` (base, teacher, final or round-N) on cfg.eval.prompts; writes and returns
    RUN_DIR/eval/<model>.json. `sampler`: a running `pipeline.sampler.Sampler` that can load the
    model's weights in place (the persistent `run`'s), used instead of starting an engine.
    `problems`: only the first N problems; `out`: write there instead; `extra`: keys added to the
    result (the learning curve's points: `curve_point`)."""
    ec = cfg.eval
    target = resolve_model(run, cfg, model)
    if ec.prompts is None:
        raise UserError("eval.prompts is not set: nothing to evaluate; set it to a problem file with an answer column, "
                        "e.g. --set eval.prompts.path=toy-assets/eval_prompts.jsonl --set eval.verifier=toy")
    tokenizer = load_tokenizer(target.path, "student" if model != "teacher" else "teacher")
    prompts_dir = run.root / STAGE / "prompts"
    prompts, cached = tokenized_prompts(prompts_dir, ec.prompts, tokenizer)
    if ec.answer_field not in prompts.column_names:
        columns = [c for c in prompts.column_names if c not in ("prompt_id", "prompt_token_ids")]
        raise UserError(f"eval.prompts.path {ec.prompts.path}: answer column {ec.answer_field!r} not found "
                        f"(columns: {columns}); set eval.answer_field to the column holding the reference answers, "
                        f"e.g. --set eval.answer_field={columns[-1] if columns else 'answer'}")
    full = prompts  # the cache holds every problem; a curve point takes the first N
    if problems is not None and problems < prompts.num_rows:
        prompts = prompts.slice(0, problems)
    prompt_ids = prompts.column("prompt_id").to_pylist()
    golds = [None if a is None else str(a).strip() for a in prompts.column(ec.answer_field).to_pylist()]
    empty = [pid for pid, g in zip(prompt_ids, golds) if not g]
    if empty:
        raise UserError(f"eval.prompts.path {ec.prompts.path}: {len(empty)} problem(s), e.g. {empty[0]!r}, have no "
                        f"answer in column {ec.answer_field!r}; every eval problem needs a reference answer")
    # Every input is checked: only now does the call write into the run dir.
    freeze_config(run, cfg, allow_config_change)
    if not cached:
        save_prompt_cache(prompts_dir, full)

    t0 = time.time()
    texts_and_stats = sample_responses(target.path, prompts.column("prompt_token_ids").to_pylist(), prompt_ids, tokenizer, cfg,
                                       sampler)
    sample_s = time.time() - t0

    gold_parsed = [parse_math(g, gold=True) for g in golds] if ec.verifier == "math" else [None] * len(golds)
    unparsable = [pid for pid, g in zip(prompt_ids, gold_parsed) if g == []]
    if unparsable:
        tqdm.write(f"eval: warning: math-verify cannot parse the answer of {len(unparsable)} problem(s) "
                   f"(e.g. {unparsable[0]!r}); their responses count as wrong", file=sys.stderr)
    per_problem: dict[str, list[Response]] = {}
    bar = tqdm(total=len(texts_and_stats), desc=f"verify ({ec.verifier})", unit="response", dynamic_ncols=True)
    for j, (pid, gold, parsed) in enumerate(zip(prompt_ids, golds, gold_parsed)):
        group = per_problem[pid] = []
        for text, tokens, nll, truncated in texts_and_stats[j * ec.samples:(j + 1) * ec.samples]:
            ok, answer = check_answer(ec.verifier, text, gold, parsed)
            group.append(Response(text, ok, answer, tokens, nll, truncated))
            bar.update(1)
    bar.close()

    result = {
        "model": model,
        "model_path": str(target.path),
        "round": target.round,
        "verifier": ec.verifier,
        "prompts": ec.prompts.path,
        "problems": len(prompt_ids),
        "samples": ec.samples,
        "temperature": ec.temperature,
        "top_p": ec.top_p,
        "max_tokens": ec.max_tokens,
        "seed": cfg.seed,
        "sample_seconds": round(sample_s, 2),
        **(extra or {}),
        "notes": [
            "pass_at_k[k]: unbiased estimator 1 - C(n-c, k)/C(n, k) per problem (n = samples, c = correct), mean over problems",
            "avg_at_k: mean accuracy of the samples (k = samples)",
            entropy_note(ec.temperature, ec.top_p),
            "mean_distinct_answers: distinct final answers per problem (extracted; responses without one not counted)",
            "mean_distinct_correct: distinct response texts among the correct ones per problem (solution-path diversity)",
            "seeds: response i of problem p is sampled with seed derive_seed(seed, 'eval', p, i), the same for every model",
        ],
        **({"unparsable_gold": unparsable} if unparsable else {}),
        **summarize(per_problem, ec.samples),
    }
    if ec.verifier == "toy" and ec.prompts.prompt_field in prompts.column_names:
        texts = dict(zip(prompt_ids, prompts.column(ec.prompts.prompt_field).to_pylist()))
        result.update(toy_paths(per_problem, texts))
        result["notes"].append("steps_valid_fraction, mean_distinct_valid_paths: responses whose every step is right, and "
                               "per problem their distinct orders of adding the numbers (valid_path_coverage: that over "
                               "min(samples, terms!))")
    out = out if out is not None else run.root / STAGE / f"{model}.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    tqdm.write(f"eval: {model} ({target.path}) -> {out}", file=sys.stderr)
    return result


def sample_responses(model_path: Path, prompt_tokens: list[list[int]], prompt_ids: list[str], tokenizer,
                     cfg: Config, sampler=None) -> list[tuple[str, int, float, bool]]:
    """eval.samples responses per prompt with vLLM, in prompt order: (text, tokens, sum of -log q, truncated).
    Every request carries its own seed, so a `sampler` loaded with the model samples what a new
    engine would (tests/test_run.py)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ec = cfg.eval
    requests, params = [], []
    for pid, toks in zip(prompt_ids, prompt_tokens):
        for i in range(ec.samples):
            requests.append(TokensPrompt(prompt_token_ids=toks))
            params.append(SamplingParams(
                n=1, temperature=ec.temperature, top_p=ec.top_p, max_tokens=ec.max_tokens,
                logprobs=0,  # the sampled token's log-prob under the model: the entropy estimate
                seed=derive_seed(cfg.seed, STAGE, pid, i),
            ))
    if sampler is not None:
        sampler.load(model_path)
        llm = sampler.llm
    else:
        llm = start_engine(model_path, ec.vllm, seed=derive_seed(cfg.seed, STAGE))
    outputs = llm.generate(requests, params, use_tqdm=True)
    results = []
    for out in outputs:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        nll = -sum(step[t].logprob for step, t in zip(comp.logprobs, ids))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        results.append((text, len(ids), nll, comp.finish_reason == "length"))
    return results


# ----------------------------------------------------------------------------- the table


def _k_columns(results: Sequence[dict[str, Any]]) -> list[int]:
    """pass@k columns: 1, powers of two, and every result's largest k."""
    top = [int(r["samples"]) for r in results]
    ks = {1, *top}
    k = 2
    while k < max(top):
        ks.add(k)
        k *= 2
    return sorted(ks)


def format_eval_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per evaluated model (the dicts run_eval returns / writes): pass@k (percent) for
    k = 1, powers of two and the largest k, Avg@k, mean token entropy (nats), mean distinct
    answers and distinct correct responses per problem, mean response length."""
    if not results:
        return "(no eval results)"
    ks = _k_columns(results)
    paths = any("mean_distinct_valid_paths" in r for r in results)
    header = ["model", "problems", *(f"pass@{k}" for k in ks), "Avg@k", "k", "entropy", "answers", "distinct ok",
              *(["steps ok", "paths"] if paths else []), "tokens"]
    rows = []
    for r in results:
        passk = r["pass_at_k"]
        rows.append([
            str(r["model"]), str(r["problems"]),
            *(f"{100 * passk[str(k)]:.1f}" if str(k) in passk else "-" for k in ks),
            f"{100 * r['avg_at_k']:.1f}", str(r["samples"]), f"{r['mean_token_entropy']:.3f}",
            f"{r['mean_distinct_answers']:.2f}", f"{r['mean_distinct_correct']:.2f}",
            *([f"{100 * r['steps_valid_fraction']:.1f}" if "steps_valid_fraction" in r else "-",
               f"{r['mean_distinct_valid_paths']:.2f}" if "mean_distinct_valid_paths" in r else "-"] if paths else []),
            f"{r['mean_response_tokens']:.1f}",
        ])
    note = "\n(pass@k and Avg@k in %; entropy in nats per token; answers, distinct ok: per problem"
    if paths:
        note += ";\n steps ok: % of responses with every step right; paths: distinct orders among those, per problem"
    return render_table(header, rows) + note + ")"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
