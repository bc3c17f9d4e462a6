//! End to end on the real SmolLM2-135M-Instruct GGUF (fetched by scripts/fetch-assets.sh):
//! TP 2/3/4/8 against TP 1, a committed greedy golden, and agreement with llama.cpp (an
//! independent implementation reading the same file; tests/golden/smollm2_llamacpp.json,
//! made by scripts/golden_llamacpp.py).

#![allow(clippy::needless_range_loop)]

use std::sync::Arc;
use syncdrop::eval::{lambada, perplexity_texts};
use syncdrop::generate::argmax;
use syncdrop::tokenizer::{chatml, Tokenizer};
use syncdrop::{assets, Engine, EngineOptions, ModelFiles};

/// Largest |TP N - TP 1| logit difference allowed (logits span about +-30; f32 sums in
/// another order across 30 layers move them by ~1e-4).
const TP_ATOL: f32 = 2e-3;
/// Largest |syncdrop - llama.cpp| logit difference at the probe ids, after removing the mean
/// difference (softmax ignores a constant shift). llama.cpp quantises activations to Q8_1
/// inside its Q4_1 matmuls and keeps an f16 KV cache; syncdrop computes in f32 from the same
/// dequantised weights. Measured 2026-11-22: 0.20-0.65 over the 5 prompt positions (logits
/// span ~20); the perplexity test below bounds the effect on what matters to 1%.
const LLAMACPP_ATOL: f32 = 0.75;

fn files() -> Arc<ModelFiles> {
    let path = assets::smollm2().unwrap_or_else(|e| panic!("{e}"));
    Arc::new(ModelFiles::open(path).unwrap())
}

fn tokenizer(f: &ModelFiles) -> Tokenizer {
    match f {
        ModelFiles::Gguf(g) => Tokenizer::from_gguf(g).unwrap(),
        _ => unreachable!(),
    }
}

fn engine(f: &Arc<ModelFiles>, tp: usize) -> Engine {
    let opts = EngineOptions {
        tp,
        threads: 2,
        capacity: 512,
        ..Default::default()
    };
    Engine::new(f.clone(), &opts).unwrap()
}

