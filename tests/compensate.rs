//! Linear compensation (LC) of SPD blocks end to end: a compensation whose map is zero is
//! invisible, a nonzero one moves SPD blocks only (never a standard TP block, never TP 1),
//! the engine's compensated SPD block is the host student's with its compensated residual,
//! ISO stays bit-exact, `recover_layer` fits LC (alone and with B2B) on a tiny model and on
//! the real SmolLM2, and distilled files and plans keep compensation exactly and refuse
//! files and plans that disagree about it.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use syncdrop::backend::BlockWeights;
use syncdrop::compensate::Compensation;
use syncdrop::distill::{
    attention_output, compensate_blocks, load_compensated, load_distilled, recover_layer,
    save_distilled, save_recovered, student_output, teacher_output, BlockCompensation, CompConfig,
    DistillConfig, Sample, StudentParams,
};
use syncdrop::planner::{plan, Budget, PplMetric, Search};
use syncdrop::quant::GgmlType;
use syncdrop::spd::{model_sha256, Recovery, SpdPlan};
use syncdrop::{Engine, EngineOptions, ModelFiles};

const LAYERS: usize = 3;

/// A tiny 3-block f32 model (4 query heads, 2 KV heads, d = 32) written into a fresh
/// directory; returns (directory, GGUF path).
fn tiny_model(tag: &str, seed: u64) -> (PathBuf, PathBuf) {
    let dir = tmpdir(tag);
    let path = dir.join("m.gguf");
    let t = Tiny {
        n_layers: LAYERS,
        ..Tiny::small()
    };
    write_gguf(&path, &t, seed, GgmlType::F32, "llama");
    (dir, path)
}

fn engine(path: &Path, tp: usize, row_invariant: bool) -> Engine {
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let opts = EngineOptions {
        tp,
        threads: 1,
        capacity: 96,
        row_invariant,
        ..Default::default()
    };
    Engine::new(files, &opts).unwrap()
}

/// Every rank's original weights of block `l`.
fn originals(e: &Engine, l: usize) -> Vec<BlockWeights> {
    e.block_shards(l)
        .iter()
        .map(|s| syncdrop::model::load_block(&e.files, &e.cfg, s, l).unwrap())
        .collect()
}

/// A random rank-`k` map for hidden size `d`; `out_scale` 0 gives a zero `W_out`.
fn random_comp(d: usize, k: usize, seed: u64, out_scale: f32) -> Compensation {
    let mut r = Lcg::new(seed);
    Compensation {
        rank: k,
        w_in: r.vec(k * d, 1.0 / (d as f32).sqrt()),
        w_out: r
            .vec(d * k, 1.0)
            .into_iter()
            .map(|v| v * out_scale)
            .collect(),
    }
}

/// Block `l`'s original weights with a random compensation per rank (seeded by `seed`).
fn compensated(e: &Engine, l: usize, k: usize, seed: u64, out_scale: f32) -> Vec<BlockWeights> {
    originals(e, l)
        .into_iter()
        .enumerate()
        .map(|(r, mut w)| {
            w.comp = Some(random_comp(
                e.cfg.hidden,
                k,
                seed + 100 * r as u64,
                out_scale,
            ));
            w
        })
        .collect()
}

fn prompt(n: usize, seed: u64) -> Vec<u32> {
    let mut r = Lcg::new(seed);
    (0..n)
        .map(|_| ((r.next(1.0) + 1.0) * 31.99) as u32 % 64)
        .collect()
}

