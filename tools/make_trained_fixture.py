#!/usr/bin/env python3
"""Make tests/fixtures/qwen35_moe_trained_bf16: a small Qwen3.5-MoE trained on text, so that its
predictions have the margins of a real model (the random fixtures are chaotic: a weight change of a
fraction of a percent flips their argmax, which says nothing about a quantization format's quality).

Needs torch + transformers 5.17 (the GPU machine). Run from the repository root:

    python3 tools/make_trained_fixture.py [OUT_DIR] [--steps N] [--seconds S]

Model: the geometry of qwen35_moe_q64_bf16 (hidden 128, 4 layers L,L,L,F, 8 experts top-3 + a shared
expert, every matrix a multiple of 64 columns so group-64 quantization applies everywhere), with a
byte-level vocabulary of 256. Corpus: the bytes of the repository's own text (docs/*.md, README.md,
src/**/*.[ch], tests/*.c, tools/*.py, sorted by path); the last 10% of it is held out, and the
evaluation ids are 512 bytes from the held-out part. Training: AdamW, cosine schedule, batches of
32 x 256 bytes, the router's load-balancing loss on (as in HF's training of the family); seed 0.

Output (the layout of the other fixtures):
  model/            config.json + model.safetensors (save_pretrained, bf16 parameters, per-expert keys)
  ids.npy           int32 [512] held-out bytes
  logits_full.npy   float32 [512, 256]: one prefill, computed in float64 on the CPU (eager) from the
                    saved bf16 checkpoint (what the engine computes from it, in float32)
  meta.json         training steps, losses (nats per byte), corpus size and SHA-256
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (q64_config, force_eager)
import transformers as T  # noqa: E402

SEQ = 256
BATCH = 32
N_EVAL = 512


def corpus_bytes():
    paths = []
    for root in ("docs", "src", "tests", "tools"):
        for d, _, files in os.walk(root):
            if "fixtures" in d:
                continue
            for f in files:
                if f.endswith((".md", ".c", ".h", ".py", ".cu")):
                    paths.append(os.path.join(d, f))
    paths.append("README.md")
    paths.sort()
    data = b"".join(open(p, "rb").read() for p in paths if os.path.exists(p))
    return data, len(paths)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="tests/fixtures/qwen35_moe_trained_bf16")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seconds", type=float, default=240.0, help="stop training after this long")
    a = ap.parse_args()

    torch.manual_seed(0)
    data, n_files = corpus_bytes()
    split = len(data) * 9 // 10
    train = torch.tensor(list(data[:split]), dtype=torch.long)
    held = torch.tensor(list(data[split:]), dtype=torch.long)
    print(f"corpus: {n_files} files, {len(data)} bytes ({split} train, {len(data) - split} held out)")

    cfg = mf.q64_config()
    cfg.output_router_logits = True
    cfg.router_aux_loss_coef = 0.01
    mf.force_eager(cfg)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = T.Qwen3_5MoeForCausalLM(cfg).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)

    def batch(src, n):
        starts = torch.randint(0, len(src) - SEQ - 1, (n,), generator=g)
        x = torch.stack([src[s:s + SEQ] for s in starts])
        return x.to(dev)

    t0, step, losses = time.time(), 0, []
    while step < a.steps and time.time() - t0 < a.seconds:
        lr = 3e-3 * (min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        x = batch(train, BATCH)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss))
        step += 1
        if step % 100 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.3f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0

    # Save with bf16 parameters, then compute the reference from the saved checkpoint in float64 on
    # the CPU. (Not from the in-memory model cast to bf16 and back: that also rounds the rotary
    # inv_freq buffer, whose error grows with the position: 0.1 of 18 in the logits past 256.)
    model.config.output_router_logits = False
    model.to("cpu").to(torch.bfloat16).save_pretrained(os.path.join(a.out, "model"))
    ref = T.Qwen3_5MoeForCausalLM.from_pretrained(os.path.join(a.out, "model"), dtype=torch.float64)
    mf.force_eager(ref.config)
    ref.eval()
    with torch.no_grad():
        x = batch(held, 16).cpu()
        held_loss = float(ref(input_ids=x, labels=x).loss)
        gs = torch.Generator().manual_seed(2)
        s0 = int(torch.randint(0, len(held) - N_EVAL, (1,), generator=gs))
        ids = held[s0:s0 + N_EVAL][None]
        full = ref(input_ids=ids, use_cache=False).logits[0].float()
    np.save(os.path.join(a.out, "ids.npy"), ids[0].numpy().astype(np.int32))
    np.save(os.path.join(a.out, "logits_full.npy"), full.numpy().astype(np.float32))
    p = torch.softmax(full, -1)
    top2 = p.topk(2, -1).values
    meta = dict(steps=step, train_seconds=round(train_s, 1), device=dev, seq=SEQ, batch=BATCH,
                train_loss_last100=float(np.mean(losses[-100:])), held_out_loss=held_loss,
                eval_loss=float(torch.nn.functional.cross_entropy(full[:-1], ids[0, 1:])),
                eval_top1_prob_median=float(top2[:, 0].median()),
                eval_margin_median=float((top2[:, 0] - top2[:, 1]).median()),
                corpus_bytes=len(data), corpus_files=n_files, corpus_sha256=hashlib.sha256(data).hexdigest(),
                n_ids=N_EVAL, vocab=256, max_abs_logit=float(full.abs().max()),
                transformers=T.__version__, torch=torch.__version__,
                layout="save_pretrained per-expert bf16, trained (byte-level), all columns multiples of 64")
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
