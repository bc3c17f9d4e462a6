//! Paired statistics of accuracy differences: the paired standard error on hand-made
//! per-document outcomes, the verdict built on it, and per-document outcomes from the real
//! evaluation reaching the planner through a closure. (The planner's paired held-out drop on
//! a tiny model is tested in tests/spd.rs.)

use std::sync::Arc;
use syncdrop::planner::{resolution_warning, sample_factor_to_resolve, verdict, Metric, Verdict};
use syncdrop::tasks::{
    self, paired_difference, suite_score, task_score, DocOutcome, SuiteScore, TaskScore,
};
use syncdrop::{Engine, EngineOptions, ModelFiles};

/// Outcomes with `acc_norm` as given and `acc` its opposite, so a test fails if the wrong
/// metric of a task is paired.
fn docs(bits: &[u8]) -> Vec<DocOutcome> {
    bits.iter()
        .enumerate()
        .map(|(i, b)| DocOutcome {
            id: 100 + i as u64,
            acc: *b == 0,
            acc_norm: *b == 1,
        })
        .collect()
}

/// The same with `acc` as given (for tasks scored by acc).
fn docs_acc(bits: &[u8]) -> Vec<DocOutcome> {
    docs(bits)
        .into_iter()
        .map(|d| DocOutcome {
            acc: !d.acc,
            acc_norm: !d.acc_norm,
            ..d
        })
        .collect()
}

#[test]
fn paired_stderr_on_hand_made_outcomes() {
    // arc_easy is scored by acc_norm, sciq by acc.
    let a = suite_score(vec![
        task_score("arc_easy", docs(&[1, 1, 0, 0, 1])),
        task_score("sciq", docs_acc(&[1, 0, 1, 1])),
    ]);
    let b = suite_score(vec![
        task_score("arc_easy", docs(&[1, 0, 0, 1, 0])),
        task_score("sciq", docs_acc(&[1, 0, 1, 1])),
    ]);
    let d = paired_difference(&a, &b).unwrap();
    // arc_easy: a - b = [0, 1, 0, -1, 1], mean 0.2, sample variance 2.8 / 4 = 0.7, variance
    // of the mean 0.7 / 5 = 0.14; sciq: all 0. Average over 2 tasks: diff 0.1, s.e.
    // sqrt(0.14) / 2.
    assert!((d.diff - 0.1).abs() < 1e-12, "{d:?}");
    assert!((d.stderr - 0.14f64.sqrt() / 2.0).abs() < 1e-12, "{d:?}");
    assert_eq!((d.docs, d.discordant), (9, 3));
    assert!((d.diff - (a.average - b.average)).abs() < 1e-12);
    // antisymmetric in the difference, symmetric in the error
    let r = paired_difference(&b, &a).unwrap();
    assert!((r.diff + d.diff).abs() < 1e-12 && (r.stderr - d.stderr).abs() < 1e-15);
    // the paired s.e. is far below the unpaired one when most documents agree
    assert!(d.stderr < (a.average_stderr.powi(2) + b.average_stderr.powi(2)).sqrt());
    let (lo, hi) = d.ci95();
    assert!((hi - lo - 2.0 * 1.96 * d.stderr).abs() < 1e-12 && lo < d.diff && d.diff < hi);
    // identical outcomes: no difference, no error
    let z = paired_difference(&a, &a).unwrap();
    assert_eq!((z.diff, z.stderr, z.discordant), (0.0, 0.0, 0));
}

