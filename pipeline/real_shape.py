"""Randomly initialised Qwen3 models of real shape, with a Qwen3-sized tokenizer, built offline in seconds.

    python -m pipeline.real_shape OUT_DIR [--preset cpu|gpu|test] [--teacher-rows 152064]

Writes OUT_DIR/student/ and OUT_DIR/teacher/ (save_pretrained directories that transformers and
vLLM load) and OUT_DIR/{train,eval}_prompts.jsonl (the toy task's problems, so `eval` with the
toy verifier runs). What is real about them is the shape, not the weights:

- the vocabulary: 151,669 tokenizer entries (151,643 byte-level BPE tokens + Qwen3's 26 added
  tokens at the same ids, `<|endoftext|>` = 151,643, `<|im_end|>` = 151,645) over 151,936
  embedding rows, as Qwen3 has: a sampler can draw one of the 267 rows no token names;
- the student ends responses with `<|endoftext|>` (a base model), the teacher with `<|im_end|>`
  (an instruct model): the pairing `score_teacher.eos_map` is for;
- presets: `cpu` (a ~42M-parameter student, a ~181M-parameter teacher, fp32), `gpu`
  (Qwen3-0.6B- and Qwen3-8B-shaped, bf16), `test` (the same vocabulary, tiny layers);
- `--teacher-rows 152064` gives the teacher Qwen2.5-7B's embedding size over the same tokenizer.

The BPE vocabulary is generated, not trained (training one of 151k entries takes many minutes):
random merges of byte strings, each merge of two earlier tokens, so every id is reachable and
any text round-trips. Logit scales are set so the teacher's entropies are a few nats (not the
~11.9 of an untrained head), and `eos_rate` shifts the EOS logit: ~0 keeps random models from
ending early (responses run to max_tokens, lengths are real), a few percent makes them end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QWEN3_ROWS = 151_936  # Qwen3 embedding rows (Qwen2.5 <= 3B too)
QWEN25_LARGE_ROWS = 152_064  # Qwen2.5-7B and larger: same tokenizer, more rows
REGULAR_TOKENS = 151_643  # byte-level BPE entries; the added tokens follow at Qwen3's ids
# Qwen3's added tokens in id order from 151,643; the last 12 are not "special" there either.
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                "<tool_response>", "</tool_response>", "<think>", "</think>"]
NON_SPECIAL = set(ADDED_TOKENS[14:])
TOKENIZER_ENTRIES = REGULAR_TOKENS + len(ADDED_TOKENS)  # 151,669, as Qwen3
BASE_EOS, INSTRUCT_EOS = "<|endoftext|>", "<|im_end|>"
MARKER = "real_shape.json"
FORMAT_VERSION = 1

# head_dim >= 32 everywhere: vLLM's CPU attention rejects 16.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        dtype="float32", max_positions=4096,
        student=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
        teacher=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)),
    "gpu": dict(  # Qwen3-0.6B and Qwen3-8B (config.json of the released models)
        dtype="bfloat16", max_positions=40_960,
        student=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
        teacher=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)),
    "test": dict(
        dtype="float32", max_positions=1024,
        student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
        teacher=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
}
LOGIT_STD = 3.0  # std of a random head's logits: teacher entropies of a few nats, not ln(V)
# Residual-branch outputs (o_proj, down_proj) scaled up so that the residual stream is mostly the
# layers' output: with a tied head and a stream dominated by the current token's embedding, a
# random model only repeats its last token (p ~ 1), which tells nothing about real sampling.
RESIDUAL_GAIN = 4.0


@dataclass(frozen=True)
class RealShapeAssets:
    root: Path
    student: Path
    teacher: Path
    train_prompts: Path
    eval_prompts: Path
    info: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def generated_bpe(seed: int = 0) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary of REGULAR_TOKENS entries and its merges, generated in about a second.

    Ids 0..255 are the 256 byte symbols; every later token is the merge of two earlier ones
    (chosen with a bias to short ones, as a trained vocabulary's frequent merges are), so the
    BPE model can reach every id and decodes every token to bytes."""
    from tokenizers import pre_tokenizers

    rng = random.Random(seed)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    while len(tokens) < REGULAR_TOKENS:
        # cube of a uniform: mostly early (short) tokens, sometimes long ones
        a = tokens[int(len(tokens) * rng.random() ** 3)]
        b = tokens[int(len(tokens) * rng.random() ** 3)]
        if a + b in vocab or len(a) + len(b) > 16:
            continue
        vocab[a + b] = len(tokens)
        tokens.append(a + b)
        merges.append((a, b))
    return vocab, merges