fn golden() -> serde_json::Value {
    let text = include_str!("golden/smollm2_llamacpp.json");
    serde_json::from_str(text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

const PROMPT: &str = "The capital of France is";

/// Prefill logits of every prompt row, then 16 greedy decode steps: (tokens, logits rows).
fn greedy_trace(e: &mut Engine, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let l = e.forward(prompt, 0, 0..prompt.len()).unwrap();
    let mut rows: Vec<Vec<f32>> = (0..prompt.len()).map(|i| l.row(i).to_vec()).collect();
    let mut toks = vec![argmax(rows.last().unwrap()) as u32];
    for s in 0..steps {
        let l = e.forward(&[toks[s]], prompt.len() + s, 0..1).unwrap();
        rows.push(l.row(0).to_vec());
        toks.push(argmax(l.row(0)) as u32);
    }
    toks.truncate(steps);
    (toks, rows)
}

#[test]
fn tp_2_3_4_8_match_tp_1_over_prefill_and_16_decode_steps() {
    let f = files();
    let prompt = tokenizer(&f).encode(PROMPT).unwrap();
    let (ref_toks, ref_rows) = greedy_trace(&mut engine(&f, 1), &prompt, 16);
    for tp in [2, 3, 4, 8] {
        let mut e = engine(&f, tp);
        // feed TP 1's tokens so both runs see the same sequence
        let l = e.forward(&prompt, 0, 0..prompt.len()).unwrap();
        let mut worst = 0f32;
        for i in 0..prompt.len() {
            worst = worst.max(max_abs_diff(l.row(i), &ref_rows[i]));
        }
        for (s, tok) in ref_toks.iter().enumerate() {
            let l = e.forward(&[*tok], prompt.len() + s, 0..1).unwrap();
            worst = worst.max(max_abs_diff(l.row(0), &ref_rows[prompt.len() + s]));
            assert_eq!(
                argmax(l.row(0)),
                argmax(&ref_rows[prompt.len() + s]),
                "TP {tp} step {s}"
            );
        }
        eprintln!(
            "TP {tp} ({}) vs TP 1: max |logit diff| = {worst:.2e}",
            e.layout.head_partition()
        );
        assert!(
            worst <= TP_ATOL,
            "TP {tp}: max |logit diff| {worst} > {TP_ATOL}"
        );
        let syncs = e.comm_stats().unwrap()[0].all_reduces;
        assert_eq!(
            syncs,
            2 * 30 * 17,
            "TP {tp}: two sync points per block per forward"
        );
    }
}

#[test]
fn greedy_continuation_matches_golden_and_llamacpp() {
    let f = files();
    let tok = tokenizer(&f);
    let prompt = tok.encode(PROMPT).unwrap();
    let (toks, _) = greedy_trace(&mut engine(&f, 1), &prompt, 16);
    let ours: serde_json::Value =
        serde_json::from_str(include_str!("golden/smollm2_greedy.json")).unwrap();
    assert_eq!(
        toks,
        ids(&ours["tokens"]),
        "committed golden: {:?}",
        tok.decode(&toks, false)
    );
    // llama.cpp's continuation must agree on " Paris.\n\nThe", and where it first differs our
    // top-2 margin must be below twice the logit tolerance against llama.cpp (a near tie that
    // llama.cpp's Q8_1 activations can flip). Later steps depend on that choice: not compared.
    let theirs = ids(&golden()["greedy_continuation"]);
    let mut e = engine(&f, 1);
    let mut l = e
        .forward(&prompt, 0, prompt.len() - 1..prompt.len())
        .unwrap();
    for s in 0..toks.len() {
        if toks[s] != theirs[s] {
            let row = l.row(0);
            let margin = row[toks[s] as usize] - row[theirs[s] as usize];
            eprintln!("first difference from llama.cpp at step {s}: margin {margin:.3}");
            assert!(s >= 5, "continuations differ at step {s}");
            assert!(
                margin < 2.0 * LLAMACPP_ATOL,
                "step {s}: margin {margin} is no near tie"
            );
            break;
        }
        l = e.forward(&[toks[s]], prompt.len() + s, 0..1).unwrap();
    }
    // TP 3 generates the same text
    let (toks3, _) = greedy_trace(&mut engine(&f, 3), &prompt, 16);
    assert_eq!(toks3, toks);
}

#[test]
fn logits_agree_with_llamacpp() {
    let f = files();
    let g = golden();
    let prompt = tokenizer(&f).encode(PROMPT).unwrap();
    assert_eq!(
        prompt,
        ids(&g["prompt_ids"]),
        "tokenizer disagrees with llama.cpp"
    );
    let probe = ids(&g["probe_ids"]);
    let l = engine(&f, 1).forward(&prompt, 0, 0..prompt.len()).unwrap();
    let mut worst = 0f32;
    for (i, pos) in g["positions"].as_array().unwrap().iter().enumerate() {
        let theirs: Vec<f32> = pos["probe_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mine: Vec<f32> = probe.iter().map(|p| l.row(i)[*p as usize]).collect();
        // Logits matter up to a constant (softmax): remove the mean difference first.
        let shift = mine.iter().zip(&theirs).map(|(a, b)| a - b).sum::<f32>() / mine.len() as f32;
        let centred: Vec<f32> = mine.iter().map(|v| v - shift).collect();
        let dev = max_abs_diff(&centred, &theirs);
        eprintln!("position {i}: shift {shift:+.3}, max |centred diff| {dev:.3}");
        worst = worst.max(dev);
        let top = ids(&pos["top16_ids"]);
        assert_eq!(argmax(l.row(i)) as u32, top[0], "top-1 at position {i}");
    }
    eprintln!(
        "max |logit - llama.cpp| at 256 probe ids x {} positions: {worst:.3}",
        prompt.len()
    );
    assert!(worst <= LLAMACPP_ATOL, "{worst}");
}

#[test]
fn lambada_perplexity_within_1_percent_of_llamacpp() {
    let f = files();
    let g = golden();
    let tok = tokenizer(&f);
    let n = g["lambada_passages"].as_u64().unwrap() as usize;
    let texts: Vec<String> = lambada(&assets::eval_dir().unwrap(), n)
        .unwrap()
        .iter()
        .map(|p| p.text())
        .collect();
    let counts: Vec<u32> = texts
        .iter()
        .map(|t| tok.encode(t).unwrap().len() as u32)
        .collect();
    assert_eq!(
        counts,
        ids(&g["lambada_token_counts"]),
        "tokenization of LAMBADA passages"
    );
    let r = perplexity_texts(&mut engine(&f, 1), &tok, &texts, 512, 256, false).unwrap();
    let theirs = g["lambada_ppl"].as_f64().unwrap();
    eprintln!(
        "LAMBADA[{n}] ppl: syncdrop {:.4}, llama.cpp {theirs:.4}",
        r.ppl()
    );
    assert_eq!(
        r.tokens_scored as u64,
        g["lambada_tokens_scored"].as_u64().unwrap()
    );
    assert!(
        (r.ppl() / theirs - 1.0).abs() < 0.01,
        "{} vs {theirs}",
        r.ppl()
    );
}

#[test]
fn tokenizer_round_trips_and_knows_chatml() {
    let f = files();
    let tok = tokenizer(&f);
    for s in [
        "Hello, world!",
        "  leading spaces and\ttabs\nnewlines",
        "digits 1234567890 and 3.14159",
        "unicode: naïve café, 日本語, emoji 🚀",
        "",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
    // digits are split one by one (the "smollm" pre-tokenizer)
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    let chat = tok.encode(&chatml(Some("sys"), "hi")).unwrap();
    let start = tok.token_id("<|im_start|>").unwrap();
    let end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(chat[0], start);
    assert_eq!(chat.iter().filter(|t| **t == start).count(), 3);
    assert_eq!(chat.iter().filter(|t| **t == end).count(), 2);
    assert_eq!(tok.eos, Some(2));
    assert_eq!(
        tok.default_system.as_deref(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A bf16 wire (each rank's all-reduce contribution rounded once to bf16) changes the logits
/// by about what bf16 activations would, no more; greedy decoding of the golden prompt is
/// unchanged; at TP 1 (no wire) nothing changes at all.
#[test]
fn bf16_wire_stays_close_to_the_f32_wire_and_keeps_the_greedy_continuation() {
    let f = files();
    let tok = tokenizer(&f);
    let prompt = tok.encode(PROMPT).unwrap();
    let run = |tp: usize, wire: syncdrop::comm::Wire| {
        let opts = EngineOptions {
            tp,
            threads: 2,
            capacity: 512,
            wire,
            ..Default::default()
        };
        let mut e = Engine::new(f.clone(), &opts).unwrap();
        greedy_trace(&mut e, &prompt, 8)
    };
    use syncdrop::comm::Wire;
    let (t1, r1) = run(1, Wire::F32);
    let (t1b, r1b) = run(1, Wire::Bf16);
    assert_eq!((t1.clone(), r1.clone()), (t1b, r1b), "TP 1 has no wire");
    for tp in [2usize, 4] {
        let (tf, rf) = run(tp, Wire::F32);
        let (tb, rb) = run(tp, Wire::Bf16);
        assert_eq!(tb, tf, "TP {tp}: greedy continuation");
        let worst = rf
            .iter()
            .zip(&rb)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        eprintln!("TP {tp}: bf16 wire moves logits by at most {worst:.4}");
        assert!(worst > 0.0, "TP {tp}: the bf16 wire rounded nothing");
        assert!(worst < 0.5, "TP {tp}: bf16 wire moved a logit by {worst}");
    }
}

/// A multiple-choice document whose choices share a context that encodes to no tokens is
/// scored (after the tokenizer's BOS/end-of-text token, as lm-evaluation-harness does) instead
/// of panicking on the shared prefill's last row.
#[test]
fn choices_sharing_an_empty_context_are_scored() {
    use syncdrop::tasks::{evaluate, Doc};
    let f = files();
    let tok = tokenizer(&f);
    let doc = Doc {
        id: 7,
        choices: vec![
            (String::new(), "The capital of France is Paris.".into()),
            (String::new(), "The capital of France is banana.".into()),
        ],
        gold: 0,
    };
    assert!(tok.encode(&doc.choices[0].0).unwrap().is_empty());
    let bar = indicatif::ProgressBar::hidden();
    let s = evaluate(&mut engine(&f, 2), &tok, "sciq", &[doc], &bar).unwrap();
    assert_eq!((s.n, s.docs[0].id), (1, 7));
    assert!(s.docs[0].acc, "Paris over banana: {s:?}");
}

/// With an empty context every continuation token is scored, the first one included (it is
/// predicted from the BOS/end-of-text token that stands in for the context). Single-token
/// choices would all score 0, a tie that picks choice 0, if the first token went unscored.
#[test]
fn the_first_token_after_an_empty_context_is_scored() {
    use syncdrop::tasks::{evaluate, Doc};
    let f = files();
    let tok = tokenizer(&f);
    assert!(tok.bos.or(tok.eos).is_some());
    let rare = "ixel";
    let common = "The";
    for w in [rare, common] {
        assert_eq!(tok.encode(w).unwrap().len(), 1, "{w:?} is not one token");
    }
    let doc = Doc {
        id: 3,
        choices: vec![(String::new(), rare.into()), (String::new(), common.into())],
        gold: 1,
    };
    let bar = indicatif::ProgressBar::hidden();
    let s = evaluate(&mut engine(&f, 1), &tok, "sciq", &[doc], &bar).unwrap();
    assert!(s.docs[0].acc, "{common:?} after BOS over {rare:?}: {s:?}");
    // LAMBADA's last word is right only if greedy decoding produces it: a rare first token
    // after BOS is not the argmax (unscored, it passed vacuously).
    let word = Doc {
        id: 4,
        choices: vec![(String::new(), rare.into())],
        gold: 0,
    };
    let s = evaluate(&mut engine(&f, 1), &tok, "lambada", &[word], &bar).unwrap();
    assert!(
        !s.docs[0].acc,
        "{rare:?} is not the argmax after BOS: {s:?}"
    );
}

/// A rank's parameter count follows head grouping: a block whose heads were re-assigned
/// counts the KV heads that rank now loads (under GQA a rank may need more or fewer of them).
#[test]
fn rank_params_count_each_blocks_own_shards() {
    let f = files();
    let mut e = engine(&f, 4);
    let cfg = e.cfg.clone();
    let count = |e: &Engine, r: usize| -> u64 {
        let mut n = 0u64;
        for l in 0..cfg.n_layers {
            let w = syncdrop::model::load_block(&f, &cfg, &e.block_shards(l)[r], l).unwrap();
            n += (w.wqkv.len() + w.wo.len() + w.w_gate_up.len() + w.w_down.len()) as u64;
        }
        n + (syncdrop::layout::even_split(cfg.vocab, 4)[r].len() * cfg.hidden) as u64
    };
    let before: Vec<u64> = (0..4)
        .map(|r| syncdrop::bench::rank_params(&e, r))
        .collect();
    assert_eq!(before[1], count(&e, 1));
    // 9 heads in 3 KV groups: ranks hold 3/2/2/2 heads; rank 1 gets heads 3 and 6 (two KV
    // groups) and rank 2 heads 4 and 5 (one), in block 5 only
    let heads = vec![vec![0, 1, 2], vec![3, 6], vec![4, 5], vec![7, 8]];
    let shards = syncdrop::layout::TpLayout::with_heads(&cfg, heads)
        .unwrap()
        .ranks;
    assert_ne!(
        shards[1].kv_heads.len(),
        e.layout.ranks[1].kv_heads.len(),
        "the new assignment must change rank 1's KV heads"
    );
    e.set_block_shards(5, shards).unwrap();
    for r in 0..4 {
        assert_eq!(
            syncdrop::bench::rank_params(&e, r),
            count(&e, r),
            "rank {r}"
        );
    }
    assert!(syncdrop::bench::rank_params(&e, 1) > before[1]);
    assert!(syncdrop::bench::rank_params(&e, 2) < before[2]);
}

/// A model whose logits are NaN (here: one block's MLP weights poisoned) is an error when
/// scored, not a silent "first choice" for every document.
#[test]
fn nan_logits_are_an_error_not_a_first_choice() {
    use syncdrop::tasks::{evaluate, Doc};
    let f = files();
    let tok = tokenizer(&f);
    let mut e = engine(&f, 2);
    let cfg = e.cfg.clone();
    let poisoned = (0..2)
        .map(|r| {
            let mut w = syncdrop::model::load_block(&f, &cfg, &e.layout.ranks[r], 3).unwrap();
            w.w_down.iter_mut().for_each(|v| *v = f32::NAN);
            w
        })
        .collect();
    e.load_layer(3, poisoned).unwrap();
    let doc = Doc {
        id: 11,
        choices: vec![
            ("The capital of France is".into(), " Paris".into()),
            ("The capital of France is".into(), " banana".into()),
        ],
        gold: 1,
    };
    let bar = indicatif::ProgressBar::hidden();
    for task in ["sciq", "lambada"] {
        let err = evaluate(&mut e, &tok, task, std::slice::from_ref(&doc), &bar).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{task}: {err}");
    }
}
