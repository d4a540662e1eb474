"""A small reasoning task with several valid solution paths, and tiny local models for it.

The task, "sum in any order":

    prompt     add 7 3 9 5 =
    response    7+9=16 16+3=19 19+5=24 #24<|endoftext|>

The response adds the numbers one at a time, in ANY order, writing every running sum, and ends
with `#` and the total. The numbers (3 to 5 of them) are distinct digits 1..9, each one token, so
at each step every remaining number is an equally good next choice. A teacher trained on uniformly random
orders is therefore genuinely uncertain at the choice tokens (entropy ~ ln(#remaining) nats:
ln 3 = 1.10 and above pass EOPD's 0.8-nat gate, ln 2 = 0.69 does not) and certain everywhere
else (copying, arithmetic, format). That is exactly the situation the entropy gate is for.

Verification (`verify`) checks the final answer only, as math benchmarks grade a \\boxed{}
answer: the response must end in exactly one `#<total>`. The worked steps are not checked
there; `steps_valid` is the strict check (every sum right, every number used once), reported
as a diagnostic.

Everything is made locally and offline: a byte-level BPE tokenizer (Qwen-style pre-tokenizer,
digits split one by one), a Qwen3 teacher and a Qwen3 student that share it
(save_pretrained directories that transformers and vLLM load), and jsonl prompt files.
`make_toy(quick=True)` takes seconds (barely trained models, for tests); the demo
(`quick=False`) trains the teacher to high accuracy in a few CPU minutes; the student is, by
default, that same training run saved half-way (a weak start in the teacher's basin).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# OpenMP threads that spin while they wait burn the CPU a descheduled partner needs: on a busy
# 2-core machine `make-toy`'s SFT steps then take 4-10 s each instead of ~0.2 s (bench/RESULTS.md,
# issue 25: no subnormal floats involved). Waiting passively changes no number (same threads,
# same work split; the models' bytes are equal) and removes that. Read when torch loads its OpenMP
# runtime, so only where this module imports torch first (the `make-toy` command).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.errors import UserError
from pipeline.identity import pid_alive

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's instruct models: only used when a config sets prompts.chat_template.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2/Qwen3's pre-tokenizer regex: letters grouped, every digit its own pre-token.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ENTROPY_TAU = 0.8  # the paper's gate, nats
MARKER = "toy.json"
FORMAT_VERSION = 4  # bump when the task, tokenizer or model shapes change: old dirs are then refused

# Head dim 32 throughout: vLLM's CPU attention backend rejects 16.
TEACHER_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32)
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32)
# make_toy's `student_shape` setting: the student's architecture by name.
STUDENT_SHAPES = {
    "teacher": TEACHER_SHAPE,  # the teacher's architecture, its own init and far fewer SFT steps
    "narrow": dict(TEACHER_SHAPE, hidden_size=64, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1),
    "small": STUDENT_SHAPE,  # 2 layers, hidden 64: measured too weak to learn the task on-policy (FINDINGS)
}
# student_shape CHECKPOINT: the student is the teacher's own SFT run saved after `student_steps`
# of its `teacher_steps` (no SFT of its own; student_lr unused): a model of the teacher's kind,
# little trained on the task, in the teacher's basin, as a paper's base student is to its teacher.
CHECKPOINT = "teacher-checkpoint"
MAX_POSITIONS = 256  # longest prompt + response is about 60 tokens
# The problem distribution. Up to 5 numbers: with 6 the teacher needs ~40% more CPU time to
# learn which numbers are still unused (its last skill to appear) before reaching 80%.
MIN_TERMS, MAX_TERMS, MAX_VALUE = 3, 5, 9


# ---------------------------------------------------------------------------------------------
# The task


def make_problems(n: int, seed: int, *, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS,
                  max_value: int = MAX_VALUE, exclude: Sequence[str] = ()) -> list[dict[str, str]]:
    """`n` distinct problems {id, prompt, answer}: sum `min_terms..max_terms` distinct numbers from
    1..max_value (max_value <= 9 keeps every number one token). Prompts in `exclude` are skipped,
    which is how held-out sets are made."""
    if not 2 <= min_terms <= max_terms <= max_value <= 9:
        raise ValueError(f"need 2 <= min_terms <= max_terms <= max_value <= 9, got {min_terms}, {max_terms}, {max_value}")
    possible = sum(math.perm(max_value, k) for k in range(min_terms, max_terms + 1))
    banned = set(exclude)
    if n > possible - len(banned):
        raise ValueError(f"asked for {n} problems but only {possible} prompts exist ({len(banned)} excluded)")
    rng = random.Random(seed)
    rows, seen = [], set(banned)
    while len(rows) < n:
        nums = rng.sample(range(1, max_value + 1), rng.randint(min_terms, max_terms))
        prompt = prompt_of(nums)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"id": f"s{seed}-{len(rows):06d}", "prompt": prompt, "answer": str(sum(nums))})
    return rows


def prompt_of(numbers: Sequence[int]) -> str:
    return "add " + " ".join(map(str, numbers)) + " ="


def numbers_of(prompt: str) -> list[int]:
    """The numbers of a prompt `add 7 3 9 =`."""
    m = re.fullmatch(r"add((?: \d+)+) =", prompt.strip())
    if m is None:
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return [int(x) for x in m.group(1).split()]


def solution_text(problem: dict[str, str], rng: random.Random) -> str:
    """A worked solution in a uniformly random order, e.g. ' 7+9=16 16+3=19 19+5=24 #24'
    (it starts with a space and carries no EOS; the SFT loop appends EOS)."""
    nums = numbers_of(problem["prompt"])
    order = rng.sample(nums, len(nums))
    total, steps = order[0], []
    for x in order[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return " " + " ".join(steps) + f" #{total}"


def extract_answer(response: str) -> str | None:
    """The final answer: the digits after the response's only `#`, which must end the response
    (trailing whitespace and EOS/<|im_end|> text allowed). None when missing or malformed."""
    text = response.strip()
    for special in SPECIAL_TOKENS:
        text = text.removesuffix(special).rstrip()
    if text.count("#") != 1:  # none, or several (hedged) answers
        return None
    m = re.search(r"#(\d+)$", text)
    return m.group(1) if m else None


def verify(response: str, answer: str) -> bool:
    """Exact final-answer check (the steps are not checked; see `steps_valid`). '#07' is not '7'."""
    return extract_answer(response) == str(answer).strip()


def steps_valid(response: str, prompt: str) -> bool:
    """Strict check: every step `a+b=c` is right, each starts from the previous running sum,
    every number of the prompt is used exactly once and the final answer is the last sum."""
    nums = numbers_of(prompt)
    parts = response.strip().removesuffix(EOS).split()
    if not parts or extract_answer(response) is None:
        return False
    steps, used, total = parts[:-1], [], None
    for i, step in enumerate(steps):
        m = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step)
        if m is None:
            return False
        a, b, c = map(int, m.groups())
        if a + b != c or (i > 0 and a != total):
            return False
        used += [a, b] if i == 0 else [b]
        total = c
    return total is not None and sorted(used) == sorted(nums) and parts[-1] == f"#{total}"


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = 320):
    """Byte-level BPE trained on `texts` in well under a second, wrapped for transformers.

    Byte-level: any string round-trips (no unknown tokens), as with Qwen's tokenizer. On task
    text only a handful of merges exist (e.g. 'add'), so the vocabulary is about 260 tokens:
    the specials, the 256 bytes and those merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                      additional_special_tokens=SPECIAL_TOKENS[1:])
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.model_max_length = MAX_POSITIONS
    return wrapped