#[test]
fn pairing_refuses_different_documents_and_missing_outcomes() {
    let a = suite_score(vec![task_score("piqa", docs(&[1, 0, 1]))]);
    let mut other_ids = a.clone();
    other_ids.tasks[0].docs[1].id = 7;
    let err = paired_difference(&a, &other_ids).unwrap_err().to_string();
    assert!(err.contains("different documents"), "{err}");
    let other_task = suite_score(vec![task_score("sciq", docs(&[1, 0, 1]))]);
    assert!(paired_difference(&a, &other_task).is_err());
    // JSON written before per-document outcomes were kept still loads, but cannot be paired
    let old: TaskScore =
        serde_json::from_str(r#"{"task":"piqa","n":3,"acc":0.5,"acc_norm":0.5}"#).unwrap();
    assert!(old.docs.is_empty());
    let old = SuiteScore {
        tasks: vec![old],
        ..Default::default()
    };
    let err = paired_difference(&a, &old).unwrap_err().to_string();
    assert!(err.contains("no per-document outcomes"), "{err}");
    // and new JSON round-trips its outcomes
    let back: TaskScore =
        serde_json::from_str(&serde_json::to_string(&a.tasks[0]).unwrap()).unwrap();
    assert_eq!(back.docs, a.tasks[0].docs);
}

#[test]
fn verdicts_follow_the_interval() {
    let limit = 0.01;
    // +0.2 +- 0.3 pt: the interval [-0.39, +0.79] is below 1 pt
    assert_eq!(
        verdict(0.002, Some(0.003), limit, "pt").0,
        Verdict::WithinBudget
    );
    // +3 +- 0.5 pt: [2.02, 3.98] is above it
    assert_eq!(
        verdict(0.03, Some(0.005), limit, "pt").0,
        Verdict::OverBudget
    );
    // +0.5 +- 1.5 pt and +2 +- 1.5 pt: the interval contains the budget
    let (v, text) = verdict(0.005, Some(0.015), limit, "pt");
    assert_eq!(v, Verdict::Inconclusive);
    assert!(text.contains("point estimate within budget"), "{text}");
    let (v, text) = verdict(0.02, Some(0.015), limit, "pt");
    assert_eq!(v, Verdict::Inconclusive);
    assert!(text.contains("point estimate over budget"), "{text}");
    // without a standard error only the point estimate is left, and the text says so
    let (v, text) = verdict(0.02, None, limit, "%");
    assert_eq!(v, Verdict::OverBudget);
    assert!(text.contains("no standard error"), "{text}");
    // resolving +0.5 +- 1.5 pt against 1 pt: 1.96 * 1.5 / 0.5 = 5.88, squared 34.6x
    let f = sample_factor_to_resolve(0.005, 0.015, limit).unwrap();
    assert!((f - 5.88f64.powi(2)).abs() < 1e-9, "{f}");
    assert!(sample_factor_to_resolve(0.01, 0.015, limit).is_none());
}

#[test]
fn small_search_splits_are_flagged() {
    let limit = 0.01;
    // TP 8's 80-document search: paired s.e. 1.6 pt, half-width 3.1 pt > 1 pt budget;
    // resolving half the budget (0.5 pt) needs (3.136 / 0.5)^2 = 39.3x the 560 documents
    let w = resolution_warning(0.016, limit, 560, "documents over all tasks").unwrap();
    assert!(w.contains("cannot resolve"), "{w}");
    assert!(
        !w.contains("  ") && !w.contains('\n'),
        "one line, single spaces: {w}"
    );
    let want = (560.0 * (1.96f64 * 0.016 / 0.005).powi(2)).ceil() as usize;
    assert!(
        w.contains(&format!("({want} documents over all tasks)")),
        "{w}"
    );
    assert!(w.contains("39x"), "{w}");
    // a sample that resolves the budget (half-width 0.98 pt) and degenerate inputs: no warning
    assert!(resolution_warning(0.005, limit, 22400, "documents").is_none());
    assert!(resolution_warning(f64::NAN, limit, 10, "passages").is_none());
    assert!(resolution_warning(0.02, 0.0, 10, "passages").is_none());
}

#[test]
fn suite_metric_gives_the_planner_per_document_outcomes() {
    // the real model and data (scripts/fetch-assets.sh), 2 documents of 2 tasks, TP 2
    let path = syncdrop::assets::smollm2().unwrap_or_else(|e| panic!("{e}"));
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let tok = match &*files {
        ModelFiles::Gguf(g) => syncdrop::tokenizer::Tokenizer::from_gguf(g).unwrap(),
        _ => unreachable!(),
    };
    let dir = syncdrop::assets::eval_dir().unwrap();
    let docs: Vec<(String, Vec<tasks::Doc>)> = ["sciq", "lambada"]
        .iter()
        .map(|t| {
            let task = tasks::load_task(&dir, t).unwrap();
            (t.to_string(), tasks::sample(&task, 2, 0, Some(1)))
        })
        .collect();
    let opts = EngineOptions {
        tp: 2,
        threads: 2,
        capacity: 512,
        ..Default::default()
    };
    let mut e = Engine::new(files, &opts).unwrap();
    let mut metric = syncdrop::planner::SuiteMetric {
        tok,
        splits: [Vec::new(), docs.clone()],
    };
    let s = metric.score_detailed(&mut e, 1).unwrap();
    let suite = s.suite.expect("the suite's per-document outcomes");
    assert_eq!(suite.average.to_bits(), s.value.to_bits());
    assert_eq!(suite.tasks.len(), 2);
    for (t, (_, d)) in suite.tasks.iter().zip(&docs) {
        let ids: Vec<u64> = d.iter().map(|d| d.id).collect();
        let got: Vec<u64> = t.docs.iter().map(|d| d.id).collect();
        assert_eq!(got, ids);
    }
    // a plain closure metric has no outcomes (the planner then reports no paired s.e.)
    let mut other = |_: &mut Engine, _: usize| Ok(0.5);
    assert!(other.score_detailed(&mut e, 1).unwrap().suite.is_none());
}

#[test]
fn paired_perplexity_increase_on_hand_made_passages() {
    use syncdrop::planner::paired_ppl_increase;
    // three passages of 10, 20, 30 tokens; the plan adds 1, 4, 1 nats
    let base = [(20.0, 10), (50.0, 20), (60.0, 30)];
    let plan = [(21.0, 10), (54.0, 20), (61.0, 30)];
    let d = paired_ppl_increase(&base, &plan).unwrap();
    // the ratio of perplexities exactly: exp((136 - 130) / 60) - 1
    let ratio = ((136.0f64 / 60.0).exp()) / ((130.0f64 / 60.0).exp());
    assert!((d.diff - (ratio - 1.0)).abs() < 1e-12, "{d:?}");
    // by hand: r = 0.1; residuals d_i - r n_i = 0, 2, -2; var = 3/2 * 8 / 3600
    let se = (0.1f64).exp() * (1.5 * 8.0 / 3600.0f64).sqrt();
    assert!((d.stderr - se).abs() < 1e-12, "{} vs {se}", d.stderr);
    assert_eq!((d.docs, d.discordant), (3, 3));
    // the same passages scored twice: no increase, no error
    let same = paired_ppl_increase(&base, &base).unwrap();
    assert_eq!((same.diff, same.stderr, same.discordant), (0.0, 0.0, 0));
    // a uniform per-token shift has zero paired s.e. though each passage moved
    let shifted = [(21.0, 10), (52.0, 20), (63.0, 30)];
    let u = paired_ppl_increase(&base, &shifted).unwrap();
    assert!(u.stderr.abs() < 1e-12 && u.diff > 0.0, "{u:?}");
    // mismatched passages are errors, not numbers
    assert!(paired_ppl_increase(&base, &plan[..2]).is_err());
    assert!(paired_ppl_increase(&base, &[(21.0, 10), (54.0, 21), (61.0, 30)]).is_err());
    assert!(paired_ppl_increase(&[], &[]).is_err());
}

/// Each accuracy has its own standard error: acc_norm's is not acc's.
#[test]
fn acc_and_acc_norm_have_their_own_standard_errors() {
    let s = syncdrop::tasks::TaskScore {
        task: "arc_easy".into(),
        n: 100,
        acc: 0.5,
        acc_norm: 0.9,
        docs: vec![],
    };
    assert!((s.stderr() - 0.05).abs() < 1e-12);
    assert!((s.stderr_norm() - 0.03).abs() < 1e-12);
}

#[test]
fn merged_scores_pair_like_one_run_on_the_union() {
    // Two halves of one sample: piqa's documents split across them, sciq only in the second.
    let piqa = docs(&[1, 0, 1, 1, 0, 1]);
    let first = suite_score(vec![task_score("piqa", piqa[..4].to_vec())]);
    let second = suite_score(vec![
        task_score("piqa", piqa[4..].to_vec()),
        task_score("sciq", docs_acc(&[1, 1, 0])),
    ]);
    let merged = tasks::merge_suites(vec![first.clone(), second.clone()]).unwrap();
    let whole = suite_score(vec![
        task_score("piqa", piqa.clone()),
        task_score("sciq", docs_acc(&[1, 1, 0])),
    ]);
    assert_eq!(merged.tasks.len(), 2);
    for (m, w) in merged.tasks.iter().zip(&whole.tasks) {
        assert_eq!((&m.task, m.n, &m.docs), (&w.task, w.n, &w.docs));
        assert!((m.acc - w.acc).abs() < 1e-15 && (m.acc_norm - w.acc_norm).abs() < 1e-15);
    }
    assert!((merged.average - whole.average).abs() < 1e-15);
    // a document in both halves is refused, naming it
    let err = tasks::merge_suites(vec![first.clone(), first.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 100") && err.contains("piqa"),
        "{err}"
    );
    // a score without per-document outcomes cannot be merged
    let mut old = first.clone();
    old.tasks[0].docs.clear();
    let err = tasks::merge_suites(vec![old]).unwrap_err().to_string();
    assert!(err.contains("outcomes"), "{err}");

    // without: the average over the rest, `:test` matched by its task's name
    let three = suite_score(vec![
        task_score("arc_easy:test", docs(&[1, 0])),
        task_score("lambada", docs_acc(&[1, 1, 1])),
        task_score("sciq", docs_acc(&[0, 1])),
    ]);
    let w = tasks::without_tasks(three.clone(), &["lambada".into()]).unwrap();
    assert_eq!(
        w.tasks.iter().map(|t| t.task.as_str()).collect::<Vec<_>>(),
        ["arc_easy:test", "sciq"]
    );
    assert!((w.average - 0.5).abs() < 1e-15, "{}", w.average);
    let w = tasks::without_tasks(three.clone(), &["arc_easy".into()]).unwrap();
    assert_eq!(w.tasks.len(), 2);
    let err = tasks::without_tasks(three.clone(), &["hellaswag".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hellaswag") && err.contains("lambada"),
        "{err}"
    );
    let all: Vec<String> = ["arc_easy", "lambada", "sciq"].map(String::from).to_vec();
    assert!(tasks::without_tasks(three, &all).is_err());
}

#[test]
fn a_comparison_is_the_paired_loss_per_task_and_on_average() {
    let base = suite_score(vec![
        task_score("arc_easy", docs(&[1, 1, 0, 0, 1])),
        task_score("sciq", docs_acc(&[1, 0, 1, 1])),
    ]);
    let run = suite_score(vec![
        task_score("arc_easy", docs(&[1, 0, 0, 1, 0])),
        task_score("sciq", docs_acc(&[0, 0, 1, 1])),
    ]);
    let c = tasks::compare("plan", &base, &run).unwrap();
    assert_eq!(c.label, "plan");
    assert!((c.accuracy - run.average).abs() < 1e-15);
    // loss = base - run: arc_easy +0.2 (s.e. sqrt(0.14)), sciq +0.25 ([1,0,0,0]: variance
    // 0.25, of the mean 0.0625)
    assert_eq!(c.per_task.len(), 2);
    assert!((c.per_task[0].1.diff - 0.2).abs() < 1e-12);
    assert!((c.per_task[0].1.stderr - 0.14f64.sqrt()).abs() < 1e-12);
    assert!((c.per_task[1].1.diff - 0.25).abs() < 1e-12);
    assert!((c.per_task[1].1.stderr - 0.25).abs() < 1e-12);
    assert!((c.average.diff - 0.225).abs() < 1e-12, "{:?}", c.average);
    assert!((c.average.stderr - (0.14f64 + 0.0625).sqrt() / 2.0).abs() < 1e-12);
    assert!((c.average.diff - (base.average - run.average)).abs() < 1e-12);
    // another task list is refused
    let other = suite_score(vec![task_score("piqa", docs(&[1]))]);
    assert!(tasks::compare("x", &base, &other).is_err());
}
