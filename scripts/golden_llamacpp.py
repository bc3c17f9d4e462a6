#!/usr/bin/env python3
"""Golden reference for syncdrop from an independent implementation: llama.cpp (through
llama-cpp-python) reading the same SmolLM2 GGUF.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy llama-cpp-python==0.3.36
    /tmp/ref/bin/python scripts/golden_llamacpp.py [--model PATH] [--out tests/golden/smollm2_llamacpp.json]

Writes a small JSON file (committed; the model and data are not): the prompt's token ids,
per-position logits at 256 fixed vocabulary ids plus each position's top-16, llama.cpp's greedy
continuation, and the perplexity of the first LAMBADA passages (token counts per passage too,
so tokenizer agreement is checked as well). KV cache in llama.cpp's default f16 (GOLDEN_KV_F32=1 asks for f32, which crashed 0.3.36);
llama.cpp still quantises activations to Q8_1 inside its Q4_1 matmuls, which sets the tolerance.
"""
import argparse, gzip, json, os, sys
import numpy as np
from llama_cpp import Llama

PROMPT = "The capital of France is"
N_CONT = 16
N_LAMBADA = 40
PROBE_SEED = 1234

def cache_dir():
    if os.environ.get("SYNCDROP_CACHE"):
        return os.environ["SYNCDROP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(base, "syncdrop")

def kv_f32():
    # f32 KV cache when this llama-cpp-python takes it (it crashed with type_k on 0.3.36).
    return {} if os.environ.get("GOLDEN_KV_F32") != "1" else {"type_k": 0, "type_v": 0}

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(cache_dir(), "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--eval", default=os.path.join(cache_dir(), "eval"))
    ap.add_argument("--out", default="tests/golden/smollm2_llamacpp.json")
    a = ap.parse_args()

    llm = Llama(model_path=a.model, n_ctx=1024, logits_all=True, n_threads=2,
                verbose=False, seed=0, **kv_f32())
    vocab = llm.n_vocab()
    probe = np.random.default_rng(PROBE_SEED).choice(vocab, size=256, replace=False)
    probe.sort()

    toks = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(toks)
    scores = np.array(llm.scores[: len(toks)], dtype=np.float32)
    positions = []
    for row in scores:
        top = np.argsort(-row)[:16]
        positions.append({
            "probe_logits": [round(float(v), 5) for v in row[probe]],
            "top16_ids": [int(i) for i in top],
            "top16_logits": [round(float(row[i]), 5) for i in top],
        })

    # greedy continuation
    cont = []
    nxt = int(np.argmax(scores[-1]))
    for _ in range(N_CONT):
        cont.append(nxt)
        llm.eval([nxt])
        nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))

    # LAMBADA perplexity: each passage (context + continuation) scored on its own
    path = os.path.join(a.eval, "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    nll, count, lens = 0.0, 0, []
    with gzip.open(path, "rt") as f:
        for line in f:
            if len(lens) >= N_LAMBADA:
                break
            j = json.loads(line)
            if j.get("doc_id", 0) >= 1_000_000:
                continue
            text = j["request"]["context"] + j["request"]["continuation"]
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            lens.append(len(ids))
            llm.reset()
            llm.eval(ids)
            s = np.array(llm.scores[: len(ids)], dtype=np.float64)
            m = s.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
            for i in range(1, len(ids)):
                nll += lse[i - 1] - s[i - 1, ids[i]]
            count += len(ids) - 1

    out = {
        "generator": "llama-cpp-python " + __import__("llama_cpp").__version__ + " (llama.cpp CPU, KV cache " + ("f32" if kv_f32() else "f16") + ")",
        "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "prompt": PROMPT,
        "prompt_ids": [int(t) for t in toks],
        "probe_ids": [int(i) for i in probe],
        "positions": positions,
        "greedy_continuation": cont,
        "lambada_passages": len(lens),
        "lambada_token_counts": lens,
        "lambada_nll_sum": nll,
        "lambada_tokens_scored": count,
        "lambada_ppl": float(np.exp(nll / count)),
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}: prompt {toks}, continuation {cont}, LAMBADA ppl {out['lambada_ppl']:.4f} over {count} tokens")

if __name__ == "__main__":
    main()
