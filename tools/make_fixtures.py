#!/usr/bin/env python3
"""Make the reference fixtures in tests/fixtures/ with Hugging Face transformers (the reference
implementation). Needs torch + transformers 5.17 + safetensors + numpy, so it runs on the GPU
machine, not in CI; its small outputs are committed.

    python3 tools/make_fixtures.py OUT_DIR

For each fixture OUT_DIR/NAME/ gets:
  model/            a checkpoint directory as users meet it (config.json + safetensors)
  ids.npy           int32 [96] input ids (crosses the 64-token chunk boundary of HF's chunked prefill)
  logits_full.npy   float32 [96, vocab]: one prefill over all 96 ids
  logits_incr.npy   float32 [96, vocab]: prefill of the first PREFILL_SPLIT ids, then one id at a time
  greedy.npy        int32 [GREEDY_N]: greedy continuation after the 96 ids (argmax, with the cache)
  meta.json         shapes, the split, and HF's own batch-vs-incremental spread

Every parameter is randomised: HF's default init zeroes the (1+w) norms, sets the gated norm to 1
and dt_bias to 1, which would hide bugs. Math is float32 and eager (no fla / causal-conv1d kernels).
The bf16 fixture rounds its parameters to bf16 first and computes the reference in float32 from those
rounded values, which is what the engine does with bf16 weights.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers as T
from safetensors.torch import save_file

N_IDS = 96
PREFILL_SPLIT = 40
GREEDY_N = 24


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.3 * r)
            elif name.endswith("A_log"):
                u = torch.rand(p.shape, generator=g) * 7.5 + 0.5
                p.copy_(torch.log(u))
            else:
                p.copy_(0.3 * r)


def force_eager(cfg):
    cfg._attn_implementation = "eager"
    try:
        cfg._experts_implementation = "eager"
    except Exception as e:  # attribute absent in some versions
        print("note: cannot set _experts_implementation:", e)


@torch.no_grad()
def reference_outputs(model, ids):
    full = model(input_ids=ids, use_cache=False).logits[0].float()
    out = model(input_ids=ids[:, :PREFILL_SPLIT], use_cache=True)
    cache = out.past_key_values
    rows = [out.logits[0].float()]
    for t in range(PREFILL_SPLIT, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        rows.append(out.logits[0].float())
    incr = torch.cat(rows, 0)
    # greedy continuation from the full prompt
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = int(out.logits[0, -1].argmax())
    greedy = [nxt]
    for _ in range(GREEDY_N - 1):
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        greedy.append(nxt)
    return full, incr, greedy


def save_reference(outdir, model, vocab, seed, extra_meta):
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(0, vocab, (1, N_IDS), generator=g)
    full, incr, greedy = reference_outputs(model, ids)
    spread = float((full - incr).abs().max() / full.abs().max())
    np.save(os.path.join(outdir, "ids.npy"), ids[0].numpy().astype(np.int32))
    np.save(os.path.join(outdir, "logits_full.npy"), full.numpy().astype(np.float32))
    np.save(os.path.join(outdir, "logits_incr.npy"), incr.numpy().astype(np.float32))
    np.save(os.path.join(outdir, "greedy.npy"), np.array(greedy, dtype=np.int32))
    meta = dict(seed=seed, n_ids=N_IDS, prefill_split=PREFILL_SPLIT, greedy_n=GREEDY_N, vocab=vocab,
                hf_batch_vs_incremental_rel=spread, max_abs_logit=float(full.abs().max()),
                transformers=T.__version__, torch=torch.__version__, **extra_meta)
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{outdir}: seed {seed}, max|logit| {meta['max_abs_logit']:.3f}, "
          f"HF batch-vs-incremental {spread:.2e}")
    return spread


# A random model can put two experts' router scores within rounding of each other for some token;
# then HF's own chunked prefill and token-by-token decode pick different experts there and the
# reference itself is ill-defined (seen: 1e-2 at one row). Such draws are discarded: a fixture is
# kept only if HF's batch and incremental logits agree within MAX_HF_SPREAD of max|logit|.
MAX_HF_SPREAD = 1e-3


def make_well_conditioned(maker, root, first_seed):
    for seed in range(first_seed, first_seed + 20):
        if maker(root, seed) <= MAX_HF_SPREAD:
            return
        print(f"  seed {seed}: HF's own batch and incremental disagree (routing near-tie), redrawing")
    raise SystemExit(f"{maker.__name__}: no well-conditioned draw in 20 seeds")


def make_q35_perexpert(root, seed):
    """Qwen3.5-MoE, transformers' own save_pretrained layout: prefix model., per-expert keys, f32."""
    name = os.path.join(root, "qwen35_moe_f32")
    cfg = T.Qwen3_5MoeTextConfig(
        vocab_size=160, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, moe_intermediate_size=8, shared_expert_intermediate_size=12,
        num_experts=6, num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True})
    force_eager(cfg)
    torch.manual_seed(seed)
    m = T.Qwen3_5MoeForCausalLM(cfg).float().eval()
    randomise(m, seed)
    os.makedirs(name, exist_ok=True)
    m.save_pretrained(os.path.join(name, "model"))
    return save_reference(name, m, cfg.vocab_size, seed, dict(layout="save_pretrained per-expert f32",
                                                    cls="Qwen3_5MoeForCausalLM"))


