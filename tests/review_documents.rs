//! Documents and identities: a model that expects a BOS token gets it at the start of every
//! document it scores or continues (GGUF `add_bos_token`, a tokenizer.json post-processor),
//! a HF folder's plan identity covers its config.json, the simulated P2P all-reduce refuses
//! ranks that disagree on the length, and `plan`/`sweep` refuse a KV cache too small for their
//! perplexity windows before any work, and title their plots with the model they measured.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;
use syncdrop::comm::p2p_sim::P2pSimComm;
use syncdrop::comm::Communicator;
use syncdrop::gguf::{GgufFile, Value};
use syncdrop::spd::model_sha256;
use syncdrop::tokenizer::Tokenizer;
use syncdrop::{Error, ModelFiles};

/// A GGUF holding a byte-level BPE tokenizer (pre-tokenizer `pre`, BOS id 0) with `extra`
/// metadata.
fn bos_gguf(path: &Path, pre: &str, extra: &[(&str, Value)]) -> GgufFile {
    let mut meta = vec![("tokenizer.ggml.bos_token_id", Value::U32(0))];
    meta.extend(extra.iter().cloned());
    bpe_gguf(path, pre, &["<s>", "a", "b", "ab"], &["a b"], &meta)
}

/// Llama 2 / 3 GGUFs say `add_bos_token = true` (Llama 3's pre-tokenizer implies it when the
/// key is missing, as in llama.cpp); the tokenizer never added it, so every prompt and every
/// perplexity text of those models started without the token they were trained to see first.
#[test]
fn gguf_add_bos_token_puts_the_bos_first_in_a_document() {
    let dir = tmpdir("rd-bos");
    let p = dir.join("t.gguf");
    let tok = |pre: &str, extra: &[(&str, Value)]| {
        Tokenizer::from_gguf(&bos_gguf(&p, pre, extra)).unwrap()
    };
    let yes = tok(
        "gpt-2",
        &[("tokenizer.ggml.add_bos_token", Value::Bool(true))],
    );
    assert!(yes.add_bos);
    assert_eq!(yes.encode_document("ab").unwrap(), vec![0, 3]);
    assert_eq!(yes.encode("ab").unwrap(), vec![3], "encode() stays raw");
    let no = tok(
        "llama-bpe",
        &[("tokenizer.ggml.add_bos_token", Value::Bool(false))],
    );
    assert_eq!(no.encode_document("ab").unwrap(), vec![3]);
    assert!(
        tok("llama-bpe", &[]).add_bos,
        "llama-bpe adds BOS by default"
    );
    let gpt2 = tok("gpt-2", &[]);
    assert!(!gpt2.add_bos, "GPT-2-style BPE does not by default");
    assert_eq!(gpt2.encode_document("ab").unwrap(), vec![3]);
    std::fs::remove_dir_all(dir).ok();
}

/// A character-level tokenizer.json over `vocab` tokens: `<s>` is id 0; with `template` its
/// post-processor puts `<s>` before every text, as Llama's tokenizer.json files do.
fn char_tokenizer(path: &Path, vocab: usize, template: bool) {
    use tokenizers::models::bpe::BPE;
    let mut v: Vec<String> = vec!["<s>".into()];
    v.extend((0..vocab - 1).map(|i| char::from(b'!' + i as u8).to_string()));
    let bpe = BPE::builder()
        .vocab_and_merges(
            v.iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect::<tokenizers::models::bpe::Vocab>(),
            vec![],
        )
        .build()
        .unwrap();
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.add_special_tokens(&[tokenizers::AddedToken::from("<s>", true)]);
    if template {
        let post = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", 0)])
            .build()
            .unwrap();
        inner.with_post_processor(Some(post));
    }
    inner.save(path, false).unwrap();
}

#[test]
fn a_tokenizer_json_post_processor_bos_is_found_and_can_be_switched_off() {
    let dir = tmpdir("rd-hfbos");
    let path = dir.join("tokenizer.json");
    char_tokenizer(&path, 16, true);
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!((t.bos, t.add_bos), (Some(0), true));
    assert_eq!(t.encode_document("!\"").unwrap(), vec![0, 1, 2]);
    assert_eq!(t.encode("!\"").unwrap(), vec![1, 2]);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "bos_token": "<s>"}"#,
    )
    .unwrap();
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!((t.bos, t.add_bos), (Some(0), false));
    assert_eq!(t.encode_document("!\"").unwrap(), vec![1, 2]);
    // no template: the configured bos_token is known (an empty context's stand-in), not added
    char_tokenizer(&path, 16, false);
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!((t.bos, t.add_bos), (Some(0), false));
    std::fs::remove_dir_all(dir).ok();
}

/// perplexity_texts scores each text as a document: with a BOS in front, the text's first
/// token is predicted (one more token scored), and the result changes.
#[test]
fn perplexity_texts_scores_from_the_bos() {
    let (mut engine, dir) = tiny_engine(1, "rd-ppl", 2, false);
    let path = dir.join("tokenizer.json");
    char_tokenizer(&path, 64, true);
    let texts = vec!["#$%&'()".to_string(), "*+,-".to_string()];
    let mut tok = Tokenizer::from_file(&path).unwrap();
    let with = syncdrop::eval::perplexity_texts(&mut engine, &tok, &texts, 16, 8, false).unwrap();
    tok.add_bos = false;
    let without =
        syncdrop::eval::perplexity_texts(&mut engine, &tok, &texts, 16, 8, false).unwrap();
    assert_eq!(without.tokens_scored, 6 + 3);
    assert_eq!(with.tokens_scored, 7 + 4);
    assert!((with.ppl() - without.ppl()).abs() > 1e-6);
    std::fs::remove_dir_all(dir).ok();
}

