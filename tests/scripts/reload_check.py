"""Sampling from a vLLM engine whose weights were swapped in place vs from a fresh engine.

    python tests/scripts/reload_check.py TOY_STUDENT_DIR WORK_DIR {tied|untied} {in|out}

Prints one JSON line: the max |log-prob difference| of the sampled tokens (and whether the tokens
agree) for (a) vLLM's plain `reload_weights` and (b) `Sampler.load` (reload + head refresh), each
against a fresh engine on the new weights. Run as a script: vLLM spawns processes.
"""

import json
import shutil
import sys
from pathlib import Path

import torch


def variant(src: Path, dst: Path, tied: bool, scale: float) -> Path:
    """A copy of the toy student with perturbed weights (and untied head when asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    g = torch.Generator().manual_seed(int(scale * 1000))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    shutil.rmtree(dst, ignore_errors=True)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def sample(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(max_tokens=12, temperature=1.0, logprobs=0, seed=100 + i) for i in range(len(prompts))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def compare(a, b) -> tuple[bool, float]:
    same = all(x[0] == y[0] for x, y in zip(a, b))
    diff = max((abs(u - v) for x, y in zip(a, b) if x[0] == y[0] for u, v in zip(x[1], y[1])), default=float("inf"))
    return same, diff


def main() -> None:
    src, work, tie, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "tied", sys.argv[4] == "in"
    from pipeline.config import VllmConfig
    from pipeline.models import make_llm
    from pipeline.sampler import Sampler

    old, new = variant(src, work / "old", tie, 0.5), variant(src, work / "new", tie, 0.9)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    cfg = VllmConfig(enforce_eager=True, dtype="float32", cpu_kvcache_gib=1.0)
    sampler = Sampler(old, cfg, seed=0, in_process=where)
    before = sample(sampler.llm, prompts)
    sampler.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(new)})
    sampler.llm.reset_prefix_cache()
    plain = sample(sampler.llm, prompts)
    sampler.load(new)
    ours = sample(sampler.llm, prompts)
    del sampler
    fresh = sample(make_llm(new, cfg, seed=0, in_process=where), prompts)
    print(json.dumps({"plain": compare(plain, fresh), "ours": compare(ours, fresh), "old_vs_fresh": compare(before, fresh)}))


if __name__ == "__main__":
    main()
