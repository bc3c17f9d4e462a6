//! Block-to-block distillation: hand-written gradients against finite differences, the host
//! student/teacher against the engine's SPD / standard blocks, and training that lowers the loss.

mod common;

use common::*;
use std::sync::Arc;
use syncdrop::distill::*;
use syncdrop::model::load_block;
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, ModelFiles};

fn setup(tp: usize, tag: &str) -> (Engine, std::path::PathBuf) {
    let dir = tmpdir(tag);
    let t = Tiny {
        qkv_bias: true,
        ..Tiny::small()
    };
    write_gguf(&dir.join("m.gguf"), &t, 11, GgmlType::F32, "llama");
    let files = Arc::new(ModelFiles::open(dir.join("m.gguf")).unwrap());
    let e = Engine::new(
        files,
        &EngineOptions {
            tp,
            threads: 1,
            capacity: 64,
            ..Default::default()
        },
    )
    .unwrap();
    (e, dir)
}

fn sample(
    e: &mut Engine,
    tokens: &[u32],
    layer: usize,
) -> (Sample, Vec<syncdrop::backend::BlockWeights>) {
    let cfg = e.cfg.clone();
    let weights: Vec<_> = e
        .layout
        .ranks
        .iter()
        .map(|s| load_block(&e.files, &cfg, s, layer).unwrap())
        .collect();
    let x = e.block_input(tokens, layer).unwrap();
    let att: Vec<Vec<f32>> = e
        .layout
        .ranks
        .iter()
        .zip(&weights)
        .map(|(s, w)| attention_output(&cfg, s, w, &x))
        .collect();
    let target = teacher_output(&weights, &att, &x, cfg.hidden, cfg.rms_eps, 1);
    (
        Sample {
            x,
            att,
            target,
            x_local: None,
        },
        weights,
    )
}