/// The same safetensors under another config.json is another model (other eps, RoPE base,
/// tied embeddings...): a plan made for one must not validate against the other.
#[test]
fn a_hf_folder_identity_covers_its_config() {
    let dir = tmpdir("rd-sha");
    let t = Tiny::small();
    write_hf_folder(&dir, &t, 3);
    let sha = |d: &Path| model_sha256(&ModelFiles::open(d).unwrap()).unwrap();
    let before = sha(&dir);
    assert_eq!(before, sha(&dir), "stable");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    j["rms_norm_eps"] = 1e-6.into();
    std::fs::write(dir.join("config.json"), j.to_string()).unwrap();
    assert_ne!(before, sha(&dir));
    std::fs::remove_dir_all(dir).ok();
}

/// A rank whose all-reduce is shorter than its peers' summed their stale buffer tail into the
/// result without a word; both ranks now stop with the two lengths.
#[test]
fn p2p_sim_ranks_that_disagree_on_the_length_are_refused() {
    let group = P2pSimComm::group(2, 16, Duration::from_secs(5), 0).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .iter()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || {
                    let mut ok = vec![1.0f32; 4];
                    c.all_reduce_sum(&mut ok)?;
                    assert_eq!(ok, vec![2.0; 4]);
                    let mut v = vec![1.0f32; 4 - r];
                    c.all_reduce_sum(&mut v)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        match r {
            Err(Error::Comm(m)) => assert!(m.contains("length mismatch"), "{m}"),
            other => panic!("expected a length mismatch, got {other:?}"),
        }
    }
}

/// `perplexity --file` on a HF folder whose tokenizer adds a BOS scores every token of the
/// file (the BOS predicts the first), and one token fewer when tokenizer_config.json turns it off.
#[test]
fn the_runner_scores_a_file_from_the_bos() {
    let Some(llama) = runner() else {
        eprintln!("skipped: the llama example is not built");
        return;
    };
    let dir = tmpdir("rd-cli-bos");
    let t = Tiny::small();
    write_hf_folder(&dir, &t, 5);
    char_tokenizer(&dir.join("tokenizer.json"), t.vocab, true);
    std::fs::write(dir.join("text.txt"), "#$%&'()*+").unwrap();
    let scored = |dir: &Path| {
        let out = std::process::Command::new(&llama)
            .args([
                "perplexity",
                "--model",
                ".",
                "--file",
                "text.txt",
                "--window",
                "16",
                "--stride",
                "8",
            ])
            .current_dir(dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let i = stdout.find(" tokens scored").expect("tokens scored");
        let n: String = stdout[..i]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        n.chars()
            .rev()
            .collect::<String>()
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(scored(&dir), 9);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false}"#,
    )
    .unwrap();
    assert_eq!(scored(&dir), 8);
    std::fs::remove_dir_all(dir).ok();
}

/// `sweep` with a KV cache shorter than a LAMBADA passage stopped with a bare "exceeds the KV
/// cache" after the sensitivity analysis (and at worst after hours of distillation); it is
/// refused right after the model loads, naming --ctx.
#[test]
fn sweep_and_plan_refuse_a_ctx_too_small_for_their_perplexity() {
    let Some(llama) = runner() else {
        eprintln!("skipped: the llama example is not built");
        return;
    };
    let dir = tmpdir("rd-ctx");
    for args in [
        &[
            "sweep",
            "--ctx",
            "40",
            "--tps",
            "2",
            "--limit",
            "1",
            "--lambada",
            "2",
            "--out",
            "s.json",
        ][..],
        &[
            "plan",
            "--ctx",
            "40",
            "--tp",
            "2",
            "--budget-ppl",
            "10",
            "--limit",
            "2",
            "--out",
            "p.json",
        ][..],
    ] {
        let (code, err) = run(&llama, &dir, args);
        assert_ne!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains("--ctx 40") && err.contains("LAMBADA perplexity"),
            "{args:?}: {err}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `sweep --plot-only` titled every plot "SmolLM2-135M" whatever model the file measured; the
/// file now records the model and the plot says it.
#[test]
fn a_sweep_plot_is_titled_with_its_model() {
    let Some(llama) = runner() else {
        eprintln!("skipped: the llama example is not built");
        return;
    };
    let dir = tmpdir("rd-title");
    let point = |k: usize, ppl: f64| {
        serde_json::json!({"tp": 2, "method": "zero-shot", "spd_blocks": k,
            "fraction": k as f64 / 4.0, "ppl": ppl, "acc": 0.4, "acc_stderr": 0.05})
    };
    let file =
        serde_json::json!({"model": "Tiny-Llama-X", "points": [point(0, 10.0), point(2, 12.0)]});
    std::fs::write(dir.join("s.json"), file.to_string()).unwrap();
    let (code, err) = run(&llama, &dir, &["sweep", "--plot-only", "--out", "s.json"]);
    assert_eq!(code, 0, "{err}");
    let svg = std::fs::read_to_string(dir.join("s.svg")).unwrap();
    assert!(svg.contains("Tiny-Llama-X: accuracy"), "title");
    assert!(!svg.contains("SmolLM2"));
    std::fs::remove_dir_all(dir).ok();
}