def make_tokenizer(eos: str, seed: int = 0, max_length: int = 4096):
    """A transformers fast tokenizer with Qwen3's layout: TOKENIZER_ENTRIES entries, `eos` as EOS
    (and pad), ChatML template. Byte-level with Qwen's pre-tokenizer: any text round-trips."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeline.toy import CHAT_TEMPLATE, QWEN_SPLIT

    vocab, merges = generated_bpe(seed)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False) for t in ADDED_TOKENS])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=BASE_EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.model_max_length = max_length
    if len(wrapped) != TOKENIZER_ENTRIES or wrapped.convert_tokens_to_ids(BASE_EOS) != REGULAR_TOKENS:
        raise AssertionError(f"tokenizer layout: {len(wrapped)} entries, {BASE_EOS} = {wrapped.convert_tokens_to_ids(BASE_EOS)}")
    return wrapped


# ---------------------------------------------------------------------------------------------
# Models


def make_model(shape: dict[str, Any], rows: int, eos_id: int, dtype: str, max_positions: int, seed: int,
               *, eos_rate: float | None = 0.0, boost_rows: tuple[int, int] | None = None):
    """A random Qwen3ForCausalLM with `rows` embedding rows.

    The LM head is rescaled so that logits have std LOGIT_STD. `eos_rate`: the mean probability of
    `eos_id` per position, set through a shift of its logit (0: pushed 30 nats down, never sampled
    in practice; None: left random). `boost_rows` (lo, hi): those rows get about as much mass
    together as the top tokens (how the 'teacher row outside the student' case is exercised).
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=rows, max_position_embeddings=max_positions, eos_token_id=eos_id,
                         pad_token_id=REGULAR_TOKENS, bos_token_id=None, dtype=dtype, **shape)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # an 8B model is built in bf16 directly (16 GB, not 32)
    try:
        model = Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    H = shape["hidden_size"]
    with torch.no_grad():
        for name, mod in model.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, 1.0 / math.sqrt(mod.in_features))
                if name.endswith(("o_proj", "down_proj")):
                    mod.weight.mul_(RESIDUAL_GAIN)
                    mod.weight[0].zero_()  # hidden dimension 0 stays the embedding's constant (below)
        head = model.get_output_embeddings().weight
        head.normal_(0.0, LOGIT_STD / math.sqrt(H))
        # A constant in hidden dimension 0 of every input embedding keeps the final normed state's
        # dimension 0 positive, so head[r, 0] shifts row r's logit at every position. With a tied
        # head the constant is the same for all rows: softmax does not see it.
        emb = model.get_input_embeddings().weight
        emb[:, 0] = LOGIT_STD
        if eos_rate is not None:
            _calibrate_shift(model, [eos_id], eos_rate, seed)
        if boost_rows is not None:
            _calibrate_shift(model, list(range(*boost_rows)), 0.1, seed)
    model.generation_config.do_sample = True
    model.generation_config.eos_token_id = eos_id
    return model


@torch.no_grad()
def _calibrate_shift(model, rows: list[int], rate: float, seed: int) -> None:
    """Shift head[rows, 0] so that the rows' mean total probability over random contexts is `rate`
    (bisection on measured probabilities; rate 0: a fixed 30-nat push down)."""
    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, REGULAR_TOKENS, (2, 32), generator=gen)
    base = head[rows, 0].clone()

    def state0() -> float:
        h = model.model(input_ids=ids).last_hidden_state
        return float(h[..., 0].float().mean())

    def mass(shift: float) -> float:
        head[rows, 0] = base + shift
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        return float(logp[..., rows].exp().sum(-1).mean())

    if rate <= 0:
        # dimension 0 of the normed state, measured: the shift in head units for -30 nats
        head[rows, 0] = base - 30.0 / max(state0(), 1e-3)
        return
    lo, hi = -20.0, 20.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < rate else (lo, mid)
    head[rows, 0] = base + (lo + hi) / 2