#[test]
fn host_student_and_teacher_match_the_engine_blocks() {
    let (mut e, dir) = setup(2, "dmatch");
    let toks = [3u32, 9, 27, 17, 51, 4];
    let (s, weights) = sample(&mut e, &toks, 0);
    // teacher == the engine's standard block 0 (its output is block 1's input)
    let std_out = e.block_input(&toks, 1).unwrap();
    assert!(max_abs_diff(&s.target, &std_out) < 1e-4, "teacher");
    // student at init == the engine's SPD block 0
    e.set_spd(&[true, false]).unwrap();
    let spd_out = e.block_input(&toks, 1).unwrap();
    let init: Vec<_> = weights.iter().map(StudentParams::from_block).collect();
    let student = student_output(&init, &s, e.cfg.hidden, e.cfg.rms_eps, 1);
    assert!(max_abs_diff(&student, &spd_out) < 1e-4, "student");
    assert!(
        max_abs_diff(&spd_out, &std_out) > 1e-3,
        "SPD made no difference"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn gradients_match_finite_differences() {
    let (mut e, dir) = setup(2, "dgrad");
    let (mut s, weights) = sample(&mut e, &[1, 2, 3, 4, 5], 1);
    let (d, eps) = (e.cfg.hidden, e.cfg.rms_eps);
    // perturb the target so the loss is not at a minimum
    s.target
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v += 0.3 * ((i % 7) as f32 - 3.0));
    let params: Vec<StudentParams> = weights.iter().map(StudentParams::from_block).collect();
    let (_, grads) = loss_and_grads(&params, &s, d, eps, 1);
    let h = 1e-2f32;
    let mut checked = 0;
    for r in 0..params.len() {
        for which in 0..4 {
            for idx in [0usize, 5, 17] {
                let get = |p: &StudentParams| -> Vec<f32> {
                    [&p.wo, &p.ffn_norm, &p.w_gate_up, &p.w_down][which].clone()
                };
                if idx >= get(&params[r]).len() {
                    continue;
                }
                let mut plus = params.clone();
                let mut minus = params.clone();
                for (p, sign) in [(&mut plus, 1.0f32), (&mut minus, -1.0)] {
                    let t = match which {
                        0 => &mut p[r].wo,
                        1 => &mut p[r].ffn_norm,
                        2 => &mut p[r].w_gate_up,
                        _ => &mut p[r].w_down,
                    };
                    t[idx] += sign * h;
                }
                let fd = (loss_and_grads(&plus, &s, d, eps, 1).0
                    - loss_and_grads(&minus, &s, d, eps, 1).0)
                    / (2.0 * h as f64);
                let an = get(&grads[r])[idx] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 + 0.05 * an.abs().max(fd.abs()),
                    "rank {r} tensor {which} idx {idx}: finite difference {fd} vs analytic {an}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn distillation_lowers_the_block_loss_and_round_trips_through_a_file() {
    let (mut e, dir) = setup(2, "dtrain");
    let calib: Vec<Vec<u32>> = (0..4)
        .map(|s| (0..12).map(|i| (i * 7 + s * 13) % 64).collect())
        .collect();
    let cfg = DistillConfig {
        epochs: 30,
        lr: 3e-3,
        threads: 1,
        ..Default::default()
    };
    e.set_spd(&[true, false]).unwrap();
    let before = e.block_input(&calib[0], 1).unwrap();
    let (blocks, report) = distill_layer(&mut e, &calib, 0, &cfg).unwrap();
    assert!(report.mse_after < 0.5 * report.mse_before, "{report:?}");
    let after = e.block_input(&calib[0], 1).unwrap();
    assert!(
        max_abs_diff(&before, &after) > 1e-4,
        "engine did not take the distilled weights"
    );
    // save, reload into a fresh engine: same outputs
    let path = dir.join("distilled.safetensors");
    save_distilled(&path, &[(0, blocks)]).unwrap();
    // saved like any file this process writes (safetensors' temporary file was 0600)
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }
    let (mut e2, dir2) = setup(2, "dtrain2");
    e2.set_spd(&[true, false]).unwrap();
    load_distilled(&path, &mut e2, &[0]).unwrap();
    assert_eq!(e2.block_input(&calib[0], 1).unwrap(), after);
    assert!(
        load_distilled(&path, &mut e2, &[1]).is_err(),
        "layer 1 was never distilled"
    );
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

/// Bad settings are refused before any work, and a run that makes the block worse (a
/// learning rate far too large) returns the original weights, so the engine is unchanged.
#[test]
fn distillation_refuses_bad_settings_and_never_leaves_a_block_worse() {
    let (mut e, dir) = setup(2, "dbad");
    let calib: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..10).map(|i| (i * 5 + s * 11) % 64).collect())
        .collect();
    e.set_spd(&[true, false]).unwrap();
    for (epochs, lr) in [(0, 1e-3), (5, 0.0), (5, -1.0), (5, f32::NAN)] {
        let cfg = DistillConfig {
            epochs,
            lr,
            threads: 1,
            ..Default::default()
        };
        let err = distill_layer(&mut e, &calib, 0, &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch") || err.contains("learning rate"),
            "{err}"
        );
    }
    let before = e.block_input(&calib[0], 1).unwrap();
    let cfg = DistillConfig {
        epochs: 3,
        lr: 10.0,
        threads: 1,
        ..Default::default()
    };
    let (_, report) = distill_layer(&mut e, &calib, 0, &cfg).unwrap();
    assert!(report.kept_original, "{report:?}");
    assert!(report.mse_trained > report.mse_before, "{report:?}");
    assert_eq!(report.mse_after, report.mse_before);
    assert!(report.note().contains("kept the original weights"));
    assert_eq!(
        e.block_input(&calib[0], 1).unwrap(),
        before,
        "the engine still has the original block"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Distillation on a GPU where none can be used (no `cuda` feature, no driver, no device)
/// fails with an error that names CUDA, before any training; where one can, it trains.
#[test]
fn distillation_on_a_gpu_needs_one() {
    let (mut e, dir) = setup(2, "dgpu");
    let calib: Vec<Vec<u32>> = (0..2)
        .map(|s| (0..10).map(|i| (i * 3 + s * 17) % 64).collect())
        .collect();
    e.set_spd(&[true, false]).unwrap();
    let cfg = DistillConfig {
        epochs: 2,
        lr: 1e-3,
        threads: 1,
        device: DistillDevice::Cuda(0),
        ..Default::default()
    };
    let before = e.block_input(&calib[0], 1).unwrap();
    let got = distill_layer(&mut e, &calib, 0, &cfg);
    match syncdrop::backend::cuda::probe() {
        Err(_) => {
            let err = got.unwrap_err().to_string();
            assert!(err.to_lowercase().contains("cuda"), "{err}");
            assert_eq!(
                e.block_input(&calib[0], 1).unwrap(),
                before,
                "a failed distillation leaves the engine alone"
            );
        }
        Ok(()) => {
            let (_, report) = got.unwrap();
            assert!(report.mse_after <= report.mse_before, "{report:?}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// With a held-out set, distillation trains on the other samples only, measures the
/// held-out loss after every epoch, returns the parameters of the best epoch (exactly those
/// the same training reaches after that many epochs) and stops once `patience` epochs bring
/// no new best. A held-out loss that never improves keeps the original weights.
#[test]
fn early_stopping_returns_the_best_heldout_epoch() {
    let (mut e, dir) = setup(2, "dhold");
    e.set_spd(&[true, false]).unwrap();
    let (d, eps) = (e.cfg.hidden, e.cfg.rms_eps);
    let mut data = Vec::new();
    let mut init = Vec::new();
    for s in 0..5u32 {
        let toks: Vec<u32> = (0..10).map(|i| (i * 7 + s * 13) % 64).collect();
        let (sample, weights) = sample(&mut e, &toks, 0);
        data.push(sample);
        init = weights.iter().map(StudentParams::from_block).collect();
    }
    let cfg = DistillConfig {
        epochs: 60,
        lr: 1e-3,
        threads: 1,
        holdout: 1,
        patience: 3,
        ..Default::default()
    };
    let (got, rep) = distill(init.clone(), &data, d, eps, &cfg).unwrap();
    let h = rep.heldout.clone().expect("a held-out curve");
    assert_eq!(h.samples, 1);
    assert_eq!(
        rep.steps,
        4 * h.epochs.len(),
        "one step per training sample"
    );
    // the best epoch is the curve's minimum, and training stopped `patience` epochs later
    let (argmin, min) =
        h.epochs.iter().enumerate().fold(
            (0, h.before),
            |(a, m), (i, &v)| if v < m { (i + 1, v) } else { (a, m) },
        );
    assert_eq!((h.best_epoch, h.best()), (argmin, min), "{h:?}");
    assert!(
        h.best_epoch >= 1 && h.epochs.len() == h.best_epoch + cfg.patience,
        "this problem overfits: it should improve, then stop early: {h:?}"
    );
    // what was returned scores as reported, on both sets
    let mut check = CpuTrainer::new(got.clone(), &data, d, eps, 1);
    assert_eq!(check.mean_loss(4..5).unwrap(), h.best());
    assert_eq!(check.mean_loss(0..4).unwrap(), rep.mse_after);
    assert!(
        rep.mse_after < rep.mse_before && !rep.kept_original,
        "{rep:?}"
    );
    assert!(rep.note().contains("held-out"), "{}", rep.note());
    // the best epoch's parameters are plain training's after that many epochs on the
    // training samples: the held-out sample was never trained on
    let plain = DistillConfig {
        epochs: h.best_epoch,
        holdout: 0,
        ..cfg.clone()
    };
    let (want, _) = distill(init.clone(), &data[..4], d, eps, &plain).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.wo, w.wo);
        assert_eq!(g.ffn_norm, w.ffn_norm);
        assert_eq!(g.w_gate_up, w.w_gate_up);
        assert_eq!(g.w_down, w.w_down);
    }
    // a learning rate far too large: no epoch beats the original weights on held-out data
    let wild = DistillConfig {
        lr: 10.0,
        ..cfg.clone()
    };
    let (kept, rep) = distill(init.clone(), &data, d, eps, &wild).unwrap();
    let h = rep.heldout.clone().unwrap();
    assert!(rep.kept_original && h.best_epoch == 0, "{rep:?}");
    assert_eq!(
        h.epochs.len(),
        wild.patience,
        "stops after `patience` epochs"
    );
    assert_eq!(kept[0].wo, init[0].wo);
    assert!(rep.note().contains("held-out loss never went down"));
    // refused settings: nothing left to train on; no patience
    for (holdout, patience, want) in [(5, 3, "none would be left"), (1, 0, "patience")] {
        let bad = DistillConfig {
            holdout,
            patience,
            ..cfg.clone()
        };
        let err = distill(init.clone(), &data, d, eps, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(dir).ok();
}