fn logits(e: &mut Engine, toks: &[u32]) -> Vec<f32> {
    e.forward(toks, 0, 0..toks.len()).unwrap().data
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// At TP 2 and 3: a compensation with a zero `W_out` gives the bits of no compensation; a
/// random one changes the logits when its block is SPD and nothing when the block is a
/// standard TP block (on any mask, and it stays loaded across `set_spd`); decode steps use
/// it too. At TP 1 an SPD block is the standard block: compensation changes nothing.
#[test]
fn compensation_moves_spd_blocks_only_and_a_zero_map_is_invisible() {
    let (dir, path) = tiny_model("lc-mask", 31);
    let toks = prompt(12, 1);
    let mask = [true, false, true];
    for tp in [2, 3] {
        let mut e = engine(&path, tp, false);
        e.set_spd(&mask).unwrap();
        let plain = logits(&mut e, &toks);
        let mut none = engine(&path, tp, false);
        let tp_plain = logits(&mut none, &toks);
        assert_ne!(
            bits(&plain),
            bits(&tp_plain),
            "TP {tp}: SPD changed nothing"
        );

        // a map of the wrong shape on one rank: refused before any rank installs anything
        for cut in [0, 1] {
            let mut bad = compensated(&e, 0, 4, 5, 0.5);
            let c = bad[1].comp.as_mut().unwrap();
            [&mut c.w_in, &mut c.w_out][cut].pop();
            assert!(e.load_layer(0, bad).is_err(), "TP {tp}: a short map loaded");
        }
        assert_eq!(bits(&logits(&mut e, &toks)), bits(&plain), "TP {tp}");

        // a zero W_out (random W_in) in every block: bit for bit the uncompensated model
        for l in 0..LAYERS {
            e.load_layer(l, compensated(&e, l, 4, 7 + l as u64, 0.0))
                .unwrap();
        }
        assert_eq!(
            bits(&logits(&mut e, &toks)),
            bits(&plain),
            "TP {tp}: zero map"
        );

        // a random map in the standard block 1 only: ignored
        for l in 0..LAYERS {
            e.load_layer(l, originals(&e, l)).unwrap();
        }
        e.load_layer(1, compensated(&e, 1, 4, 11, 0.5)).unwrap();
        assert_eq!(
            bits(&logits(&mut e, &toks)),
            bits(&plain),
            "TP {tp}: a standard TP block used its compensation"
        );
        // the same map in the SPD block 2: the logits move (block 2 is the last: every row)
        e.load_layer(1, originals(&e, 1)).unwrap();
        e.load_layer(2, compensated(&e, 2, 4, 11, 0.5)).unwrap();
        let comp2 = logits(&mut e, &toks);
        let moved = max_abs_diff(&comp2, &plain);
        assert!(
            moved > 1e-3,
            "TP {tp}: compensation moved logits by {moved}"
        );
        // block 2 switched back to a standard block: its compensation is ignored
        e.set_spd(&[true, false, false]).unwrap();
        let mut other = engine(&path, tp, false);
        other.set_spd(&[true, false, false]).unwrap();
        assert_eq!(
            bits(&logits(&mut e, &toks)),
            bits(&logits(&mut other, &toks)),
            "TP {tp}: compensation of a block switched back to TP"
        );
        // and switched to SPD again: the compensation is still there
        e.set_spd(&mask).unwrap();
        assert_eq!(bits(&logits(&mut e, &toks)), bits(&comp2), "TP {tp}");

        // decode steps (t = 1) are compensated too: prefill 8 + 4 single steps match the
        // 12-token prefill, and differ from the uncompensated steps
        let n = 8;
        e.forward(&toks[..n], 0, 0..1).unwrap();
        let mut plain_steps = engine(&path, tp, false);
        plain_steps.set_spd(&mask).unwrap();
        plain_steps.forward(&toks[..n], 0, 0..1).unwrap();
        let vocab = e.cfg.vocab;
        for (i, &tok) in toks[n..].iter().enumerate() {
            let step = e.forward(&[tok], n + i, 0..1).unwrap().data;
            let want = &comp2[(n + i) * vocab..(n + i + 1) * vocab];
            let gap = max_abs_diff(&step, want);
            assert!(gap < 1e-4, "TP {tp} step {i}: decode vs prefill {gap}");
            let p = plain_steps.forward(&[tok], n + i, 0..1).unwrap().data;
            assert!(
                max_abs_diff(&step, &p) > 1e-4,
                "TP {tp} step {i}: decode ignored the compensation"
            );
        }
    }

    // TP 1: no sync point to drop, so nothing to compensate
    let mut one = engine(&path, 1, false);
    let base = logits(&mut one, &toks);
    for l in 0..LAYERS {
        one.load_layer(l, compensated(&one, l, 4, 40 + l as u64, 0.5))
            .unwrap();
    }
    assert_eq!(bits(&logits(&mut one, &toks)), bits(&base), "TP 1, no SPD");
    one.set_spd(&[true; LAYERS]).unwrap();
    assert_eq!(bits(&logits(&mut one, &toks)), bits(&base), "TP 1, all SPD");
    std::fs::remove_dir_all(dir).ok();
}

/// The engine's compensated SPD block is the host student's (what B2B trains) with each
/// rank's residual X + estimate_r (`Sample::x_local`), and an uncompensated one is the
/// student without it: block outputs agree to f32 rounding, at TP 2 and 3.
#[test]
fn the_engine_block_equals_the_host_student_with_its_compensated_residual() {
    let (dir, path) = tiny_model("lc-host", 32);
    let toks = prompt(10, 2);
    let l = 1;
    for tp in [2, 3] {
        let mut e = engine(&path, tp, false);
        let (d, eps) = (e.cfg.hidden, e.cfg.rms_eps);
        let weights = compensated(&e, l, 6, 3, 0.5);
        let x = e.block_input(&toks, l).unwrap();
        let att: Vec<Vec<f32>> = e
            .block_shards(l)
            .iter()
            .zip(&weights)
            .map(|(s, w)| attention_output(&e.cfg, s, w, &x))
            .collect();
        let target = teacher_output(&weights, &att, &x, d, eps, 1);
        let x_local: Vec<Vec<f32>> = weights
            .iter()
            .map(|w| {
                let mut u = x.clone();
                w.comp.as_ref().unwrap().apply(&x, d, eps, &mut u, 1);
                u
            })
            .collect();
        let mut s = Sample {
            x: x.clone(),
            att,
            target,
            x_local: None,
        };
        let params: Vec<StudentParams> = weights.iter().map(StudentParams::from_block).collect();
        let zero_shot = student_output(&params, &s, d, eps, 1);
        s.x_local = Some(x_local);
        let lc = student_output(&params, &s, d, eps, 1);

        let mut mask = [false; LAYERS];
        mask[l] = true;
        e.set_spd(&mask).unwrap();
        let engine_zero_shot = e.block_input(&toks, l + 1).unwrap();
        e.load_layer(l, weights).unwrap();
        let engine_lc = e.block_input(&toks, l + 1).unwrap();
        // the standard block on the same input is the teacher
        e.set_spd(&[false; LAYERS]).unwrap();
        let engine_tp = e.block_input(&toks, l + 1).unwrap();

        assert!(
            max_abs_diff(&engine_zero_shot, &zero_shot) < 1e-4,
            "TP {tp}"
        );
        assert!(max_abs_diff(&engine_lc, &lc) < 1e-4, "TP {tp}");
        assert!(max_abs_diff(&engine_tp, &s.target) < 1e-4, "TP {tp}");
        let moved = max_abs_diff(&lc, &zero_shot);
        assert!(
            moved > 1e-2,
            "TP {tp}: the compensation moved the block by {moved}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Prefill with Intra-Sequence Overlap (row-invariant CPU products) through compensated SPD
/// blocks gives the bits of the one-shot prefill, for every split, with the KV caches equal
/// too (decode steps after it agree bit for bit).
#[test]
fn iso_through_compensated_spd_blocks_is_bit_identical() {
    let (dir, path) = tiny_model("lc-iso", 33);
    let toks = prompt(21, 3);
    let n = toks.len();
    let trace = |e: &mut Engine, split: Option<usize>| -> Vec<u32> {
        let l = match split {
            Some(s) => e.forward_iso(&toks, s, 0..n).unwrap(),
            None => e.forward(&toks, 0, 0..n).unwrap(),
        };
        let mut out = bits(&l.data);
        for (i, t) in [7u32, 11].iter().enumerate() {
            out.extend(bits(&e.forward(&[*t], n + i, 0..1).unwrap().data));
        }
        out
    };
    for tp in [2, 3] {
        let setup = || {
            let mut e = engine(&path, tp, true);
            e.set_spd(&[true, false, true]).unwrap();
            for l in 0..LAYERS {
                e.load_layer(l, compensated(&e, l, 5, 60 + l as u64, 0.5))
                    .unwrap();
            }
            e
        };
        let want = trace(&mut setup(), None);
        // the compensation is in effect
        let mut zero_shot = engine(&path, tp, true);
        zero_shot.set_spd(&[true, false, true]).unwrap();
        assert_ne!(trace(&mut zero_shot, None), want, "TP {tp}");
        let bad: Vec<usize> = (1..n)
            .filter(|&split| trace(&mut setup(), Some(split)) != want)
            .collect();
        assert!(
            bad.is_empty(),
            "TP {tp}: ISO differs from the plain prefill at splits {bad:?}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Calibration sequences for the tiny model: `n` of `len` tokens.
fn calib(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n).map(|i| prompt(len, seed + i as u64)).collect()
}

/// Mean squared difference between the SPD block `l`'s output and the standard block's,
/// over `seqs` (the engine's mask is restored).
fn block_error(e: &mut Engine, seqs: &[Vec<u32>], l: usize) -> f64 {
    let mask = e.spd().to_vec();
    let mut tp_mask = mask.clone();
    tp_mask[l] = false;
    let mut spd_mask = mask.clone();
    spd_mask[l] = true;
    let (mut se, mut n) = (0f64, 0usize);
    for s in seqs {
        e.set_spd(&tp_mask).unwrap();
        let tp = e.block_input(s, l + 1).unwrap();
        e.set_spd(&spd_mask).unwrap();
        let spd = e.block_input(s, l + 1).unwrap();
        se += tp
            .iter()
            .zip(&spd)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        n += tp.len();
    }
    e.set_spd(&mask).unwrap();
    se / n as f64
}

/// `recover_layer` with LC alone on the tiny model at TP 2, on calibration whose missing
/// partials are exactly linear in x^: sequences repeating one token, whose every row
/// attends to copies of itself, so a rank's attention partial is (x^ * attn_norm) W_v W_o,
/// of rank 8 (one KV head of 8 dimensions per rank). The report has LC and no B2B, and its
/// residual on held-out tokens is near 0; the weights it returns are the original block plus
/// a rank-8 map on every rank; the engine runs them: on tokens it was not fitted on, the SPD
/// block's error against the TP block all but vanishes, and on other text the logits move.
/// The fit is deterministic. Asking for nothing, or holding out every sequence, is refused.
#[test]
fn recover_layer_fits_lc_alone_on_a_tiny_model() {
    let (dir, path) = tiny_model("lc-fit", 34);
    let l = 1;
    let repeat = |tok: u32| vec![tok; 4];
    // fitted on tokens 0..48, held out 48..56 (LC's own hold-out), checked on 56..64
    let seqs: Vec<Vec<u32>> = (0..56).map(repeat).collect();
    let unseen: Vec<Vec<u32>> = (56..64).map(repeat).collect();
    let text = prompt(16, 900);
    let mut mask = [false; LAYERS];
    mask[l] = true;
    let cc = CompConfig {
        rank: 8,
        ridge: 1e-6,
        holdout: 8,
    };
    let mut e = engine(&path, 2, false);
    e.set_spd(&mask).unwrap();
    assert!(recover_layer(&mut e, &seqs, l, None, None, 1).is_err());
    let all = CompConfig {
        holdout: seqs.len(),
        ..cc
    };
    assert!(recover_layer(&mut e, &seqs, l, None, Some(&all), 1).is_err());

    let before_logits = logits(&mut e, &text);
    let before_err = block_error(&mut e, &unseen, l);
    let (w, rep) = recover_layer(&mut e, &seqs, l, None, Some(&cc), 1).unwrap();
    let c = rep.comp.as_ref().expect("LC was asked for");
    assert!(rep.b2b.is_none());
    eprintln!("tiny LC: {c:?}");
    assert!(c.residual > 0.0 && c.residual < 1e-2, "{c:?}");
    assert!(c.heldout && c.rank == 8, "{c:?}");
    assert_eq!(c.tokens, 48 * 4);
    let orig = originals(&e, l);
    assert_eq!(w.len(), 2);
    for (got, want) in w.iter().zip(&orig) {
        let comp = got.comp.as_ref().expect("every rank has a map");
        assert_eq!(comp.rank, 8);
        comp.check(e.cfg.hidden).unwrap();
        let mut plain = got.clone();
        plain.comp = None;
        assert_eq!(&plain, want, "LC alone changed the block's weights");
    }
    let after_err = block_error(&mut e, &unseen, l);
    eprintln!("tiny LC: SPD block mse vs TP {before_err:.3e} -> {after_err:.3e}");
    assert!(
        after_err < 1e-2 * before_err,
        "LC did not remove the block error: {before_err} -> {after_err}"
    );
    let after_logits = logits(&mut e, &text);
    assert!(max_abs_diff(&after_logits, &before_logits) > 1e-4);

    // the same fit in a fresh engine: the same maps, bit for bit
    let mut f = engine(&path, 2, false);
    f.set_spd(&mask).unwrap();
    let (w2, rep2) = recover_layer(&mut f, &seqs, l, None, Some(&cc), 1).unwrap();
    assert_eq!(w2, w);
    assert_eq!(rep2.comp.unwrap().residual, c.residual);
    assert_eq!(bits(&logits(&mut f, &text)), bits(&after_logits));
    std::fs::remove_dir_all(dir).ok();
}

/// `recover_layer` with LC and B2B on the CPU: both parts reported, B2B's hold-out used for
/// LC (none here: LC's residual is on the fitted sequences), B2B's steps counted, the trained
/// block keeps the LC maps (the same ones LC alone fits) and trains the rest; the student
/// B2B started from is the compensated SPD block, so its loss before training is the
/// engine's LC block error.
#[test]
fn recover_layer_with_lc_and_b2b_reports_both_and_trains_on_the_cpu() {
    let (dir, path) = tiny_model("lc-b2b", 35);
    let l = 0;
    let seqs = calib(6, 12, 700);
    let mut mask = [false; LAYERS];
    mask[l] = true;
    let cc = CompConfig {
        rank: 4,
        ridge: 1e-2,
        holdout: 0,
    };
    let dcfg = DistillConfig {
        epochs: 2,
        lr: 1e-3,
        threads: 1,
        ..Default::default()
    };
    // LC alone first, for its maps and its block error
    let mut lc = engine(&path, 2, false);
    lc.set_spd(&mask).unwrap();
    let (w_lc, rep_lc) = recover_layer(&mut lc, &seqs, l, None, Some(&cc), 1).unwrap();
    let lc_err = block_error(&mut lc, &seqs, l);

    let mut e = engine(&path, 2, false);
    e.set_spd(&mask).unwrap();
    let before = logits(&mut e, &seqs[0]);
    let (w, rep) = recover_layer(&mut e, &seqs, l, Some(&dcfg), Some(&cc), 1).unwrap();
    let (c, b) = (rep.comp.as_ref().unwrap(), rep.b2b.as_ref().unwrap());
    eprintln!("LC+B2B: {c:?} {b:?}");
    assert!(!c.heldout && c.residual > 0.0 && c.residual < 1.0, "{c:?}");
    assert_eq!(c.residual, rep_lc.comp.as_ref().unwrap().residual);
    assert_eq!(c.tokens, seqs.len() * 12);
    assert_eq!(b.steps, dcfg.epochs * seqs.len(), "{b:?}");
    assert!(b.device.starts_with("cpu"), "{b:?}");
    assert!(b.mse_after <= b.mse_before, "{b:?}");
    let rel = (b.mse_before - lc_err).abs() / lc_err;
    assert!(
        rel < 1e-3,
        "B2B started from mse {} but the engine's LC block is at {lc_err}",
        b.mse_before
    );
    for (got, lc_w) in w.iter().zip(&w_lc) {
        assert_eq!(got.comp, lc_w.comp, "B2B changed or lost the LC maps");
    }
    assert!(!b.kept_original, "{b:?}");
    assert!(w.iter().zip(&w_lc).all(|(a, b)| a.w_down != b.w_down));
    assert!(max_abs_diff(&logits(&mut e, &seqs[0]), &before) > 1e-5);

    // with a B2B hold-out, LC holds out the same sequences (and CompConfig's is unused)
    let held = DistillConfig {
        holdout: 2,
        patience: 1,
        ..dcfg.clone()
    };
    let mut g = engine(&path, 2, false);
    g.set_spd(&mask).unwrap();
    let (_, rep) = recover_layer(&mut g, &seqs, l, Some(&held), Some(&cc), 1).unwrap();
    let (c, b) = (rep.comp.unwrap(), rep.b2b.unwrap());
    assert!(c.heldout && c.tokens == (seqs.len() - 2) * 12, "{c:?}");
    assert_eq!(b.heldout.as_ref().map(|h| h.samples), Some(2), "{b:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// The SmolLM2 GGUF (panics with how to fetch it when absent, like tests/smollm2.rs).
fn smollm2() -> Arc<ModelFiles> {
    let path = syncdrop::assets::smollm2().unwrap_or_else(|e| panic!("{e}"));
    Arc::new(ModelFiles::open(path).unwrap())
}

/// On the real model at TP 2, LC fitted on BoolQ passages predicts a good share of the
/// missing partials on passages it was not fitted on, and brings the SPD block's output
/// closer to the TP block's there.
#[test]
fn lc_on_smollm2_predicts_held_out_partials_and_shrinks_the_block_error() {
    let f = smollm2();
    let tok = match &*f {
        ModelFiles::Gguf(g) => syncdrop::tokenizer::Tokenizer::from_gguf(g).unwrap(),
        _ => unreachable!(),
    };
    let dir = syncdrop::assets::eval_dir().unwrap_or_else(|e| panic!("{e}"));
    let passages = syncdrop::tasks::boolq_passages(&dir, 16).unwrap();
    let seqs: Vec<Vec<u32>> = passages
        .iter()
        .map(|p| {
            let mut ids = tok.encode(p).unwrap();
            ids.truncate(96);
            ids
        })
        .collect();
    assert_eq!(seqs.len(), 16);
    let held = &seqs[12..];
    let mut e = Engine::new(
        f.clone(),
        &EngineOptions {
            tp: 2,
            threads: 2,
            capacity: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let l = 10;
    let mut mask = vec![false; e.cfg.n_layers];
    mask[l] = true;
    e.set_spd(&mask).unwrap();
    let before = block_error(&mut e, held, l);
    let cc = CompConfig {
        holdout: held.len(),
        ..Default::default()
    };
    let (_, rep) = recover_layer(&mut e, &seqs, l, None, Some(&cc), 2).unwrap();
    let c = rep.comp.unwrap();
    let after = block_error(&mut e, held, l);
    eprintln!("SmolLM2 block {l}: {c:?}; SPD block mse vs TP {before:.4e} -> {after:.4e}");
    assert!(c.heldout && c.residual > 0.0, "{c:?}");
    assert!(
        c.residual < 0.95,
        "LC left {} of the held-out partials",
        c.residual
    );
    assert!(
        after < 0.95 * before,
        "LC did not shrink the block error: {before} -> {after}"
    );
}

/// Tensors as (name, shape, f32 bytes).
type Tensors = Vec<(String, Vec<usize>, Vec<u8>)>;

/// Every tensor of a safetensors file, for editing.
fn read_tensors(p: &Path) -> Tensors {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `save_distilled` / `load_distilled` keep the maps exactly (the file's bytes are the
/// maps', the reloaded engine gives the same bits) and report which blocks have them; a file
/// with half a map, a map of the wrong shape, or a map on some ranks of a block only is
/// refused.
#[test]
fn distilled_files_keep_compensation_exactly_and_refuse_bad_maps() {
    let (dir, path) = tiny_model("lc-file", 36);
    let toks = prompt(10, 4);
    let mask = [true, false, true];
    let mut e = engine(&path, 2, false);
    e.set_spd(&mask).unwrap();
    let w0 = compensated(&e, 0, 3, 80, 0.5);
    let w2 = originals(&e, 2);
    e.load_layer(0, w0.clone()).unwrap();
    let want = logits(&mut e, &toks);
    let p = dir.join("w.safetensors");
    save_distilled(&p, &[(0, w0.clone()), (2, w2.clone())]).unwrap();
    let tensors = read_tensors(&p);
    let d = e.cfg.hidden;
    for (r, w) in w0.iter().enumerate() {
        let c = w.comp.as_ref().unwrap();
        let get = |n: &str| tensors.iter().find(|t| t.0 == n).cloned().unwrap();
        let tin = get(&format!("blk.0.rank{r}.comp_in"));
        let tout = get(&format!("blk.0.rank{r}.comp_out"));
        assert_eq!((tin.1, tin.2), (vec![3, d], f32_bytes(&c.w_in)));
        assert_eq!((tout.1, tout.2), (vec![d, 3], f32_bytes(&c.w_out)));
    }
    assert!(!tensors
        .iter()
        .any(|t| t.0.starts_with("blk.2.") && t.0.contains("comp")));

    let mut f = engine(&path, 2, false);
    f.set_spd(&mask).unwrap();
    assert_eq!(load_distilled(&p, &mut f, &[0, 2]).unwrap(), vec![0]);
    assert_eq!(bits(&logits(&mut f, &toks)), bits(&want));
    assert_eq!(
        load_distilled(&p, &mut f, &[2]).unwrap(),
        Vec::<usize>::new()
    );

    // edited copies of the file, each refused
    let edit = |name: &str, change: &dyn Fn(&mut Tensors)| {
        let mut t = tensors.clone();
        change(&mut t);
        let q = dir.join(format!("{name}.safetensors"));
        write_safetensors(&q, &t);
        q
    };
    let drop = |key: &'static str| move |t: &mut Tensors| t.retain(|x| x.0 != key);
    let reshape = |key: &'static str, shape: Vec<usize>| {
        move |t: &mut Tensors| {
            for x in t.iter_mut().filter(|x| x.0 == key) {
                let n: usize = shape.iter().product();
                x.1 = shape.clone();
                x.2.resize(4 * n, 0);
            }
        }
    };
    let cases: Vec<(&str, PathBuf)> = vec![
        ("in_only", edit("in_only", &drop("blk.0.rank1.comp_out"))),
        ("out_only", edit("out_only", &drop("blk.0.rank0.comp_in"))),
        (
            "one_rank",
            edit("one_rank", &|t| {
                t.retain(|x| !x.0.starts_with("blk.0.rank1.comp"))
            }),
        ),
        (
            "in_short",
            edit("in_short", &reshape("blk.0.rank0.comp_in", vec![3, d - 1])),
        ),
        (
            "in_flat",
            edit("in_flat", &reshape("blk.0.rank0.comp_in", vec![3 * d])),
        ),
        (
            "in_transposed",
            edit("in_transposed", &reshape("blk.0.rank0.comp_in", vec![d, 3])),
        ),
        (
            "in_rank0",
            edit("in_rank0", &reshape("blk.0.rank0.comp_in", vec![0, d])),
        ),
        (
            "out_rank2",
            edit("out_rank2", &reshape("blk.0.rank1.comp_out", vec![d, 2])),
        ),
    ];
    for (what, q) in cases {
        let mut g = engine(&path, 2, false);
        g.set_spd(&mask).unwrap();
        let err = match load_distilled(&q, &mut g, &[0]) {
            Ok(_) => panic!("{what}: a bad map was loaded"),
            Err(e) => e.to_string(),
        };
        eprintln!("{what}: {err}");
        assert!(err.contains("comp"), "{what}: {err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A plan's `compensated` flags must agree with its distilled file: a compensated block the
/// file has no map for, or a B2B block the file has a map for that the plan does not name,
/// is refused; `validate` refuses `compensated` on a standard block (before anything is
/// switched). A plan that agrees loads and runs exactly the model it was made on.
#[test]
fn plans_whose_compensated_flags_disagree_with_their_weights_are_refused() {
    let (dir, path) = tiny_model("lc-plan", 37);
    let toks = prompt(10, 5);
    let mask = [true, false, true];
    let mut e = engine(&path, 2, false);
    let sha = model_sha256(&e.files).unwrap();
    e.set_spd(&mask).unwrap();
    let cc = SMALL_LC;
    let (w0, _) = recover_layer(&mut e, &calib(8, 12, 300), 0, None, Some(&cc), 1).unwrap();
    let want = logits(&mut e, &toks);
    let weights = dir.join("plan.safetensors");
    save_distilled(&weights, &[(0, w0), (2, originals(&e, 2))]).unwrap();
    let mut plan = SpdPlan::new(&e, sha.clone(), &mask, Recovery::ZeroShot);
    plan.layers[0].compensated = true;
    plan.set_distilled(&weights).unwrap();
    assert_eq!(plan.distilled_layers(), vec![0]);
    let p = dir.join("plan.json");
    plan.save(&p).unwrap();

    // it agrees: loads, and the fresh engine runs the compensated model
    let mut f = engine(&path, 2, false);
    let loaded = SpdPlan::load_into(&p, &mut f, &sha).unwrap();
    assert_eq!(loaded, plan);
    assert!(loaded.layers[0].compensated);
    assert_eq!(bits(&logits(&mut f, &toks)), bits(&want));

    let refused = |q: &SpdPlan, want: &str| {
        q.save(&p).unwrap();
        let mut g = engine(&path, 2, false);
        let err = SpdPlan::load_into(&p, &mut g, &sha)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
        // refused before anything was switched: no SPD block, no map loaded
        assert_eq!(g.spd(), &[false; LAYERS], "switched before the error");
        g
    };
    // the plan says block 2 is compensated; the file has no map for it
    let mut more = plan.clone();
    more.layers[2].compensated = true;
    assert_eq!(more.distilled_layers(), vec![0, 2]);
    refused(&more, "linear compensation");
    // the plan says block 0 is B2B without compensation; the file has a map for it
    let mut less = plan.clone();
    less.layers[0].compensated = false;
    less.layers[0].recovery = Some(Recovery::B2b);
    refused(&less, "linear compensation");
    // compensation on a standard block: refused by validate, before anything is switched
    let mut tp_block = plan.clone();
    tp_block.layers[1].compensated = true;
    let err = tp_block.validate(&f, &sha).unwrap_err().to_string();
    assert!(
        err.contains("block 1") && err.contains("not an SPD block"),
        "{err}"
    );
    let g = refused(&tp_block, "not an SPD block");
    assert_eq!(g.spd(), &[false; LAYERS], "switched before the error");
    // and the flag survives the file: a plan that never had it reads as uncompensated
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"compensated\": true"), "{text}");
    let mut plain = plan.clone();
    plain.layers[0].compensated = false;
    plain.save(&p).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(!text.contains("compensated"), "{text}");
    assert!(!SpdPlan::load(&p).unwrap().layers[0].compensated);
    std::fs::remove_dir_all(dir).ok();
}

/// A block that keeps the model's weights is saved as its maps alone (`save_recovered`):
/// the file holds no block tensors for it, and loading it gives the model's weights plus the
/// maps, so the logits equal the engine it was saved from; a block in `original` without
/// maps is refused (nothing would be saved for it).
#[test]
fn compensation_alone_is_saved_without_the_blocks_weights() {
    let (dir, path) = tiny_model("lc-alone", 41);
    let toks = prompt(10, 6);
    let mask = [true, false, true];
    let mut e = engine(&path, 2, false);
    e.set_spd(&mask).unwrap();
    let w0 = compensated(&e, 0, 3, 90, 0.5);
    let w2 = compensated(&e, 2, 2, 91, 0.5);
    e.load_layer(0, w0.clone()).unwrap();
    e.load_layer(2, w2.clone()).unwrap();
    let want = logits(&mut e, &toks);
    let full = dir.join("full.safetensors");
    let slim = dir.join("slim.safetensors");
    save_distilled(&full, &[(0, w0.clone()), (2, w2.clone())]).unwrap();
    save_recovered(&slim, &[(0, w0.clone()), (2, w2.clone())], &[2]).unwrap();
    let names: Vec<String> = read_tensors(&slim).into_iter().map(|t| t.0).collect();
    assert!(names.iter().any(|n| n == "blk.0.rank1.wo"), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("blk.2.") && !n.contains("comp")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "blk.2.rank0.comp_in"),
        "{names:?}"
    );
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&slim) < size(&full),
        "{} >= {}",
        size(&slim),
        size(&full)
    );
    let mut f = engine(&path, 2, false);
    f.set_spd(&mask).unwrap();
    assert_eq!(load_distilled(&slim, &mut f, &[0, 2]).unwrap(), vec![0, 2]);
    assert_eq!(bits(&logits(&mut f, &toks)), bits(&want));
    let err = save_recovered(&slim, &[(2, originals(&e, 2))], &[2])
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear compensation"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// A compensation for the tiny model's tests: rank 4, the default ridge, 2 of the calibration
/// sequences held out.
const SMALL_LC: CompConfig = CompConfig {
    rank: 4,
    ridge: 1e-2,
    holdout: 2,
};

/// A fresh engine at TP 2 with `mask`'s blocks SPD and `lc`'s maps loaded in every block:
/// what a planner engine with that plan must be.
fn fresh_with_maps(path: &Path, lc: &BlockCompensation, mask: &[bool]) -> Engine {
    let mut f = engine(path, 2, false);
    f.set_spd(mask).unwrap();
    for (l, maps) in lc.maps.iter().enumerate() {
        load_compensated(&mut f, l, maps).unwrap();
    }
    f
}

/// `compensate_blocks` fits every block on the TP model's inputs and leaves the engine's
/// outputs alone (maps act in SPD blocks only); the planner with `Search::compensation`
/// scores SPD + LC, not zero-shot SPD: with room for every block it ends with the
/// compensated model (bit for bit a fresh engine with the maps), reports every block
/// compensated with the up-front fit's reports, returns every block with its original
/// weights and its maps, and the plan file it writes (maps only: `save_recovered`) loads into
/// a fresh engine that gives the same logits. Maps for another TP degree are refused before
/// any evaluation, and so are settings that cannot fit.
#[test]
fn the_planner_searches_saves_and_reloads_spd_with_compensation() {
    let (dir, path) = tiny_model("lc-plan", 43);
    let toks = prompt(12, 5);
    let seqs = calib(10, 12, 500);
    let cc = SMALL_LC;
    let mut e = engine(&path, 2, false);
    let base = logits(&mut e, &toks);
    e.set_spd(&[true; LAYERS]).unwrap();
    let zero_shot = logits(&mut e, &toks);
    // bad settings: refused before capturing anything
    for (bad, want) in [
        (CompConfig { rank: 0, ..cc }, "rank 0"),
        (CompConfig { rank: 33, ..cc }, "hidden size 32"),
        (CompConfig { holdout: 10, ..cc }, "none would be left"),
        (
            CompConfig {
                ridge: f64::NAN,
                ..cc
            },
            "ridge",
        ),
    ] {
        let err = compensate_blocks(&mut e, &seqs, &bad, 1, false, |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let mut logged = Vec::new();
    let lc = compensate_blocks(&mut e, &seqs, &cc, 1, false, |l, r| {
        logged.push((l, r.residual))
    })
    .unwrap();
    assert_eq!(logged.len(), LAYERS);
    assert_eq!(lc.maps.len(), LAYERS);
    assert_eq!(lc.config, cc);
    for (maps, rep) in lc.maps.iter().zip(&lc.reports) {
        assert_eq!(maps.len(), 2);
        maps.iter().for_each(|m| m.check(e.cfg.hidden).unwrap());
        assert!(
            rep.heldout && rep.residual.is_finite() && rep.tokens == 8 * 12,
            "{rep:?}"
        );
    }
    // it left every block standard, and the maps change nothing there
    assert_eq!(e.spd(), &[false; LAYERS]);
    assert_eq!(bits(&logits(&mut e, &toks)), bits(&base));
    // inputs captured several blocks per pass: the maps a block-by-block fit gives
    let mut one = engine(&path, 2, false);
    for l in 0..LAYERS {
        let (w, _) = recover_layer(&mut one, &seqs, l, None, Some(&cc), 1).unwrap();
        let per_block: Vec<&Compensation> = w.iter().map(|w| w.comp.as_ref().unwrap()).collect();
        assert_eq!(
            per_block,
            lc.maps[l].iter().collect::<Vec<_>>(),
            "block {l}"
        );
    }

    let sens = syncdrop::spd::sensitivity(&mut e, &seqs, 12, false).unwrap();
    let mut metric = PplMetric {
        splits: [seqs[..5].to_vec(), seqs[5..].to_vec()],
        window: 12,
    };
    let search = Search {
        compensation: Some(&lc),
        ..Search::default()
    };
    let budget = Budget::PplIncrease(f64::INFINITY);
    let (o, blocks) = plan(
        &mut e,
        &sens,
        budget,
        search,
        &mut metric,
        &seqs,
        None,
        |m| eprintln!("{m}"),
    )
    .unwrap();
    assert_eq!(o.spd, vec![true; LAYERS]);
    assert_eq!(o.compensated, vec![true; LAYERS]);
    assert_eq!(o.zero_shot_blocks, LAYERS);
    assert_eq!(o.b2b_blocks + o.hg_b2b_blocks, 0);
    let reported: Vec<usize> = o.compensation.iter().map(|c| c.0).collect();
    assert_eq!(reported, vec![0, 1, 2]);
    for (l, r) in &o.compensation {
        assert_eq!(r.residual, lc.reports[*l].residual);
    }
    assert_eq!(
        blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (l, w) in &blocks {
        for ((got, want), map) in w.iter().zip(originals(&e, *l)).zip(&lc.maps[*l]) {
            assert_eq!(got.comp.as_ref(), Some(map));
            let mut plain = got.clone();
            plain.comp = None;
            assert_eq!(plain, want, "block {l}: LC alone changed the weights");
        }
    }
    let planned = logits(&mut e, &toks);
    assert_eq!(
        bits(&planned),
        bits(&logits(
            &mut fresh_with_maps(&path, &lc, &[true; LAYERS]),
            &toks
        ))
    );
    assert!(
        max_abs_diff(&planned, &zero_shot) > 1e-4,
        "the planner scored zero-shot SPD, not SPD + LC"
    );

    // the plan file: compensated flags, maps only, and a fresh engine gives the same logits
    let sha = model_sha256(&e.files).unwrap();
    let mut p = syncdrop::planner::plan_file(&e, sha.clone(), &sens, &o, budget);
    assert!(p.layers.iter().all(|l| l.compensated));
    let weights = dir.join("plan.safetensors");
    save_recovered(&weights, &blocks, &[0, 1, 2]).unwrap();
    p.set_distilled(&weights).unwrap();
    let pp = dir.join("plan.json");
    p.save(&pp).unwrap();
    let mut f = engine(&path, 2, false);
    SpdPlan::load_into(&pp, &mut f, &sha).unwrap();
    assert_eq!(bits(&logits(&mut f, &toks)), bits(&planned));

    // maps for TP 3 on a TP 2 engine: refused before any evaluation
    let mut g = engine(&path, 3, false);
    let lc3 = compensate_blocks(&mut g, &seqs, &cc, 1, false, |_, _| {}).unwrap();
    let mut evaluations = 0;
    let mut counting = |_: &mut Engine, _: usize| -> syncdrop::Result<f64> {
        evaluations += 1;
        Ok(1.0)
    };
    let search3 = Search {
        compensation: Some(&lc3),
        ..Search::default()
    };
    let mut h = engine(&path, 2, false);
    let err = plan(
        &mut h,
        &sens,
        budget,
        search3,
        &mut counting,
        &seqs,
        None,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("at TP 2"), "{err}");
    assert_eq!(evaluations, 0);
    std::fs::remove_dir_all(dir).ok();
}

/// With B2B and `distill_zero_shot`, the planner distils the SPD + LC blocks (refitting
/// their maps) and keeps that only when it lowers the loss. Blocks 0 and 1 are the zero-shot
/// class here (a sensitivity that orders 0, 1, 2 and a scripted metric). When the metric
/// says distilling them did not help, the next search step (B2B of block 2) must already
/// see them back at their original weights *with their up-front maps*: the input of block 2
/// is, bit for bit, that of a fresh engine with them. When it says it helped, they keep the
/// distilled weights, each with a B2B report and a map refitted on the plan's inputs (block
/// 0's inputs are the embeddings either way, so its map does not change).
#[test]
fn the_planner_restores_the_maps_of_blocks_whose_distillation_it_drops() {
    let (dir, path) = tiny_model("lc-plan-b2b", 44);
    let toks = prompt(12, 6);
    let seqs = calib(8, 12, 600);
    let cc = SMALL_LC;
    let dcfg = DistillConfig {
        epochs: 2,
        holdout: 2,
        threads: 1,
        ..DistillConfig::default()
    };
    let sens = syncdrop::spd::Sensitivity {
        base_ppl: 10.0,
        ppl_from: vec![10.6, 10.5, 10.3],
        sensitivity: vec![0.1, 0.2, 0.3],
        tp: Some(2),
        passages: Some(8),
        compensation_rank: Some(4),
    };
    let two = [true, true, false];
    for b2b_helps in [false, true] {
        let mut e = engine(&path, 2, false);
        let lc = compensate_blocks(&mut e, &seqs, &cc, 1, false, |_, _| {}).unwrap();
        // base (search, held out); 2 blocks fit, 3 do not; the distilled zero-shot class;
        // B2B of block 2 (over budget), HG+B2B of block 2 (over); the held-out plan
        let after = if b2b_helps { 10.5 } else { 20.0 };
        let script = [10.0, 10.0, 11.0, 12.0, after, 12.0, 12.0, 11.0];
        let mut calls = 0;
        let mut seen_by_b2b = None;
        let mut scripted = |e: &mut Engine, _: usize| -> syncdrop::Result<f64> {
            if calls == 5 {
                seen_by_b2b = Some(e.block_input(&toks, 2)?);
            }
            calls += 1;
            Ok(*script
                .get(calls - 1)
                .expect("more evaluations than scripted"))
        };
        let search = Search {
            distill_zero_shot: true,
            compensation: Some(&lc),
            ..Search::default()
        };
        let budget = Budget::PplIncrease(0.15);
        let (o, blocks) = plan(
            &mut e,
            &sens,
            budget,
            search,
            &mut scripted,
            &seqs,
            Some(&dcfg),
            |m| eprintln!("{m}"),
        )
        .unwrap();
        assert_eq!(calls, script.len());
        assert_eq!(o.spd, two);
        assert_eq!(o.compensated, two);
        assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0, 1]);
        let want_input = fresh_with_maps(&path, &lc, &two)
            .block_input(&toks, 2)
            .unwrap();
        let seen = seen_by_b2b.expect("the B2B step of block 2 was scored");
        if b2b_helps {
            assert_eq!(o.b2b_blocks, 2);
            assert_eq!(o.distillation.len(), 2);
            for (l, w) in &blocks {
                let c = w[0].comp.as_ref().expect("a distilled block keeps a map");
                if *l == 0 {
                    assert_eq!(c, &lc.maps[0][0]);
                } else {
                    assert_ne!(c, &lc.maps[*l][0], "block {l}: its map was not refitted");
                }
            }
            assert!(max_abs_diff(&seen, &want_input) > 1e-6);
        } else {
            assert_eq!(o.zero_shot_blocks, 2);
            assert!(o.distillation.is_empty());
            assert_eq!(
                bits(&seen),
                bits(&want_input),
                "a dropped distillation left its weights or lost the up-front maps"
            );
            let mut f = fresh_with_maps(&path, &lc, &two);
            assert_eq!(bits(&logits(&mut e, &toks)), bits(&logits(&mut f, &toks)));
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `Engine::block_inputs` captures several blocks' inputs in one pass: the same bits as one
/// `block_input` per block, under an SPD plan with compensation; bad layer lists are refused.
#[test]
fn block_inputs_in_one_pass_equal_one_pass_per_block() {
    let (dir, path) = tiny_model("lc-capture", 45);
    let toks = prompt(9, 8);
    let mut e = engine(&path, 3, false);
    e.set_spd(&[true, false, true]).unwrap();
    let w0 = compensated(&e, 0, 3, 92, 0.5);
    e.load_layer(0, w0).unwrap();
    let all = e.block_inputs(&toks, &[0, 1, 2]).unwrap();
    assert_eq!(all.len(), 3);
    for (l, x) in all.iter().enumerate() {
        assert_eq!(
            bits(x),
            bits(&e.block_input(&toks, l).unwrap()),
            "block {l}"
        );
    }
    assert_eq!(
        bits(&e.block_inputs(&toks, &[2]).unwrap()[0]),
        bits(&all[2])
    );
    assert!(max_abs_diff(&all[1], &all[2]) > 0.0);
    for bad in [&[][..], &[1, 1], &[2, 1], &[0, 3]] {
        let err = e.block_inputs(&toks, bad).unwrap_err().to_string();
        assert!(err.contains("increasing order"), "{bad:?}: {err}");
    }
    assert!(e.block_inputs(&[], &[0]).is_err());
    std::fs::remove_dir_all(dir).ok();
}
