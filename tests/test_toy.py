"""The toy task, its tokenizer and tiny models: verifier, solutions, tokenisation, make_toy's
contract (fast, atomic, idempotent, deterministic), and loading by transformers and real vLLM."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from conftest import CLI_ENV, REPO
from pipeline import toy as toymod  # `toy` is the conftest fixture (the built assets)
from pipeline.errors import UserError
from pipeline.models import PROBE, check_same_vocabulary

# --- the task -------------------------------------------------------------------------------


def test_verify_correct_wrong_malformed():
    good = " 7+9=16 16+3=19 19+5=24 #24"
    assert toymod.verify(good, "24")
    assert toymod.verify(good + "<|endoftext|>", "24") and toymod.verify(good + " \n", "24")
    assert toymod.verify(" #24", "24")  # answer-only: the steps are not graded by verify
    assert not toymod.verify(good, "23")  # wrong
    assert not toymod.verify(" 7+9=16 16+3=19 19+5=24 #25", "24")
    for bad in ["", " 7+9=16 16+3=19 19+5=24", " 7+9=16 16+3=19 19+5=24 #", " #24 #24", " #2 #24",
                " 7+9=16 #24 19+5=24", " #24x", " #x24", " #-24", " #24.0", " #024", "24"]:
        assert toymod.extract_answer(bad) is None or toymod.extract_answer(bad) != "24", bad
        assert not toymod.verify(bad, "24"), bad
    assert toymod.extract_answer(good) == "24" and toymod.extract_answer(" #024") == "024"


def test_steps_valid_is_strict():
    prompt = "add 7 3 9 5 ="
    assert toymod.steps_valid(" 7+9=16 16+3=19 19+5=24 #24", prompt)
    assert toymod.steps_valid(" 3+5=8 8+9=17 17+7=24 #24<|endoftext|>", prompt)
    assert not toymod.steps_valid(" #24", prompt)  # right answer, no work
    assert not toymod.steps_valid(" 7+9=16 16+3=18 18+6=24 #24", prompt)  # arithmetic slip, lucky total
    assert not toymod.steps_valid(" 7+9=16 16+3=19 19+5=24 #25", prompt)  # answer is not the last sum
    assert not toymod.steps_valid(" 7+9=16 15+3=18 #18", prompt)  # does not continue the running sum
    assert not toymod.steps_valid(" 7+9=16 16+9=25 25+3=28 #28", prompt)  # 9 twice, 5 never
    assert not toymod.steps_valid(" 7+9=16 16+3=19 #19", prompt)  # 5 left out


def test_problems_and_solutions():
    rows = toymod.make_problems(300, seed=3)
    assert rows == toymod.make_problems(300, seed=3) and rows != toymod.make_problems(300, seed=4)
    assert len({r["prompt"] for r in rows}) == 300 and len({r["id"] for r in rows}) == 300
    for r in rows:
        assert set(r) == {"id", "prompt", "answer"}
        nums = toymod.numbers_of(r["prompt"])
        assert toymod.MIN_TERMS <= len(nums) <= toymod.MAX_TERMS and len(set(nums)) == len(nums)
        assert all(1 <= x <= toymod.MAX_VALUE for x in nums)
        assert r["answer"] == str(sum(nums))
    held = toymod.make_problems(50, seed=5, exclude=[r["prompt"] for r in rows])
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in rows}
    pairs = toymod.sft_pairs(500, seed=1, exclude=[r["prompt"] for r in rows])
    assert not {p for p, _ in pairs} & {r["prompt"] for r in rows}
    rng = random.Random(0)
    for r in rows[:50]:
        sol = toymod.solution_text(r, rng)
        assert toymod.verify(sol, r["answer"]) and toymod.steps_valid(sol, r["prompt"]), sol
    # Uniformly random orders: a 4-number problem's first number takes each of its values.
    four = next(r for r in rows if len(toymod.numbers_of(r["prompt"])) == 4)
    firsts = {toymod.solution_text(four, rng).split("+")[0].strip() for _ in range(200)}
    assert firsts == set(four["prompt"].split()[1:-1])
    with pytest.raises(ValueError):
        toymod.make_problems(10, seed=0, min_terms=3, max_terms=3, max_value=3)  # only 6 prompts exist


def test_choice_positions():
    tok = toymod.train_tokenizer([t for pair in toymod.sft_pairs(200, 0) for t in pair])
    ids = tok(" 7+9=16 16+3=19 19+5=24 #24", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pos = toymod.choice_positions(tok, ids, 4)
    assert [(tok.decode(ids[j]), k) for j, k in sorted(pos.items())] == [("7", 4), ("9", 3), ("3", 2), ("5", 1)]


def test_sft_batch_masks_the_prompt():
    ids, labels = toymod.sft_batch([([5, 6, 7], [8, 9, 0]), ([5, 6], [8, 0])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0], [5, 6, 8, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 9, 0], [-100, -100, 8, 0, -100, -100]]


# --- the built assets (quick) ---------------------------------------------------------------


def test_quick_toy_contents(toy):
    assert (toy.root / toymod.MARKER).is_file() and toy.info["settings"]["quick"]
    train = [json.loads(line) for line in toy.train_prompts.read_text().splitlines()]
    held = [json.loads(line) for line in toy.eval_prompts.read_text().splitlines()]
    assert len(train) == 1024 and len(held) == 256
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    assert not [p for p in toy.root.parent.iterdir() if ".tmp" in p.name]


def test_shared_tokenizer_roundtrip(toy):
    from transformers import AutoTokenizer

    st, tt = AutoTokenizer.from_pretrained(toy.student), AutoTokenizer.from_pretrained(toy.teacher)
    check_same_vocabulary(st, tt, toy.student, toy.teacher)  # raises if they differ
    assert st.get_vocab() == tt.get_vocab() and len(st) < 400
    assert (toy.student / "tokenizer.json").read_bytes() == (toy.teacher / "tokenizer.json").read_bytes()
    assert st.eos_token == st.pad_token == "<|endoftext|>"
    assert {"<|im_start|>", "<|im_end|>"} <= set(st.all_special_tokens)
    rows = [json.loads(line) for line in toy.train_prompts.read_text().splitlines()[:50]]
    rng = random.Random(0)
    for r in rows:
        prompt, sol = r["prompt"], toymod.solution_text(r, rng)
        for text in (prompt, sol, prompt + sol):
            assert st.decode(st(text, add_special_tokens=False)["input_ids"]) == text
        # Prompt and completion tokenised apart == together (what SFT and rollouts rely on).
        joint = st(prompt + sol, add_special_tokens=False)["input_ids"]
        assert st(prompt, add_special_tokens=False)["input_ids"] + st(sol, add_special_tokens=False)["input_ids"] == joint
        assert all(len(st.decode([d])) == 1 for d in joint if st.decode([d]).strip().isdigit())  # one token per digit
    ids = st(PROBE, add_special_tokens=False)["input_ids"]  # byte-level: any text round-trips
    assert st.decode(ids) == PROBE and st.unk_token_id not in ids
    assert st("add 1 2 =")["input_ids"] == st("add 1 2 =", add_special_tokens=False)["input_ids"]  # no BOS
    assert st.eos_token_id == st.convert_tokens_to_ids("<|endoftext|>")
    chat = st.apply_chat_template([{"role": "user", "content": "add 1 2 ="}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nadd 1 2 =<|im_end|>\n<|im_start|>assistant\n"


def test_models_load_and_match_the_tokenizer(toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.student)
    sizes = {}
    for path in (toy.teacher, toy.student):
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = model.config
        assert cfg.model_type == "qwen3" and cfg.head_dim == 32 and cfg.vocab_size == len(tok)
        assert cfg.eos_token_id == tok.eos_token_id and next(model.parameters()).dtype == torch.float32
        assert (path / "model.safetensors").is_file()
        ids = tok(["add 1 2 ="], return_tensors="pt")["input_ids"]
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
        sizes[path.name] = sum(p.numel() for p in model.parameters())
    assert sizes["teacher"] > 3 * sizes["student"]


def test_generate_batched_equals_one_by_one(toy):
    """Left padding, position ids and the KV cache: a batch decodes as each prompt alone does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.teacher)
    model = AutoModelForCausalLM.from_pretrained(toy.teacher)
    prompts = ["add 1 2 3 =", "add 9 8 7 6 5 =", "add 4 5 6 7 ="]
    batched = toymod.generate(model, tok, prompts, max_new_tokens=16)
    assert batched == [toymod.generate(model, tok, [p], max_new_tokens=16)[0] for p in prompts]
    # Greedy == argmax over a full (uncached) forward at every step.
    ids = tok(prompts[1], add_special_tokens=False)["input_ids"]
    for t in batched[1]:
        with torch.no_grad():
            assert model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item() == t
        ids.append(t)
    s1 = toymod.generate(model, tok, prompts, temperature=1.0, seed=1, max_new_tokens=16)
    assert s1 == toymod.generate(model, tok, prompts, temperature=1.0, seed=1, max_new_tokens=16)


