//! SPD tools on tiny random models: the plan file (round trip, validation errors),
//! sensitivity (Algorithm 1 telescopes), the planner (respects its budget, verifies on the
//! held-out split, reports the paired held-out drop), and SPD blocks with QKV biases.

mod common;

use common::*;
use syncdrop::planner::{
    order_by_sensitivity, plan, verdict, Budget, Metric, PplMetric, Scored, Search,
};
use syncdrop::spd::{model_sha256, perplexity_of, sensitivity, Recovery, Sensitivity, SpdPlan};
use syncdrop::tasks::{paired_difference, suite_score, task_score, DocOutcome, SuiteScore};
use syncdrop::Engine;

fn tiny(tp: usize, tag: &str, layers: usize, bias: bool) -> (Engine, std::path::PathBuf) {
    tiny_engine(tp, tag, layers, bias)
}

fn seqs(n: usize, len: usize, salt: u32) -> Vec<Vec<u32>> {
    (0..n as u32)
        .map(|s| {
            (0..len as u32)
                .map(|i| (i * 7 + s * 13 + salt) % 64)
                .collect()
        })
        .collect()
}

#[test]
fn sensitivity_telescopes_and_restores_the_plan() {
    let (mut e, dir) = tiny(2, "sens", 4, false);
    let calib = seqs(3, 16, 0);
    let s = sensitivity(&mut e, &calib, 16, false).unwrap();
    assert_eq!(s.sensitivity.len(), 4);
    // sum of sensitivities = ppl(all SPD) - ppl(none)
    let total: f64 = s.sensitivity.iter().sum();
    assert!((total - (s.ppl_from[0] - s.base_ppl)).abs() < 1e-9 * s.base_ppl.max(1.0));
    // ppl_from[0] is the all-SPD perplexity, measured independently here
    e.set_spd(&[true; 4]).unwrap();
    let all = perplexity_of(&mut e, &calib, 16).unwrap();
    assert!((all - s.ppl_from[0]).abs() < 1e-9 * all);
    e.set_spd(&[false; 4]).unwrap();
    assert!((perplexity_of(&mut e, &calib, 16).unwrap() - s.base_ppl).abs() < 1e-12);
    assert!(
        s.sensitivity.iter().any(|v| v.abs() > 1e-6),
        "SPD changed nothing at TP 2"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn planner_respects_the_budget_and_reports_held_out() {
    let (mut e, dir) = tiny(2, "plan", 6, true);
    let calib = seqs(3, 16, 1);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let splits = [seqs(3, 20, 5), seqs(3, 20, 9)];
    for limit in [0.0, 0.02, 10.0] {
        let budget = Budget::PplIncrease(limit);
        let mut metric = PplMetric {
            splits: splits.clone(),
            window: 32,
        };
        let (o, distilled) = plan(
            &mut e,
            &sens,
            budget,
            0.0,
            &mut metric,
            &calib,
            None,
            |_| {},
        )
        .unwrap();
        // per-passage log-likelihoods give the perplexity budget a paired s.e.
        let d = o.heldout_drop.expect("paired perplexity statistics");
        assert!(
            (d.diff - o.heldout_loss).abs() < 1e-9,
            "{d:?} vs {}",
            o.heldout_loss
        );
        assert_eq!(o.passages_per_split, Some(3));
        assert!(o.verdict_text.contains("s.e."), "{}", o.verdict_text);
        if o.spd.contains(&true) {
            assert!(d.stderr > 0.0, "{d:?}");
        }
        assert!(distilled.is_empty());
        assert!(
            o.search_score / o.search_base - 1.0 <= limit + 1e-12,
            "{o:?}"
        );
        // the chosen blocks are a prefix of the sensitivity order
        let order = order_by_sensitivity(&sens);
        let k = o.spd.iter().filter(|s| **s).count();
        assert!(order[..k].iter().all(|i| o.spd[*i]));
        if limit >= 10.0 {
            assert_eq!(k, 6, "a huge budget takes every block");
        }
        // held-out numbers are real measurements of the final plan
        e.set_spd(&o.spd).unwrap();
        let held = perplexity_of(&mut e, &splits[1], 32).unwrap();
        assert!((held - o.heldout_score).abs() < 1e-9 * held);
        assert_eq!(o.within_budget_on_heldout, o.heldout_loss <= limit);
        assert!(o.t1.is_finite() || k == 0);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn planner_b2b_keeps_budget_and_leaves_no_rejected_weights() {
    let (mut e, dir) = tiny(2, "planb2b", 5, false);
    let calib = seqs(4, 16, 2);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let splits = [calib.clone(), seqs(3, 16, 7)];
    // A budget no plan can meet: zero-shot takes nothing, B2B distils the least sensitive
    // block, finds it over budget, and must restore its original weights.
    let budget = Budget::PplIncrease(-1e9);
    let dcfg = syncdrop::distill::DistillConfig {
        epochs: 40,
        lr: 3e-3,
        threads: 1,
        ..Default::default()
    };
    let mut metric = |e: &mut Engine, split: usize| perplexity_of(e, &splits[split], 32);
    let (o, distilled) = plan(
        &mut e,
        &sens,
        budget,
        0.0,
        &mut metric,
        &calib,
        Some(&dcfg),
        |m| eprintln!("{m}"),
    )
    .unwrap();
    assert_eq!((o.zero_shot_blocks, o.b2b_blocks), (0, 0));
    assert!(!o.within_budget_on_heldout);
    for (l, _) in &distilled {
        assert_eq!(o.recovery[*l], Some(Recovery::B2b));
    }
    // a training report for every block kept distilled, none for the rejected one
    assert!(o
        .distillation
        .iter()
        .map(|(l, _)| l)
        .eq(distilled.iter().map(|(l, _)| l)));
    // The engine holds exactly the plan: a fresh engine with the same mask and only the kept
    // distilled blocks gives the same bits (a rejected block's weights were restored).
    let got = e.forward(&splits[1][0], 0, 0..16).unwrap().data;
    let (mut fresh, dir2) = tiny(2, "planb2b2", 5, false);
    fresh.set_spd(&o.spd).unwrap();
    for (l, w) in distilled {
        fresh.load_layer(l, w).unwrap();
    }
    assert_eq!(fresh.forward(&splits[1][0], 0, 0..16).unwrap().data, got);
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

#[test]
fn plan_files_round_trip_and_mismatches_are_named() {
    let (e, dir) = tiny(2, "planfile", 3, false);
    let sha = model_sha256(&e.files).unwrap();
    let plan = SpdPlan::new(&e, sha.clone(), &[true, false, true], Recovery::ZeroShot);
    let p = dir.join("plan.json");
    plan.save(&p).unwrap();
    let back = SpdPlan::load(&p).unwrap();
    assert_eq!(back, plan);
    back.validate(&e, &sha).unwrap();
    assert!((back.fraction() - 2.0 / 3.0).abs() < 1e-12);
    let (e3, dir3) = tiny(3, "planfile3", 3, false);
    let err = back.validate(&e3, &sha).unwrap_err().to_string();
    assert!(err.contains("TP 2 but the engine runs TP 3"), "{err}");
    let err = back.validate(&e, "deadbeef").unwrap_err().to_string();
    assert!(err.contains("sha256"), "{err}");
    let mut short = back.clone();
    short.layers.pop();
    assert!(short
        .validate(&e, &sha)
        .unwrap_err()
        .to_string()
        .contains("2 layers"));
    std::fs::write(&p, "{\"version\": 99}").unwrap();
    assert!(SpdPlan::load(&p).is_err());
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir3).ok();
}

/// `SpdPlan::load_into`, what an engine calls to run a plan: the mask, the distilled weights
/// (checked against the sha256 the plan recorded), and clear errors for every way the plan
/// and its weights can come apart.
#[test]
fn a_plan_loads_into_an_engine_with_its_distilled_weights_checked() {
    use syncdrop::distill::{distill_layer, save_distilled, DistillConfig};
    let (mut e, dir) = tiny(2, "planload", 3, false);
    let sha = model_sha256(&e.files).unwrap();
    let mask = [false, true, false];
    e.set_spd(&mask).unwrap();
    let calib = seqs(3, 12, 5);
    let original: Vec<_> = e
        .block_shards(1)
        .iter()
        .map(|sh| syncdrop::model::load_block(&e.files, &e.cfg, sh, 1).unwrap())
        .collect();
    let dcfg = DistillConfig {
        epochs: 5,
        lr: 3e-3,
        threads: 1,
        ..Default::default()
    };
    let (w, _) = distill_layer(&mut e, &calib, 1, &dcfg).unwrap();
    let want = e.forward(&calib[0], 0, 0..12).unwrap().data;

    let weights = dir.join("plan.safetensors");
    save_distilled(&weights, &[(1, w)]).unwrap();
    let mut plan = SpdPlan::new(&e, sha.clone(), &mask, Recovery::ZeroShot);
    plan.layers[1].recovery = Some(Recovery::B2b);
    plan.set_distilled(&weights).unwrap();
    let p = dir.join("plan.json");
    plan.save(&p).unwrap();
    assert_eq!(plan.distilled_layers(), vec![1]);

    // a fresh engine on the same model runs exactly the distilled SPD model
    let (mut f, dir2) = tiny(2, "planload2", 3, false);
    let loaded = SpdPlan::load_into(&p, &mut f, &sha).unwrap();
    assert_eq!(loaded, plan);
    assert_eq!(f.forward(&calib[0], 0, 0..12).unwrap().data, want);
    // (and the weights mattered: the same mask with the original block differs)
    let (mut g, dir3) = tiny(2, "planload3", 3, false);
    g.set_spd(&mask).unwrap();
    assert_ne!(g.forward(&calib[0], 0, 0..12).unwrap().data, want);

    // other weights under the plan's file name: refused, naming both hashes
    save_distilled(&weights, &[(1, original)]).unwrap();
    let err = SpdPlan::load_into(&p, &mut g, &sha)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the ones it was written with"), "{err}");
    // a plan from before the sha was recorded loads them (nothing to check against)
    let mut old = plan.clone();
    old.distilled_sha256 = None;
    old.save(&p).unwrap();
    SpdPlan::load_into(&p, &mut g, &sha).unwrap();
    // weights missing
    std::fs::remove_file(&weights).unwrap();
    let err = SpdPlan::load_into(&p, &mut g, &sha)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("distilled weights") && err.contains("missing"),
        "{err}"
    );
    // a B2B block but no weights named
    let mut none = plan.clone();
    none.distilled = None;
    none.distilled_sha256 = None;
    none.save(&p).unwrap();
    let err = SpdPlan::load_into(&p, &mut g, &sha)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocks [1]") && err.contains("names no distilled"),
        "{err}"
    );
    // and a plan for another model is refused before anything is switched
    plan.save(&p).unwrap();
    let err = SpdPlan::load_into(&p, &mut g, "deadbeef")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256"), "{err}");
    for d in [dir, dir2, dir3] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// What ranks in separate processes compare about their SPD choice: the blocks switched and
/// the head groups, whichever way they were given (a plan under another name is the same
/// plan; a list naming the same blocks is the same choice).
#[test]
fn spd_rank_terms_count_what_a_plan_switches_not_its_file() {
    use syncdrop::spd::rank_terms;
    let (e, dir) = tiny(2, "planterms", 3, false);
    let sha = model_sha256(&e.files).unwrap();
    let plan = SpdPlan::new(&e, sha, &[true, false, true], Recovery::ZeroShot);
    let (a, b) = (dir.join("a.json"), dir.join("renamed copy.json"));
    plan.save(&a).unwrap();
    plan.save(&b).unwrap();
    let terms = |spec: &std::path::Path| rank_terms(spec.to_str().unwrap(), 3).unwrap();
    let ta = terms(&a);
    assert!(ta.differences("a", &terms(&b), "b").is_empty());
    assert!(ta
        .differences("a", &rank_terms("layers:0,2", 3).unwrap(), "list")
        .is_empty());
    let none = rank_terms("none", 3).unwrap();
    assert_eq!(
        ta.differences("a", &none, "none"),
        vec!["spd (a: 101, none: 000)".to_string()]
    );
    assert_eq!(rank_terms("all", 3).unwrap().get("spd"), Some("111"));
    // head grouping on a block is another collective layout
    let mut grouped = plan.clone();
    grouped.layers[2].heads = Some(vec![vec![1], vec![0]]);
    grouped.layers[2].ffn_order = Some(vec![1, 0]);
    grouped.save(&b).unwrap();
    let d = ta.differences("a", &terms(&b), "b").join("; ");
    assert!(
        d.starts_with("head_groups (a: none, b: 1-blocks-sha256:"),
        "{d}"
    );
    // a bad choice is an error, not a term
    assert!(rank_terms("layers:7", 3).is_err());
    assert!(rank_terms(dir.join("missing.json").to_str().unwrap(), 3).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn spd_with_qkv_biases_is_standard_at_tp1_and_differs_at_tp3() {
    let (mut e1, d1) = tiny(1, "bias1", 2, true);
    let toks = [5u32, 6, 7, 8, 40, 41];
    let base = e1.forward(&toks, 0, 0..6).unwrap().data;
    e1.set_spd(&[true, true]).unwrap();
    e1.reset_comm_stats().unwrap();
    let spd1 = e1.forward(&toks, 0, 0..6).unwrap().data;
    // one rank has no sync point to drop: its SPD block is the standard block, bit for bit,
    // and issues no all-reduce (it used to count one per SPD block)
    assert_eq!(base, spd1);
    assert_eq!(e1.comm_stats().unwrap()[0].all_reduces, 0);
    let (mut e3, d3) = tiny(3, "bias3", 2, true);
    assert!(max_abs_diff(&e3.forward(&toks, 0, 0..6).unwrap().data, &base) < 1e-4);
    e3.set_spd(&[true, true]).unwrap();
    assert!(max_abs_diff(&e3.forward(&toks, 0, 0..6).unwrap().data, &base) > 1e-4);
    std::fs::remove_dir_all(d1).ok();
    std::fs::remove_dir_all(d3).ok();
}

/// An accuracy-like metric on the tiny model: a "document" is a (sequence, position) and is
/// correct when the greedy next token agrees with the model without SPD. Two "tasks".
#[derive(Clone)]
struct Agreement {
    splits: [Vec<Vec<u32>>; 2],
    reference: [Vec<Vec<usize>>; 2],
}

fn greedy(e: &mut Engine, seqs: &[Vec<u32>]) -> Vec<Vec<usize>> {
    seqs.iter()
        .map(|s| {
            let l = e.forward(s, 0, 0..s.len()).unwrap();
            (0..s.len())
                .map(|i| syncdrop::generate::argmax(l.row(i)))
                .collect()
        })
        .collect()
}

impl Agreement {
    fn suite(&self, e: &mut Engine, split: usize) -> SuiteScore {
        let got = greedy(e, &self.splits[split]);
        let mut per_task = [Vec::new(), Vec::new()];
        for (si, (g, r)) in got.iter().zip(&self.reference[split]).enumerate() {
            for (i, (a, b)) in g.iter().zip(r).enumerate() {
                per_task[si % 2].push(DocOutcome {
                    id: (si * 1000 + i) as u64,
                    acc: a == b,
                    acc_norm: a == b,
                });
            }
        }
        let [t0, t1] = per_task;
        suite_score(vec![task_score("lambada", t0), task_score("sciq", t1)])
    }
}

impl Metric for Agreement {
    fn score(&mut self, e: &mut Engine, split: usize) -> syncdrop::Result<f64> {
        Ok(self.suite(e, split).average)
    }
    fn score_detailed(&mut self, e: &mut Engine, split: usize) -> syncdrop::Result<Scored> {
        let s = self.suite(e, split);
        Ok(Scored {
            value: s.average,
            suite: Some(s),
            passages: None,
        })
    }
}

/// The planner tests' setup on a 6-block tiny model: calibration sequences, their sensitivity,
/// and an [`Agreement`] metric whose two splits are made with these salts.
fn agreement_setup(e: &mut Engine, salts: [u32; 2]) -> (Vec<Vec<u32>>, Sensitivity, Agreement) {
    let seqs = |n: u32, salt: u32| -> Vec<Vec<u32>> {
        (0..n)
            .map(|s| (0..24).map(|i| (i * 11 + s * 17 + salt) % 64).collect())
            .collect()
    };
    let calib = seqs(3, 0);
    let sens = sensitivity(e, &calib, 16, false).unwrap();
    let splits = [seqs(6, salts[0]), seqs(6, salts[1])];
    e.set_spd(&[false; 6]).unwrap();
    let reference = [greedy(e, &splits[0]), greedy(e, &splits[1])];
    (calib, sens, Agreement { splits, reference })
}

#[test]
fn planner_reports_the_paired_held_out_drop() {
    let (mut e, dir) = tiny(2, "paired_plan", 6, false);
    let (calib, sens, mut metric) = agreement_setup(&mut e, [3, 40]);
    // baseline agrees with itself: accuracy 1; a 20-point budget lets some blocks in
    let (o, _) = plan(
        &mut e,
        &sens,
        Budget::AccDrop(0.2),
        0.0,
        &mut metric,
        &calib,
        None,
        |m| eprintln!("{m}"),
    )
    .unwrap();
    assert!((o.heldout_base - 1.0).abs() < 1e-12);
    let d = o
        .heldout_drop
        .expect("accuracy budget with outcomes: a paired drop");
    assert!((d.diff - o.heldout_loss).abs() < 1e-12, "{o:?}");
    assert_eq!(d.docs, 6 * 24);
    // (this model and data: every block SPD, and some held-out documents flip)
    assert!(d.discordant > 0 && d.stderr > 0.0, "{d:?}");
    // the s.e. is the paired one of this plan's held-out outcomes, recomputed here
    e.set_spd(&o.spd).unwrap();
    let plan_suite = metric.suite(&mut e, 1);
    e.set_spd(&[false; 6]).unwrap();
    let base_suite = metric.suite(&mut e, 1);
    let again = paired_difference(&base_suite, &plan_suite).unwrap();
    assert!((again.stderr - d.stderr).abs() < 1e-15 && (again.diff - d.diff).abs() < 1e-15);
    let (lo, hi) = o.heldout_loss_ci95.unwrap();
    assert!((lo - (d.diff - 1.96 * d.stderr)).abs() < 1e-12);
    assert!((hi - (d.diff + 1.96 * d.stderr)).abs() < 1e-12);
    let v = o.verdict.unwrap();
    assert_eq!(v, verdict(o.heldout_loss, Some(d.stderr), 0.2, "pt").0);
    assert_eq!(o.within_budget_on_heldout, o.heldout_loss <= 0.2);
    assert_eq!(o.docs_per_task, Some(3 * 24));
    assert!(o.search_drop.is_some());
    assert!(!o.verdict_text.is_empty());
    std::fs::remove_dir_all(dir).ok();
}

/// A search split too small for its budget is flagged in the log once; the advice depends on
/// whether the search already asks for a margin of s.e. (`--search-z`).
#[test]
fn planner_warns_of_an_unresolvable_search_split_with_advice_for_its_z() {
    let (mut e, _dir) = tiny(2, "warn_plan", 6, false);
    // (on this data, split 0 of the other test's order has no flip at all: an s.e. of 0)
    let (calib, sens, metric) = agreement_setup(&mut e, [40, 3]);
    for z in [0.0, 1.0] {
        let mut metric = metric.clone();
        let mut log = Vec::new();
        plan(
            &mut e,
            &sens,
            Budget::AccDrop(0.001),
            z,
            &mut metric,
            &calib,
            None,
            |m| log.push(m.to_string()),
        )
        .unwrap();
        let warnings: Vec<&String> = log
            .iter()
            .filter(|l| l.contains("cannot resolve"))
            .collect();
        assert_eq!(warnings.len(), 1, "{log:#?}");
        let w = warnings[0];
        if z == 0.0 {
            assert!(w.contains("or use --search-z 1.645"), "{w}");
        } else {
            assert!(
                w.contains("already asks for loss + 1 s.e. within budget"),
                "{w}"
            );
            assert!(!w.contains("--search-z 1.645"), "{w}");
        }
    }
}

#[test]
fn a_conservative_search_takes_no_more_blocks_and_its_bound_fits() {
    let (mut e, dir) = tiny(2, "plan_z", 6, true);
    let calib = seqs(3, 16, 1);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let splits = [seqs(4, 20, 5), seqs(4, 20, 9)];
    let mut chosen = Vec::new();
    for limit in [0.01, 0.05, 0.2] {
        let budget = Budget::PplIncrease(limit);
        let mut by_z = Vec::new();
        for z in [0.0, 1.645, 4.0] {
            let mut metric = PplMetric {
                splits: splits.clone(),
                window: 32,
            };
            let (o, _) = plan(&mut e, &sens, budget, z, &mut metric, &calib, None, |_| {}).unwrap();
            assert_eq!(o.search_z, z);
            let k = o.spd.iter().filter(|s| **s).count();
            if k > 0 {
                // the chosen plan's search loss plus z standard errors is within budget
                let d = o.search_drop.expect("paired search statistics");
                assert!(d.diff + z * d.stderr <= limit + 1e-12, "z {z}: {d:?}");
            }
            by_z.push(k);
        }
        // a wider margin never admits more blocks
        assert!(
            by_z.windows(2).all(|w| w[1] <= w[0]),
            "limit {limit}: {by_z:?}"
        );
        chosen.push(by_z);
    }
    eprintln!("blocks chosen per budget at z = 0, 1.645, 4: {chosen:?}");
    // the margin matters somewhere on this model, or the test shows nothing
    assert!(chosen.iter().any(|b| b[2] < b[0]), "{chosen:?}");
    let mut metric = PplMetric {
        splits: splits.clone(),
        window: 32,
    };
    let err = plan(
        &mut e,
        &sens,
        Budget::PplIncrease(0.1),
        -1.0,
        &mut metric,
        &calib,
        None,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("z >= 0"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// Past the wall: with a cost per SPD block where the block that ends the zero-shot prefix is
/// expensive and the ones after it cheap (the shape SmolLM2's block 24 has at TP 3, 4 and 8),
/// the search past the wall keeps the cheap blocks and skips the expensive ones; without it
/// the plan is the prefix. The real engine switches the blocks; the metric reads which.
#[test]
fn the_search_past_the_wall_keeps_cheap_blocks_after_an_expensive_one() {
    let (mut e, _) = tiny(2, "wall", 6, false);
    let calib = seqs(2, 16, 3);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let order = order_by_sensitivity(&sens);
    let mut cost = vec![0.01; 6];
    cost[order[2]] = 1.0; // the wall: the 3rd block in sensitivity order
    let mut metric = move |e: &mut Engine, _split: usize| {
        Ok(1.0
            + e.spd()
                .iter()
                .zip(&cost)
                .filter(|(s, _)| **s)
                .map(|(_, c)| c)
                .sum::<f64>())
    };
    let budget = Budget::PplIncrease(0.045); // four cheap blocks fit, five do not
    let chosen = |o: &syncdrop::planner::PlanOutcome| -> Vec<usize> {
        (0..6).filter(|l| o.spd[*l]).collect()
    };
    let (o, _) = plan(
        &mut e,
        &sens,
        budget,
        0.0,
        &mut metric,
        &calib,
        None,
        |_| {},
    )
    .unwrap();
    let mut prefix = order[..2].to_vec();
    prefix.sort_unstable();
    assert_eq!(chosen(&o), prefix);
    assert!(o.skipped.is_empty() && o.past_wall == 0);
    let search = Search {
        z: 0.0,
        past_wall: 3,
        ..Search::default()
    };
    let mut log = Vec::new();
    let (o, _) = plan(
        &mut e,
        &sens,
        budget,
        search,
        &mut metric,
        &calib,
        None,
        |m| log.push(m.to_string()),
    )
    .unwrap();
    let mut want = order[..2].to_vec();
    want.extend([order[3], order[4]]);
    want.sort_unstable();
    assert_eq!(chosen(&o), want, "{log:#?}");
    assert_eq!(o.skipped, vec![order[2], order[5]]);
    assert_eq!(o.zero_shot_blocks, 4);
    assert!((o.heldout_loss - 0.04).abs() < 1e-9, "{}", o.heldout_loss);
    assert_eq!(e.spd(), &o.spd[..], "the engine ends with the plan loaded");
    assert_eq!(
        log.iter().filter(|l| l.contains("past the wall")).count(),
        3
    );
}

/// `Search::max_task_drop`: a step fits only if every task's own drop is within the cap, so
/// the capped plan is no larger than the uncapped one and none of its tasks loses more than
/// the cap on the search split; the held-out split's per-task drops average to the held-out
/// drop. A cap needs an accuracy budget.
#[test]
fn planner_caps_each_tasks_drop() {
    let (mut e, _dir) = tiny(2, "taskcap", 6, false);
    let (calib, sens, mut metric) = agreement_setup(&mut e, [40, 3]);
    let budget = Budget::AccDrop(0.5);
    let (free, _) = plan(
        &mut e,
        &sens,
        budget,
        0.0,
        &mut metric,
        &calib,
        None,
        |_| {},
    )
    .unwrap();
    // the uncapped plan's worst task on the search split
    let per_task = |e: &mut Engine, m: &mut Agreement, spd: &[bool]| {
        e.set_spd(&[false; 6]).unwrap();
        let b = m.suite(e, 0);
        e.set_spd(spd).unwrap();
        let p = m.suite(e, 0);
        syncdrop::tasks::paired_difference_per_task(&b, &p).unwrap()
    };
    let free_tasks = per_task(&mut e, &mut metric, &free.spd);
    let worst = free_tasks.iter().map(|t| t.1.diff).fold(f64::MIN, f64::max);
    assert!(
        worst > 0.0,
        "this data must make some task lose: {free_tasks:?}"
    );
    // the average of the per-task drops is the suite's paired drop
    let avg = free_tasks.iter().map(|t| t.1.diff).sum::<f64>() / free_tasks.len() as f64;
    assert!((avg - free.search_drop.unwrap().diff).abs() < 1e-12);
    assert_eq!(free.heldout_task_drops.len(), 2);
    let held_avg = free
        .heldout_task_drops
        .iter()
        .map(|t| t.1.diff)
        .sum::<f64>()
        / 2.0;
    assert!((held_avg - free.heldout_loss).abs() < 1e-12);

    let cap = worst / 2.0;
    let mut log = Vec::new();
    let search = Search {
        max_task_drop: Some(cap),
        ..Search::default()
    };
    let (capped, _) = plan(
        &mut e,
        &sens,
        budget,
        search,
        &mut metric,
        &calib,
        None,
        |m| log.push(m.to_string()),
    )
    .unwrap();
    let n = |o: &syncdrop::planner::PlanOutcome| o.spd.iter().filter(|s| **s).count();
    assert!(n(&capped) < n(&free), "{log:#?}");
    for (task, d) in per_task(&mut e, &mut metric, &capped.spd) {
        assert!(
            d.diff <= cap + 1e-12,
            "{task}: {d:?} over the cap {cap}; {log:#?}"
        );
    }
    assert!(
        log.iter().any(|l| l.contains("over the task cap")),
        "{log:#?}"
    );
    assert!(log
        .iter()
        .all(|l| !l.contains("blocks: score") || l.contains("worst task")));
    assert_eq!(capped.max_task_drop, Some(cap));
    assert_eq!(capped.task_z, Some(0.0), "the cap's margin defaults to z");
    assert_eq!(free.task_z, None);
    assert!(n(&capped) > 0, "{log:#?}");

    // `task_z` sets the cap's margin apart from the average's. A cap of 100 points never binds
    // on point estimates (the free plan); with a margin of 1000 s.e. it refuses every step
    // that moves any document of any task, while the average is still judged by its point
    // estimate (z 0)
    let loose = |task_z| Search {
        max_task_drop: Some(1.0),
        task_z: Some(task_z),
        ..Search::default()
    };
    // plan with `s`, the log in `log`
    let run = |e: &mut Engine, m: &mut Agreement, s: Search, log: &mut Vec<String>| {
        plan(e, &sens, budget, s, m, &calib, None, |l| {
            log.push(l.to_string())
        })
    };
    let (points, _) = run(&mut e, &mut metric, loose(0.0), &mut Vec::new()).unwrap();
    assert_eq!(points.spd, free.spd);
    let mut wide_log = Vec::new();
    let (wide, _) = run(&mut e, &mut metric, loose(1000.0), &mut wide_log).unwrap();
    assert!(n(&wide) < n(&free), "{wide_log:#?}");
    assert_eq!((wide.search_z, wide.task_z), (0.0, Some(1000.0)));
    for (task, d) in per_task(&mut e, &mut metric, &wide.spd) {
        assert_eq!(d.stderr, 0.0, "{task} moved: {d:?}; {wide_log:#?}");
    }
    assert!(
        wide_log.iter().any(|l| l.contains("over the task cap")),
        "{wide_log:#?}"
    );
    // and an explicit margin equal to z is the default
    let with_task_z = |task_z| Search {
        task_z: Some(task_z),
        ..search
    };
    let (same, _) = run(&mut e, &mut metric, with_task_z(0.0), &mut Vec::new()).unwrap();
    assert_eq!(same.spd, capped.spd);
    let err = run(&mut e, &mut metric, with_task_z(-1.0), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("finite z >= 0"), "{err}");

    // a cap needs per-task accuracies
    let ppl = |_: &mut Engine, _: usize| Ok(1.0);
    let err = plan(
        &mut e,
        &sens,
        Budget::PplIncrease(0.1),
        search,
        &mut { ppl },
        &calib,
        None,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("needs an accuracy budget"), "{err}");
}

/// `Search::distill_zero_shot`: the zero-shot blocks the search chose are distilled too, and
/// kept so when that lowers the loss; the engine ends with exactly the plan's weights and the
/// outcome's search score is that plan's.
#[test]
fn planner_can_distil_the_zero_shot_blocks() {
    let (mut e, dir) = tiny(2, "planzs", 6, false);
    let calib = seqs(4, 16, 2);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let splits = [seqs(3, 20, 5), seqs(3, 20, 9)];
    // The score: 1 + the mean squared distance of the logits from the TP model's (a random
    // model's perplexity can fall under SPD; its distance from the TP model cannot).
    let logits = |e: &mut Engine, split: usize| -> Vec<Vec<f32>> {
        splits[split]
            .iter()
            .map(|s| e.forward(s, 0, 0..s.len()).unwrap().data)
            .collect()
    };
    let reference = [logits(&mut e, 0), logits(&mut e, 1)];
    let mut metric = |e: &mut Engine, split: usize| -> syncdrop::Result<f64> {
        let got = logits(e, split);
        let (mut se, mut n) = (0.0f64, 0usize);
        for (g, r) in got.iter().zip(&reference[split]) {
            se += g
                .iter()
                .zip(r)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            n += g.len();
        }
        Ok(1.0 + se / n as f64)
    };
    let order = order_by_sensitivity(&sens);
    let mut mask = vec![false; 6];
    let mut dist = vec![metric(&mut e, 0).unwrap()];
    for &l in &order {
        mask[l] = true;
        e.set_spd(&mask).unwrap();
        dist.push(metric(&mut e, 0).unwrap());
    }
    e.set_spd(&[false; 6]).unwrap();
    eprintln!("zero-shot score by prefix length: {dist:?}");
    // a budget between the 2- and 3-block prefixes
    let loss = |k: usize| dist[k] / dist[0] - 1.0;
    assert!(dist[0] == 1.0 && loss(2) < loss(3), "{dist:?}");
    let budget = Budget::PplIncrease((loss(2) + loss(3)) / 2.0);
    let dcfg = syncdrop::distill::DistillConfig {
        epochs: 40,
        lr: 3e-3,
        threads: 1,
        ..Default::default()
    };
    let search = Search {
        distill_zero_shot: true,
        ..Search::default()
    };
    let mut log = Vec::new();
    let (o, distilled) = plan(
        &mut e,
        &sens,
        budget,
        search,
        &mut metric,
        &calib,
        Some(&dcfg),
        |m| log.push(m.to_string()),
    )
    .unwrap();
    let log = log.join("\n");
    eprintln!("{log}");
    // the zero-shot class is the 2-block prefix, and distilling it paid
    for &l in &order[..2] {
        assert_eq!(o.recovery[l], Some(Recovery::B2b), "block {l}:\n{log}");
        assert!(o.distillation.iter().any(|(d, _)| *d == l), "{log}");
    }
    assert_eq!(o.zero_shot_blocks, 0);
    assert!(log.contains("b2b on the 2 zero-shot blocks"), "{log}");
    let t1 = order[..2]
        .iter()
        .map(|l| sens.sensitivity[*l])
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(o.t1, t1);
    // the held-out baseline is the TP model (distance 0), not the distilled weights with
    // SPD off
    assert_eq!(o.heldout_base, 1.0);
    // the engine holds exactly the plan, and the search score is the plan's
    let got = metric(&mut e, 0).unwrap();
    assert_eq!(got, o.search_score);
    // the budget zero-shot SPD used up on 2 blocks now holds a third
    assert!(got < dist[3], "distilled {got} vs zero-shot {}", dist[3]);
    assert_eq!(o.spd.iter().filter(|s| **s).count(), 3, "{log}");
    let (mut fresh, dir2) = tiny(2, "planzs2", 6, false);
    fresh.set_spd(&o.spd).unwrap();
    for (l, w) in distilled {
        fresh.load_layer(l, w).unwrap();
    }
    assert_eq!(metric(&mut fresh, 0).unwrap(), got);
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

/// A plan with no block in a class has that threshold at -inf: the sensitivity plot draws no
/// line for it (no infinite or NaN coordinates in the SVG) and says so in the legend.
#[test]
fn the_sensitivity_plot_draws_no_line_for_an_empty_class() {
    let s = syncdrop::spd::Sensitivity {
        base_ppl: 30.0,
        ppl_from: vec![40.0, 35.0, 31.0],
        sensitivity: vec![5.0, 4.0, 1.0],
        tp: Some(2),
        passages: Some(4),
        compensation_rank: None,
    };
    let dir = tmpdir("plot_empty_class");
    for (t1, t2, lines) in [(f64::NEG_INFINITY, f64::NEG_INFINITY, 0), (1.0, 4.0, 2)] {
        let path = dir.join(format!("s{lines}.svg"));
        syncdrop::spd::plot_sensitivity(&s, t1, t2, "t", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let low = svg.to_lowercase();
        assert!(!low.contains("inf") && !low.contains("nan"), "{svg}");
        assert_eq!(
            svg.matches("none (no block in that class)").count(),
            2 - lines
        );
        assert_eq!(svg.matches("t1 = 1.000").count(), usize::from(lines == 2));
    }
}

/// A perplexity metric that counts the evaluations it runs.
struct Counting {
    inner: PplMetric,
    runs: usize,
}

impl Metric for Counting {
    fn score(&mut self, e: &mut Engine, split: usize) -> syncdrop::Result<f64> {
        Ok(self.score_detailed(e, split)?.value)
    }
    fn score_detailed(&mut self, e: &mut Engine, split: usize) -> syncdrop::Result<Scored> {
        self.runs += 1;
        self.inner.score_detailed(e, split)
    }
    fn data_digest(&self, split: usize) -> syncdrop::Result<Option<String>> {
        self.inner.data_digest(split)
    }
}

/// `BaselineCache` (`plan --reuse-baseline`): the first plan keeps both TP baselines, a
/// second plan on the same engine and data reuses them (two evaluations fewer, the same
/// plan and the same held-out numbers); another identity, other data or a metric without a
/// digest is never served from the cache; a damaged file is reported and replaced.
#[test]
fn planner_reuses_cached_baselines_only_for_the_same_engine_and_data() {
    use syncdrop::planner::BaselineCache;
    let (mut e, dir) = tiny(2, "basecache", 6, false);
    let cache = dir.join("baselines");
    let calib = seqs(3, 16, 1);
    let sens = sensitivity(&mut e, &calib, 16, false).unwrap();
    let budget = Budget::PplIncrease(0.02);
    let files = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&cache)
            .map(|d| d.map(|f| f.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    // one plan through the cache: (outcome, evaluations run, log)
    let run = |e: &mut Engine, identity: &str, salt: u32| {
        let mut m = Counting {
            inner: PplMetric {
                splits: [seqs(3, 20, salt), seqs(3, 20, salt + 4)],
                window: 32,
            },
            runs: 0,
        };
        let mut log = Vec::new();
        let mut say = |s: &str| log.push(s.to_string());
        let mut cached = BaselineCache {
            inner: &mut m,
            dir: cache.clone(),
            identity: identity.to_string(),
            log: &mut say,
        };
        let (o, _) = plan(e, &sens, budget, 0.0, &mut cached, &calib, None, |_| {}).unwrap();
        (o, m.runs, log)
    };
    let (first, n1, log1) = run(&mut e, "engine A", 5);
    assert_eq!(files().len(), 2, "{log1:?}");
    assert_eq!(log1.iter().filter(|l| l.contains("kept in")).count(), 2);
    let (second, n2, log2) = run(&mut e, "engine A", 5);
    assert_eq!(n2 + 2, n1, "both baselines reused: {log2:?}");
    assert_eq!(log2.iter().filter(|l| l.contains("reused")).count(), 2);
    assert_eq!(second.spd, first.spd);
    assert_eq!(second.search_base, first.search_base);
    assert_eq!(second.heldout_base, first.heldout_base);
    assert_eq!(second.heldout_loss, first.heldout_loss);
    let (d1, d2) = (first.heldout_drop.unwrap(), second.heldout_drop.unwrap());
    assert_eq!((d1.diff, d1.stderr), (d2.diff, d2.stderr));
    // another engine identity, or other passages: measured again, kept beside
    let measured = |log: &[String]| log.iter().filter(|l| l.contains("kept in")).count();
    let (_, n3, log3) = run(&mut e, "engine B", 5);
    assert_eq!((n3, measured(&log3)), (n1, 2), "another engine is a miss");
    assert_eq!(files().len(), 4);
    let (_, _, log4) = run(&mut e, "engine A", 6);
    assert_eq!(measured(&log4), 2, "other data is a miss: {log4:?}");
    assert_eq!(files().len(), 6);
    // a damaged file is reported, measured again and replaced
    let victim = files()[0].clone();
    std::fs::write(&victim, "{").unwrap();
    let runs_before: Vec<_> = ["engine A", "engine B"]
        .iter()
        .flat_map(|id| [(id, 5), (id, 6)])
        .collect();
    let mut replaced = false;
    for (id, salt) in runs_before {
        let (_, _, log) = run(&mut e, id, salt);
        replaced |= log
            .iter()
            .any(|l| l.contains("cannot use") && l.contains("replacing"));
    }
    assert!(replaced, "the damaged file was reported");
    assert!(
        std::fs::read_to_string(&victim)
            .unwrap()
            .contains("syncdrop-baseline-1"),
        "and replaced"
    );
    // a metric without a digest is never cached
    let splits = [seqs(3, 20, 5), seqs(3, 20, 9)];
    let mut bare = |e: &mut Engine, split: usize| perplexity_of(e, &splits[split], 32);
    let before = files().len();
    let mut log = Vec::new();
    let mut say = |s: &str| log.push(s.to_string());
    let mut cached = BaselineCache {
        inner: &mut bare,
        dir: cache.clone(),
        identity: "engine A".into(),
        log: &mut say,
    };
    plan(
        &mut e,
        &sens,
        budget,
        0.0,
        &mut cached,
        &calib,
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(files().len(), before);
    assert!(log.is_empty(), "{log:?}");
    std::fs::remove_dir_all(dir).ok();
}