# ---------------------------------------------------------------------------------------------
# Models


def make_model(tokenizer, shape: dict[str, int], seed: int):
    """A randomly initialised Qwen3ForCausalLM (fp32, tied embeddings) over `tokenizer`'s vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),  # exactly the tokenizer: no unused rows a sampler could pick
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # half the parameters of a tiny model are otherwise the output head
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # like Qwen: no BOS is prepended
        dtype="float32",  # vLLM's CPU backend runs fp32; the tiny models gain nothing from bf16
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.do_sample = False
    return model.eval()


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per pair, tokenised apart: prompts end at a pre-token
    boundary (' ='), so this equals tokenising the joined text, and the prompt ids are exactly
    what the rollout stage gives vLLM."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    comps = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    return [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompts, comps)]


def sft_batch(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels; labels are -100 (ignored) on prompt and padding, so
    the loss covers the completion and its EOS only. Labels are aligned with the inputs (the
    caller shifts: logits at t predict labels at t+1)."""
    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    for row, (p, c) in enumerate(batch):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        labels[row, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, labels


def shuffled_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> list[list[int]]:
    """`steps` batches of indices into n examples: seeded permutations, epoch after epoch.
    (Grouping batches by length would save ~25% of padding, but measurably slowed learning.)"""
    if n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, got {n}")
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen).tolist()
        batches += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return batches[:steps]