def test_evaluate_toy_reports(toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.teacher)
    teacher, student = (AutoModelForCausalLM.from_pretrained(p) for p in (toy.teacher, toy.student))
    problems = [json.loads(line) for line in toy.eval_prompts.read_text().splitlines()[:16]]
    res = toymod.evaluate_toy(teacher, student, tok, problems, max_new_tokens=24)
    assert res["problems"] == 16
    for key in ("teacher_greedy_acc", "teacher_sampled_acc", "student_greedy_acc", "student_sampled_acc",
                "teacher_sampled_steps_valid", "teacher_high_entropy_frac_on_teacher_samples",
                "teacher_high_entropy_frac_on_student_samples", "teacher_other_above_tau_frac"):
        assert 0.0 <= res[key] <= 1.0, key
    # A barely trained teacher is uncertain nearly everywhere (ln 263 = 5.6 nats at random init).
    assert res["teacher_high_entropy_frac_on_teacher_samples"] > 0.5 and res["teacher_other_entropy_mean"] > 0.8


def test_make_toy_is_idempotent_and_refuses_other_settings(toy, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in toy.root.rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError("make_toy trained again for a complete directory")
    # "returned at once" checked as "nothing trained", not by the clock (was: under 1 s; a loaded machine is slower)
    monkeypatch.setattr(toymod, "sft", no_training)
    again = toymod.make_toy(toy.root, seed=0, quick=True)
    assert again == toy
    assert {p: p.stat().st_mtime_ns for p in toy.root.rglob("*")} == before
    with pytest.raises(UserError, match="other settings"):
        toymod.make_toy(toy.root, seed=1, quick=True)
    with pytest.raises(UserError, match="other settings"):
        toymod.make_toy(toy.root, seed=0, quick=False)


def test_student_shape_setting(tmp_path):
    """The demo's student is the teacher's own run, part-way; the shape is a setting."""
    assert toymod.DEMO["student_shape"] == "teacher-checkpoint"
    assert 0 < toymod.DEMO["student_steps"] < toymod.DEMO["teacher_steps"]
    assets = toymod.make_toy(tmp_path / "t", quick=True, progress=False, student_shape="teacher",
                             teacher_steps=1, student_steps=1)
    assert assets.info["student_params"] == assets.info["teacher_params"]
    assert assets.info["settings"]["student_shape"] == "teacher"
    with pytest.raises(ValueError, match="student_shape 'huge' unknown"):
        toymod.make_toy(tmp_path / "u", quick=True, progress=False, student_shape="huge")
    assert not (tmp_path / "u").exists()


def test_student_from_the_teachers_own_run(tmp_path):
    """student_shape 'teacher-checkpoint': the student is the teacher's SFT run after student_steps;
    the teacher is exactly the one a separately trained student would sit beside."""
    kw = dict(quick=True, progress=False, teacher_steps=4, student_steps=2)
    ckpt = toymod.make_toy(tmp_path / "c", student_shape="teacher-checkpoint", **kw)
    apart = toymod.make_toy(tmp_path / "a", student_shape="teacher", **kw)
    weights = "model.safetensors"
    assert (ckpt.teacher / weights).read_bytes() == (apart.teacher / weights).read_bytes()
    assert (ckpt.student / weights).read_bytes() != (ckpt.teacher / weights).read_bytes()
    assert (ckpt.student / weights).read_bytes() != (apart.student / weights).read_bytes()
    assert (ckpt.student / "tokenizer.json").read_bytes() == (ckpt.teacher / "tokenizer.json").read_bytes()
    assert ckpt.info["student_params"] == ckpt.info["teacher_params"]
    # Another checkpoint of the same run: another student beside the same teacher.
    later = toymod.make_toy(tmp_path / "b", student_shape="teacher-checkpoint", **{**kw, "student_steps": 3})
    assert (later.teacher / weights).read_bytes() == (ckpt.teacher / weights).read_bytes()
    assert (later.student / weights).read_bytes() != (ckpt.student / weights).read_bytes()
    with pytest.raises(ValueError, match="not in 1..3"):
        toymod.make_toy(tmp_path / "d", student_shape="teacher-checkpoint", **{**kw, "student_steps": 4})
    assert not (tmp_path / "d").exists()


def test_make_toy_quick_is_fast_deterministic_and_atomic(toy, tmp_path, monkeypatch):
    t = time.time()
    other = toymod.make_toy(tmp_path / "again", seed=0, quick=True, progress=False)
    elapsed = time.time() - t
    print(f"quick make_toy took {elapsed:.0f} s")  # reported, not asserted: the machine is shared
    for rel in ["teacher/model.safetensors", "student/model.safetensors", "student/tokenizer.json",
                "teacher/config.json", "train_prompts.jsonl", "eval_prompts.jsonl"]:
        assert (other.root / rel).read_bytes() == (toy.root / rel).read_bytes(), rel

    (tmp_path / "not-toy").mkdir()
    with pytest.raises(UserError, match="not a toy directory"):
        toymod.make_toy(tmp_path / "not-toy", quick=True)

    # A build that dies midway leaves neither the directory nor its temporary build behind.
    def boom(*args, **kwargs):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(toymod, "sft", boom)
    with pytest.raises(RuntimeError, match="killed midway"):
        toymod.make_toy(tmp_path / "broken", quick=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "not-toy"]
    # A temporary dir of a killed build (dead pid) is cleaned up by the next build.
    stale = tmp_path / ".broken.tmp-999999999"
    (stale / "teacher").mkdir(parents=True)
    monkeypatch.undo()
    toymod.make_toy(tmp_path / "broken", quick=True, progress=False, teacher_steps=1, student_steps=1)
    assert not stale.exists() and (tmp_path / "broken" / "toy.json").is_file()


# --- real vLLM ------------------------------------------------------------------------------

VLLM_SCRIPT = r'''
import json, os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process (no spawn)
model = sys.argv[1]

if __name__ == "__main__":
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t1 = time.time()
    llm = LLM(model=model, seed=0, dtype="float32", enforce_eager=True, max_model_len=128,
              distributed_executor_backend="uni", enable_prefix_caching=False)
    t2 = time.time()
    prompts = ["add 7 3 9 5 =", "add 1 2 3 =", "add 9 8 7 6 5 ="]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, logprobs=0, seed=123)
    outs = llm.generate(prompts, params, use_tqdm=False)
    t3 = time.time()
    rows = []
    for o in outs:
        for c in o.outputs:
            rows.append({"prompt_ids": list(o.prompt_token_ids), "ids": list(c.token_ids), "text": c.text,
                         "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                         "finish": c.finish_reason})
    print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2, "rows": rows}))
'''


@pytest.mark.slow
def test_vllm_loads_the_student_and_samples_with_logprobs(toy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = tmp_path / "sample.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, **CLI_ENV, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script), str(toy.student)], env=env, capture_output=True, text=True,
                         timeout=600, start_new_session=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"vLLM import {out['import_s']:.1f} s, LLM() {out['load_s']:.1f} s, generate {out['generate_s']:.1f} s")

    tok = AutoTokenizer.from_pretrained(toy.student)
    model = AutoModelForCausalLM.from_pretrained(toy.student)
    rows = out["rows"]
    assert len(rows) == 6
    for row in rows:
        assert row["prompt_ids"] == tok(tok.decode(row["prompt_ids"]), add_special_tokens=False)["input_ids"]
        assert 1 <= len(row["ids"]) <= 24 and len(row["logprobs"]) == len(row["ids"])
        assert row["finish"] in {"stop", "length"} and (row["finish"] == "stop") == (row["ids"][-1] == tok.eos_token_id)
        # vLLM's behaviour log-probs are the HF model's own (fp32 both): the pipeline relies on it.
        ids = torch.tensor([row["prompt_ids"] + row["ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        n = len(row["prompt_ids"])
        hf = logp[n - 1:-1].gather(1, torch.tensor(row["ids"])[:, None])[:, 0]
        diff = (hf - torch.tensor(row["logprobs"])).abs().max().item()
        assert diff < 1e-3, (diff, hf, row["logprobs"])  # measured 4e-5 in fp32; bf16 is off by up to 0.5
