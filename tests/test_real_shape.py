"""Real model families' edges at Qwen's real vocabulary (pipeline/real_shape.py, `test` preset):
151,936 student rows over a 151,669-entry tokenizer, a teacher with 152,064 rows (Qwen2.5-7B's),
a base student ending in <|endoftext|> and an instruct teacher ending in <|im_end|>."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli, tree_snapshot
from pipeline.real_shape import (BASE_EOS, INSTRUCT_EOS, QWEN25_LARGE_ROWS, QWEN3_ROWS, TOKENIZER_ENTRIES,
                                 make_real_shape)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Test-preset student (151,936 rows, ends with EOS ~5% per token) and a wider teacher (152,064
    rows, ~10% of its mass on the rows the student lacks, so the left-out rows are exercised)."""
    return make_real_shape(tmp_path_factory.mktemp("real") / "assets", "test", teacher_rows=QWEN25_LARGE_ROWS,
                           student_eos_rate=0.05, boost_teacher_extra_rows=True, n_train=8, n_eval=4)


def config(path: Path, a, **extra) -> Path:
    import yaml

    vllm = {"enforce_eager": True, "dtype": "float32", "max_model_len": 512}
    cfg = {"seed": 3, "student": {"path": str(a.student)}, "teacher": {"path": str(a.teacher)},
           "prompts": {"path": str(a.train_prompts)},
           "rollout": {"n": 2, "max_tokens": 48, "prompts_per_shard": 4, "vllm": vllm},
           "score_teacher": {"top_k": 8, "token_budget": 512, "token_chunk": 128,
                             "eos_map": {BASE_EOS: INSTRUCT_EOS}},
           "train": {"batch_rows": 8, "micro_batch_tokens": 256, "lr": 1e-4, "probe_tokens": 32},
           **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_layout_is_qwen3s(family):
    from transformers import AutoConfig, AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(family.student), AutoTokenizer.from_pretrained(family.teacher)
    assert len(s_tok) == len(t_tok) == TOKENIZER_ENTRIES == 151_669
    assert s_tok.get_vocab() == t_tok.get_vocab()
    assert (s_tok.eos_token, t_tok.eos_token) == (BASE_EOS, INSTRUCT_EOS)
    assert s_tok.convert_tokens_to_ids([BASE_EOS, "<|im_start|>", INSTRUCT_EOS, "</think>"]) == [151643, 151644, 151645, 151668]
    text = "add 7 3 9 = naïve café 你好 🙂\n\t<|im_end|>"
    assert s_tok.decode(s_tok(text)["input_ids"]) == text
    assert AutoConfig.from_pretrained(family.student).vocab_size == QWEN3_ROWS
    assert AutoConfig.from_pretrained(family.teacher).vocab_size == QWEN25_LARGE_ROWS


def test_base_student_instruct_wider_teacher_end_to_end(family, tmp_path):
    """rollout -> score-teacher -> train through the CLI: the student's <|endoftext|> is scored as the
    teacher's <|im_end|>, the teacher is scored over the 151,936 rows both have (its other 128 rows'
    effect counted in every shard's footer), and training consumes the shards."""
    from transformers import AutoModelForCausalLM

    from pipeline.codec import codec_from_metadata
    from pipeline.shards import file_metadata

    cfg, run = config(tmp_path / "cfg.yaml", family), tmp_path / "run"
    for stage in ("rollout", "score-teacher", "train"):
        res = run_cli(stage, run, "--config", cfg)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
        if stage == "score-teacher":
            assert "left-out teacher row in the top-k" in res.stdout + res.stderr, res.stdout[-2000:]
    assert (run / "round-0000" / "student" / "config.json").is_file()

    teacher = AutoModelForCausalLM.from_pretrained(family.teacher, dtype=torch.float32).eval()
    eos, im_end = 151643, 151645
    ended, outside = 0, 0
    for path in sorted((run / "round-0000" / "teacher").glob("part-*.parquet")):
        meta = file_metadata(path)
        assert (meta["teacher_rows"], meta["scored_rows"], meta["tokenizer_entries"]) == ("152064", "151936", "151669")
        outside += int(meta["topk_outside_student_rows"])
        assert 0 < float(meta["mass_outside_student_rows_max"]) < 1
        table = pq.read_table(path)
        ids, lps = codec_from_metadata(meta).decode(table)
        assert int(ids.max()) < QWEN3_ROWS  # every stored id is a row the student has
        start = 0
        for row in table.to_pylist():
            P, resp = len(row["prompt_token_ids"]), row["response_token_ids"]
            T = len(resp)
            if row["finish_reason"] == "stop":
                assert resp[-1] == eos
                ended += 1
                # the teacher saw <|im_end|> where the student wrote <|endoftext|>, over the shared rows
                seq = torch.tensor([row["prompt_token_ids"] + resp[:-1] + [im_end]])
                with torch.no_grad():
                    logits = teacher(seq).logits[0, P - 1 : P + T - 1, :QWEN3_ROWS].float()
                logp = torch.log_softmax(logits, -1)
                assert abs(row["teacher_token_logprob"][-1] - float(logp[-1, im_end])) < 1e-4
                entropy = -(logp.exp() * logp).sum(-1)
                assert torch.allclose(torch.tensor(row["teacher_entropy"]), entropy, atol=1e-4)
                assert torch.equal(ids[start : start + T], logp.topk(8, -1).indices)
            start += T
    assert ended > 0, "the student never ended a response: the eos_map path was not exercised"
    assert outside > 0


def test_student_with_more_rows_than_the_teacher_is_refused(family, tmp_path):
    cfg, run = config(tmp_path / "cfg.yaml", family, rollout={"n": 1, "max_tokens": 4, "prompts_per_shard": 8,
                                                              "vllm": {"enforce_eager": True, "dtype": "float32",
                                                                       "max_model_len": 512}}), tmp_path / "run"
    res = run_cli("rollout", run, "--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    wider = tmp_path / "wide-student"
    shutil.copytree(family.teacher, wider)  # the 152,064-row model as the student, same tokenizer
    before = tree_snapshot(run)
    res = run_cli("score-teacher", run, "--config", cfg, "--set", f"student.path={wider}",
                  "--set", f"teacher.path={family.student}", "--allow-config-change")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "152,064 embedding rows" in res.stderr and "cannot score" in res.stderr
    logs = lambda snap: {k: v for k, v in snap.items() if not k.startswith("logs/")}  # noqa: E731
    assert logs(tree_snapshot(run)) == logs(before)  # a refused call may append a header to an existing log
