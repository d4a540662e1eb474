"""Subnormal floats in make-toy's teacher SFT, first 30 steps (one thread): parameters, gradients,
AdamW moments, hidden states, and each step's CPU time.

    python bench/subnormals.py
"""
import sys, json, time
import torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from pipeline import toy
torch.set_num_threads(1)
pairs = toy.sft_pairs(30 * 64, 20)
tok = toy.train_tokenizer([t for p in toy.sft_pairs(2000, 1) for t in p])
data = toy.encode_pairs(tok, pairs)
model = toy.make_model(tok, toy.TEACHER_SHAPE, 2)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
tiny = torch.finfo(torch.float32).tiny
def sub(ts):
    n = tot = 0
    for t in ts:
        a = t.detach().abs()
        n += int(((a > 0) & (a < tiny)).sum()); tot += a.numel()
    return n, tot
model.train()
for s in range(30):
    ids, labels = toy.sft_batch([data[i] for i in range(s * 64, s * 64 + 64)], tok.pad_token_id)
    t0 = time.process_time()
    out = model(input_ids=ids, output_hidden_states=True)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    cpu = time.process_time() - t0
    if s in (0, 1, 2, 5, 10, 20, 29):
        st = [v for p in model.parameters() for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
        print(json.dumps({"step": s + 1, "cpu_s": round(cpu, 3), "params": sub(model.parameters()), "grads": sub(p.grad for p in model.parameters()),
                          "adam_moments": sub(st), "activations": sub(out.hidden_states)}), flush=True)