def make_q35_release(root, seed):
    """Qwen3.5-MoE in the official release layout: VLM config with text_config, prefix
    model.language_model., fused 3-D experts, bf16, two shards + index, plus model.visual.* and
    mtp.* tensors that an engine must skip. Different shapes from the f32 fixture (k/v head dims
    differ, 3 value heads per key head, conv kernel 3, explicit irregular layer_types)."""
    name = os.path.join(root, "qwen35_moe_release_bf16")
    layer_types = ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                   "full_attention"]
    cfg = T.Qwen3_5MoeTextConfig(
        vocab_size=200, hidden_size=48, num_hidden_layers=5, layer_types=layer_types,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=12, linear_value_head_dim=8,
        linear_conv_kernel_dim=3, moe_intermediate_size=12, shared_expert_intermediate_size=20,
        num_experts=8, num_experts_per_tok=3, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    force_eager(cfg)
    torch.manual_seed(seed)
    m = T.Qwen3_5MoeForCausalLM(cfg).float().eval()
    randomise(m, seed)
    with torch.no_grad():  # the reference computes in f32 from bf16-rounded parameters
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    os.makedirs(os.path.join(name, "model"), exist_ok=True)
    sd = {}
    for k, v in m.state_dict().items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        sd[k] = v.to(torch.bfloat16).contiguous()
    keys = sorted(sd)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys), "expected fused experts in memory"
    g = torch.Generator().manual_seed(seed + 20)
    sd["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(24, 16, generator=g).to(torch.bfloat16)
    sd["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4, generator=g).to(torch.bfloat16)
    sd["mtp.fc.weight"] = torch.randn(48, 96, generator=g).to(torch.bfloat16)
    sd["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = torch.randn(12, 48, generator=g).to(torch.bfloat16)
    sd["mtp.norm.weight"] = torch.randn(48, generator=g).to(torch.bfloat16)
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, os.path.join(name, "model", fname), metadata={"format": "pt"})
        for k in ks:
            weight_map[k] = fname
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(name, "model", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    text = cfg.to_dict()
    for k in ["_attn_implementation", "_experts_implementation", "architectures", "transformers_version"]:
        text.pop(k, None)
    text["model_type"] = "qwen3_5_moe_text"
    text["dtype"] = "bfloat16"
    full_cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"depth": 1, "hidden_size": 16, "out_hidden_size": 48, "model_type": "qwen3_5_moe"},
        "image_token_id": 190, "video_token_id": 191, "vision_start_token_id": 188,
        "vision_end_token_id": 189, "tie_word_embeddings": False, "transformers_version": T.__version__,
    }
    with open(os.path.join(name, "model", "config.json"), "w") as f:
        json.dump(full_cfg, f, indent=2)
    return save_reference(name, m, cfg.vocab_size, seed, dict(layout="release: text_config, model.language_model., "
                                                    "fused experts, bf16, 2 shards, visual+mtp",
                                                    cls="Qwen3_5MoeForCausalLM"))


def make_qnext(root, seed):
    """Qwen3-Next: fused in_proj_qkvz / in_proj_ba (interleaved per key-head group), per-expert
    experts, f32; partial rotary 0.5 and theta 1e6 to differ from the Qwen3.5 fixtures."""
    name = os.path.join(root, "qwen3_next_f32")
    kw = dict(vocab_size=128, hidden_size=40, intermediate_size=16, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=5, num_experts_per_tok=2,
              moe_intermediate_size=10, shared_expert_intermediate_size=14, norm_topk_prob=True,
              decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=False)
    try:
        cfg = T.Qwen3NextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                 "partial_rotary_factor": 0.5}, **kw)
    except TypeError:
        cfg = T.Qwen3NextConfig(rope_theta=1e6, partial_rotary_factor=0.5, **kw)
    force_eager(cfg)
    torch.manual_seed(seed)
    m = T.Qwen3NextForCausalLM(cfg).float().eval()
    randomise(m, seed)
    inv = m.model.rotary_emb.inv_freq
    assert inv.numel() == 4, f"expected partial rotary 0.5 of head_dim 16 -> 4 freqs, got {inv.numel()}"
    os.makedirs(name, exist_ok=True)
    m.save_pretrained(os.path.join(name, "model"))
    return save_reference(name, m, cfg.vocab_size, seed, dict(layout="save_pretrained per-expert f32, fused qkvz/ba",
                                                    cls="Qwen3NextForCausalLM"))


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    os.makedirs(root, exist_ok=True)
    torch.set_num_threads(8)
    make_well_conditioned(make_q35_perexpert, root, 100)
    make_well_conditioned(make_q35_release, root, 200)
    make_well_conditioned(make_qnext, root, 300)
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d, "model")
        if os.path.isdir(p):
            print(d, sorted(os.listdir(p)))
            with open(os.path.join(p, "config.json")) as f:
                print(f.read())
            from safetensors import safe_open
            for fn in sorted(os.listdir(p)):
                if fn.endswith(".safetensors"):
                    with safe_open(os.path.join(p, fn), "pt") as sf:
                        for k in sorted(sf.keys())[:400]:
                            print("  ", fn, k, tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype())


if __name__ == "__main__":
    main()