# ---------------------------------------------------------------------------------------------
# Assets


def make_real_shape(out_dir: str | Path, preset: str = "cpu", *, student_rows: int = QWEN3_ROWS,
                    teacher_rows: int = QWEN3_ROWS, seed: int = 0, student_eos_rate: float = 0.0,
                    boost_teacher_extra_rows: bool = False, n_train: int = 256, n_eval: int = 64) -> RealShapeAssets:
    """Build (or reuse, when built with the same settings) the student, teacher and prompt files."""
    from pipeline.toy import make_problems

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: one of {sorted(PRESETS)}")
    if min(student_rows, teacher_rows) < TOKENIZER_ENTRIES:
        raise ValueError(f"embedding rows must be >= the tokenizer's {TOKENIZER_ENTRIES:,} entries")
    out = Path(out_dir)
    settings = {"format_version": FORMAT_VERSION, "preset": preset, "student_rows": student_rows,
                "teacher_rows": teacher_rows, "seed": seed, "student_eos_rate": student_eos_rate,
                "boost_teacher_extra_rows": boost_teacher_extra_rows, "n_train": n_train, "n_eval": n_eval}
    assets = RealShapeAssets(out, out / "student", out / "teacher", out / "train_prompts.jsonl",
                             out / "eval_prompts.jsonl", settings)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return RealShapeAssets(**{**assets.__dict__, "info": json.loads(marker.read_text())})
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    p = PRESETS[preset]
    info: dict[str, Any] = {"settings": settings}
    for role, rows, eos, shape in (("student", student_rows, BASE_EOS, p["student"]),
                                   ("teacher", teacher_rows, INSTRUCT_EOS, p["teacher"])):
        tok = make_tokenizer(eos, seed, p["max_positions"])
        extra = (QWEN3_ROWS, teacher_rows) if role == "teacher" and boost_teacher_extra_rows and teacher_rows > QWEN3_ROWS else None
        model = make_model(shape, rows, tok.convert_tokens_to_ids(eos), p["dtype"], p["max_positions"],
                           seed + (role == "teacher"), eos_rate=student_eos_rate if role == "student" else None,
                           boost_rows=extra)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        info[role] = {"parameters": sum(x.numel() for x in model.parameters()), "rows": rows, "eos": eos,
                      "tokenizer_entries": len(tok), **shape}
        del model
    problems = make_problems(n_train + n_eval, seed)
    for path, rows in ((assets.train_prompts, problems[:n_train]), (assets.eval_prompts, problems[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker.write_text(json.dumps(info, indent=1))
    return RealShapeAssets(**{**assets.__dict__, "info": info})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.real_shape", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--student-rows", type=int, default=QWEN3_ROWS)
    ap.add_argument("--teacher-rows", type=int, default=QWEN3_ROWS, help=f"e.g. {QWEN25_LARGE_ROWS} (Qwen2.5-7B and larger)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student-eos-rate", type=float, default=0.0,
                    help="mean EOS probability per position of the student (0: it never ends early)")
    args = ap.parse_args(argv)
    a = make_real_shape(args.out_dir, args.preset, student_rows=args.student_rows, teacher_rows=args.teacher_rows,
                        seed=args.seed, student_eos_rate=args.student_eos_rate)
    for role in ("student", "teacher"):
        i = a.info[role]
        print(f"{role}: {getattr(a, role)}  {i['parameters'] / 1e6:,.1f}M parameters, {i['rows']:,} rows, "
              f"{i['tokenizer_entries']:,} tokenizer entries, EOS {i['eos']}")
    print(f"prompts: {a.train_prompts}, {a.eval_prompts}")


if __name__ == "__main__":
    main()