def sft(model, tokenizer, texts: Sequence[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int,
        *, desc: str = "sft", progress: bool = True, after_step: Callable[[int], None] | None = None) -> list[float]:
    """Supervised fine-tuning on (prompt, completion) pairs; the loss covers completion tokens
    and EOS only. AdamW, 5% warm-up then cosine decay to lr/10, gradient clipping at 1.
    Batches come from seeded permutations of `texts`, so a run is deterministic on CPU for a seed.
    `after_step(n)` is called after the n-th step (n from 1; e.g. to save a checkpoint; the model
    is then in train mode). Returns the per-step losses."""
    data = encode_pairs(tokenizer, texts)
    gen = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(len(data), batch_size, steps, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, desc=desc, disable=not progress, mininterval=2)
    for batch in bar:
        ids, labels = sft_batch([data[i] for i in batch], tokenizer.pad_token_id)
        # Right padding under a causal mask never influences the real tokens: no attention mask needed.
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if after_step is not None:
            after_step(len(losses))
    model.eval()
    return losses


def sft_pairs(n: int, seed: int, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
    """`n` (prompt, random-order solution) pairs of fresh random problems (repeats allowed,
    prompts in `exclude` never), drawn like `make_problems`' rows: uniform number of terms,
    then distinct numbers. A fresh order per example, so a model cannot learn one fixed order
    per prompt (it would be certain where it should be uncertain)."""
    rng, banned, pairs = random.Random(seed), set(exclude), []
    while len(pairs) < n:
        nums = rng.sample(range(1, MAX_VALUE + 1), rng.randint(MIN_TERMS, MAX_TERMS))
        prompt = prompt_of(nums)
        if prompt not in banned:
            pairs.append((prompt, solution_text({"prompt": prompt}, rng)))
    return pairs


# ---------------------------------------------------------------------------------------------
# Evaluation (plain torch; the pipeline itself samples with vLLM)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, temperature: float = 0.0, max_new_tokens: int = 64,
             seed: int = 0, batch_size: int = 256) -> list[list[int]]:
    """Response token ids per prompt (EOS included when produced): greedy for temperature 0,
    otherwise sampling from the full distribution at `temperature` (no top-k/top-p)."""
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([[eos] * (width - len(e)) + e for e in enc])  # left padding
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        done = torch.zeros(len(enc), dtype=torch.bool)
        steps: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = res.logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, -1), nxt)  # -1: after this row's EOS
            steps.append(nxt)
            done |= nxt == eos
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(len(enc), 1, dtype=mask.dtype)], 1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=nxt.clamp(min=0)[:, None], attention_mask=mask, position_ids=pos,
                        past_key_values=res.past_key_values, use_cache=True)
        table = torch.stack(steps, 1).tolist()
        out += [[t for t in row if t >= 0] for row in table]
    return out


