//! Sliding-window perplexity scores every token after the first exactly once, whatever the
//! stride.

mod common;

use common::*;
use std::sync::Arc;
use syncdrop::eval::score_tokens;
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, ModelFiles};

#[test]
fn every_token_after_the_first_is_scored_once_at_any_stride() {
    let dir = tmpdir("ppl_stride");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 5, GgmlType::F32, "llama");
    let files = Arc::new(ModelFiles::open(&path).unwrap());
    let opts = EngineOptions {
        tp: 2,
        threads: 1,
        capacity: 64,
        ..Default::default()
    };
    let mut e = Engine::new(files, &opts).unwrap();
    let toks: Vec<u32> = (0..10).map(|i| (i * 11 + 3) % 64).collect();
    for (window, stride) in [(4, 1), (4, 2), (4, 3), (4, 4), (2, 2), (16, 16)] {
        let r = score_tokens(&mut e, &toks, window, stride).unwrap();
        assert_eq!(r.tokens_scored, 9, "window {window}, stride {stride}");
        assert!(r.nll_sum.is_finite() && r.nll_sum > 0.0);
    }
    // stride == window overlaps the windows by one token: the windows of stride window - 1
    let a = score_tokens(&mut e, &toks, 4, 4).unwrap();
    let b = score_tokens(&mut e, &toks, 4, 3).unwrap();
    assert_eq!(
        (a.nll_sum, a.tokens_processed),
        (b.nll_sum, b.tokens_processed)
    );
    // one window holding everything scores the same tokens with full context
    let whole = score_tokens(&mut e, &toks, 16, 16).unwrap();
    assert_eq!(whole.tokens_processed, 10);
}
