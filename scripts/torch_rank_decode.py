#!/usr/bin/env python3
"""PyTorch doing one rank's share of a LLaMA2-70B decode step at TP 8 (the baseline the CUDA
backend is measured against in docs/BENCHMARKS.md): per layer RMSNorm, fused QKV (8 query
heads + 1 KV head of 128), RoPE, attention over a 1k-token KV cache, o_proj (8192 x 1024),
residual, RMSNorm, gate|up (2 x 3584 x 8192), SwiGLU, down (8192 x 3584), residual; then the
final norm and a 4000-row LM-head slice. bf16 weights, batch 1, no all-reduce (one rank's
compute, like `--rank 0`). Eager and CUDA-graphed; writes JSON.

    python3 scripts/torch_rank_decode.py --out torch_rank.json [--layers 80] [--ctx 1024]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="torch_rank.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_rank_decode: skipped: no GPU")
        return
    dev, dt = "cuda", torch.bfloat16
    d, hd, nq, nkv, f, vocab = 8192, 128, 8, 1, 3584, 4000
    g = torch.Generator(device=dev).manual_seed(0)

    def w(n, k):
        return (torch.rand(n, k, device=dev, generator=g, dtype=torch.float32) * 2 - 1).mul_((3 / k) ** 0.5).to(dt)

    layers = []
    for _ in range(a.layers):
        layers.append(dict(
            n1=torch.ones(d, device=dev, dtype=dt), qkv=w((nq + 2 * nkv) * hd, d), o=w(d, nq * hd),
            n2=torch.ones(d, device=dev, dtype=dt), gu=w(2 * f, d), down=w(d, f),
            k=torch.randn(1, nkv, a.ctx + 1, hd, device=dev, dtype=dt, generator=g),
            v=torch.randn(1, nkv, a.ctx + 1, hd, device=dev, dtype=dt, generator=g)))
    head_n, head_w = torch.ones(d, device=dev, dtype=dt), w(vocab, d)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    pos = torch.tensor([a.ctx], device=dev)

    def rms(x, wt):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * wt

    def rope(x):  # (1, h, 1, hd), rotate-half
        ang = pos.float()[:, None] * inv[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def step(x):
        for L in layers:
            h = rms(x, L["n1"])
            qkv = F.linear(h, L["qkv"])
            q = qkv[..., : nq * hd].view(1, 1, nq, hd).transpose(1, 2)
            k = qkv[..., nq * hd:(nq + nkv) * hd].view(1, 1, nkv, hd).transpose(1, 2)
            v = qkv[..., (nq + nkv) * hd:].view(1, 1, nkv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            L["k"][:, :, a.ctx:a.ctx + 1] = k
            L["v"][:, :, a.ctx:a.ctx + 1] = v
            att = F.scaled_dot_product_attention(q, L["k"], L["v"], enable_gqa=True)
            x = x + F.linear(att.transpose(1, 2).reshape(1, 1, nq * hd), L["o"])
            h = rms(x, L["n2"])
            gu = F.linear(h, L["gu"])
            x = x + F.linear(F.silu(gu[..., :f]) * gu[..., f:], L["down"])
        return F.linear(rms(x, head_n), head_w)

    x = torch.randn(1, 1, d, device=dev, dtype=dt, generator=g)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers, "ctx": a.ctx,
           "weight_bytes": sum(L[n].numel() * 2 for L in layers for n in ("qkv", "o", "gu", "down")) + head_w.numel() * 2}
    with torch.inference_mode():
        for _ in range(3):
            step(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(x)
        torch.cuda.synchronize()
        res["eager_ms"] = (time.perf_counter() - t0) / a.steps * 1e3
        static_x = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_x)
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            graph.replay()
        torch.cuda.synchronize()
        res["graph_ms"] = (time.perf_counter() - t0) / a.steps * 1e3
        del static_out
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