@torch.no_grad()
def response_entropies(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                       batch_size: int = 128) -> list[torch.Tensor]:
    """The model's full-vocabulary entropy (nats) at each response token, per response."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        pairs = list(zip(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]))
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.zeros(len(pairs), width, dtype=torch.long)
        for row, (p, r) in enumerate(pairs):
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        ent = -(logp.exp() * logp).sum(-1)
        # Position t predicts token t+1: response token j is predicted at len(p) - 1 + j.
        out += [ent[row, len(p) - 1:len(p) - 1 + len(r)] for row, (p, r) in enumerate(pairs)]
    return out


def choice_positions(tokenizer, response_ids: list[int], n_numbers: int) -> dict[int, int]:
    """{response token index: numbers still to choose from} for the step-choice tokens: the first
    number of the response and the number after every '+'."""
    plus = tokenizer.convert_tokens_to_ids("+")
    digits = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    first = next((j for j, t in enumerate(response_ids) if t in digits), None)
    if first is None:
        return {}
    out, remaining = {first: n_numbers}, n_numbers - 1
    for j, t in enumerate(response_ids[:-1]):
        if t == plus and remaining > 0:
            out[j + 1] = remaining
            remaining -= 1
    return out


def evaluate_toy(teacher, student, tokenizer, problems: Sequence[dict[str, str]], *, seed: int = 0,
                 max_new_tokens: int = 64) -> dict[str, Any]:
    """Greedy and temperature-1 exact-answer accuracy of both models, the strict step validity
    of teacher samples, and the teacher's entropy: the share of response tokens above the
    0.8-nat gate on its own samples and on the student's (what round 0 of EOPD gates), and
    the mean entropy at the choice tokens by how many numbers were left to choose from."""
    prompts = [p["prompt"] for p in problems]
    answers = [p["answer"] for p in problems]
    res: dict[str, Any] = {"problems": len(problems)}
    sampled: dict[str, list[list[int]]] = {}  # temperature-1 responses of each model
    for name, model in (("teacher", teacher), ("student", student)):
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            ids = generate(model, tokenizer, prompts, temperature=temp, seed=seed, max_new_tokens=max_new_tokens)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            res[f"{name}_{mode}_acc"] = round(sum(map(verify, texts, answers)) / len(problems), 4)
            if mode == "sampled":
                sampled[name] = ids
                res[f"{name}_sampled_steps_valid"] = round(sum(map(steps_valid, texts, prompts)) / len(problems), 4)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ents = {name: response_entropies(teacher, prompt_ids, ids) for name, ids in sampled.items()}
    for name, e in ents.items():
        res[f"teacher_high_entropy_frac_on_{name}_samples"] = round(float((torch.cat(e) > ENTROPY_TAU).float().mean()), 4)
    by_k: dict[int, list[float]] = {}
    other: list[float] = []
    for r, e, p in zip(sampled["teacher"], ents["teacher"], prompts):
        choice = choice_positions(tokenizer, r, len(numbers_of(p)))
        for j, h in enumerate(e.tolist()):
            (by_k.setdefault(choice[j], []) if j in choice else other).append(h)
    res["teacher_choice_entropy"] = {f"{k} left (ln {k} = {math.log(k):.2f})": round(sum(v) / len(v), 3)
                                     for k, v in sorted(by_k.items(), reverse=True)}
    res["teacher_other_entropy_mean"] = round(sum(other) / max(1, len(other)), 4)
    res["teacher_other_above_tau_frac"] = round(sum(h > ENTROPY_TAU for h in other) / max(1, len(other)), 4)
    return res


# ---------------------------------------------------------------------------------------------
# Assets


@dataclass(frozen=True)
class ToyAssets:
    """Paths of a complete toy directory; `info` is its marker (settings, timings, accuracies)."""

    root: Path
    teacher: Path
    student: Path
    train_prompts: Path
    eval_prompts: Path
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def at(cls, root: Path, info: dict[str, Any] | None = None) -> "ToyAssets":
        return cls(root, root / "teacher", root / "student", root / "train_prompts.jsonl",
                   root / "eval_prompts.jsonl", info or {})


# Training budgets. DEMO: teacher 800 steps (~3 min on 2 idle cores; ~79% sampled accuracy on
# held-out problems); student: the teacher's own run after 400 of those steps (~25% sampled), a
# model of the teacher's kind little trained on the task, as the paper's base students are. Measured
# (issue 12): a student trained apart (own init and data, 200 steps, ~13%) sits so far from the
# teacher that the sampled reverse-KL signal drove it away (on-policy KL 1.0 -> 2.0 even at lr 1e-4
# to 3e-4); from the teacher's checkpoint the KL falls steadily. QUICK: seconds.
DEMO = dict(teacher_steps=800, teacher_lr=3e-3, student_steps=400, student_lr=3e-3, batch_size=64,
            student_shape=CHECKPOINT)
QUICK = dict(teacher_steps=8, teacher_lr=3e-3, student_steps=8, student_lr=3e-3, batch_size=16, student_shape="small")


def make_toy(out_dir: str | Path, *, seed: int = 0, quick: bool = False, n_train: int = 1024, n_eval: int = 256,
             progress: bool = True, **overrides: Any) -> ToyAssets:
    """Build (or find) the toy assets in `out_dir`:

        out_dir/teacher/  student/       save_pretrained model + tokenizer (one shared vocabulary)
        out_dir/train_prompts.jsonl      {id, prompt, answer} rows (prompts for rollouts)
        out_dir/eval_prompts.jsonl       held-out rows (never seen in SFT)
        out_dir/toy.json                 marker: settings, timings, accuracies

    quick=True: models trained for a few steps (seconds; for tests). quick=False: the demo,
    with an accurate teacher and a weak student (a few CPU minutes). `overrides` replace
    entries of the DEMO/QUICK budgets (teacher_steps, student_steps, ..., batch_size).

    Atomic and idempotent: built in a temporary directory beside `out_dir` and renamed into
    place when complete, so `out_dir` is either absent or complete. A complete `out_dir` built
    with the same settings is returned at once; one built with others is refused.
    Deterministic for a seed: the same model, tokenizer and prompt bytes on the same machine
    and library versions (toy.json also records timings).
    """
    out = Path(out_dir).resolve()
    budget = {**(QUICK if quick else DEMO)}
    unknown = sorted(set(overrides) - set(budget))
    if unknown:
        raise TypeError(f"make_toy: unknown settings {unknown} (known: {sorted(budget)})")
    budget.update(overrides)
    settings = {"format_version": FORMAT_VERSION, "seed": seed, "quick": quick, "n_train": n_train,
                "n_eval": n_eval, **budget}
    if out.exists():
        return _existing(out, settings)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = _build(tmp, settings, progress)
        try:
            os.rename(tmp, out)
        except OSError:
            if (out / MARKER).is_file():  # another process finished the same build first
                return _existing(out, settings)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ToyAssets.at(out, info)


def _existing(out: Path, settings: dict[str, Any]) -> ToyAssets:
    marker = out / MARKER
    if not marker.is_file():
        raise UserError(f"{out} exists but is not a toy directory made by make_toy (no {MARKER}); "
                        f"remove it or choose another directory")
    info = json.loads(marker.read_text())
    differ = {k: (info["settings"].get(k), v) for k, v in settings.items() if info["settings"].get(k) != v}
    if differ:
        raise UserError(f"{out} holds toy assets built with other settings (existing, requested): {differ}; "
                        f"remove it or choose another directory")
    return ToyAssets.at(out, info)


def _remove_dead_builds(out: Path) -> None:
    """Temporary build dirs of killed processes (same pid naming as ours, pid no longer alive)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _build(root: Path, settings: dict[str, Any], progress: bool) -> dict[str, Any]:
    t0 = time.time()
    s, seed = settings, settings["seed"]
    root.mkdir(parents=True)
    # Prompt files first: the eval prompts are then excluded from every SFT set.
    problems = make_problems(s["n_train"] + s["n_eval"], seed)
    train, held_out = problems[:s["n_train"]], problems[s["n_train"]:]
    for name, rows in (("train_prompts.jsonl", train), ("eval_prompts.jsonl", held_out)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    banned = [p["prompt"] for p in held_out]

    tokenizer = train_tokenizer([t for pair in sft_pairs(2000, seed + 1) for t in pair])
    stats: dict[str, Any] = {}
    if s["student_shape"] not in STUDENT_SHAPES and s["student_shape"] != CHECKPOINT:
        raise ValueError(f"make_toy: student_shape {s['student_shape']!r} unknown "
                         f"(known: {sorted(STUDENT_SHAPES) + [CHECKPOINT]})")
    checkpoint = s["student_shape"] == CHECKPOINT
    if checkpoint and not 0 < s["student_steps"] < s["teacher_steps"]:
        raise ValueError(f"make_toy: a {CHECKPOINT!r} student is taken after student_steps of the teacher's "
                         f"teacher_steps; {s['student_steps']} is not in 1..{s['teacher_steps'] - 1}")
    roles = [("teacher", TEACHER_SHAPE, 2)] + ([] if checkpoint else [("student", STUDENT_SHAPES[s["student_shape"]], 3)])
    for name, shape, offset in roles:
        steps, bs = s[f"{name}_steps"], s["batch_size"]
        t = time.time()
        pairs = sft_pairs(steps * bs, seed + 10 * offset, exclude=banned)
        model = make_model(tokenizer, shape, seed + offset)
        after_step = None
        if checkpoint and name == "teacher":
            def after_step(n: int, model=model, t=t) -> None:
                if n == s["student_steps"]:
                    model.save_pretrained(root / "student")
                    tokenizer.save_pretrained(root / "student")
                    stats["student_sft_s"] = round(time.time() - t, 1)
                    stats["student_params"] = sum(p.numel() for p in model.parameters())
        losses = sft(model, tokenizer, pairs, steps, bs, s[f"{name}_lr"], seed + offset, desc=f"toy {name}",
                     progress=progress, after_step=after_step)
        if checkpoint:
            last = losses[max(0, s["student_steps"] - 20):s["student_steps"]]
            stats["student_final_loss"] = round(sum(last) / len(last), 4)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        stats[f"{name}_sft_s"] = round(time.time() - t, 1)
        stats[f"{name}_final_loss"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
        stats[f"{name}_params"] = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"settings": settings, "vocab_size": len(tokenizer), **stats}
    if not settings["quick"]:
        from transformers import AutoModelForCausalLM

        t = time.time()
        teacher, student = (AutoModelForCausalLM.from_pretrained(root / n) for n in ("teacher", "student"))
        info["eval"] = evaluate_toy(teacher, student, tokenizer, held_out, seed=seed)
        info["eval_s"] = round(time.time() - t, 1)
    info["build_s"] = round(time.time() - t0, 1)
    (root / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    return info
