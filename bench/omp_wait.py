"""make-toy's teacher SFT, 10 steps from the same initialisation, each variant in a fresh process:
wall and CPU time and the weights' sha256, with OpenMP threads spinning while they wait (the default)
or waiting passively (OMP_WAIT_POLICY=PASSIVE, which changes no number).

    python bench/omp_wait.py [REPEATS]
"""
import os, subprocess, sys, time
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)
CHILD = r'''
import hashlib, json, sys, time, os
import torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
from pipeline import toy
v = sys.argv[1]
if v == "threads1": torch.set_num_threads(1)
if v == "flush": torch.set_flush_denormal(True)
pairs = toy.sft_pairs(10 * 64, 20)
tok = toy.train_tokenizer([t for p in toy.sft_pairs(2000, 1) for t in p])
data = toy.encode_pairs(tok, pairs)
model = toy.make_model(tok, toy.TEACHER_SHAPE, 2)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
model.train(); w0 = time.perf_counter(); c0 = time.process_time(); per = []
for s in range(10):
    t = time.perf_counter()
    ids, labels = toy.sft_batch([data[i] for i in range(s * 64, s * 64 + 64)], tok.pad_token_id)
    loss = F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    per.append(time.perf_counter() - t)
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
print(json.dumps({"variant": v, "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - w0, 2),
                  "cpu_s": round(time.process_time() - c0, 2), "first5_s": round(sum(per[:5]), 2), "last5_s": round(sum(per[-5:]), 2), "sha": h}))
'''
for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for v in ("default", "passive"):
        env = dict(os.environ)
        if v == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        t = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, v, REPO], env=env, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
        print(line, "| load", os.getloadavg()[0], flush=True)
