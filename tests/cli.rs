//! The runner (`examples/llama/`) refuses bad input before any long work, with a message
//! that says what to change. Runs the example binary cargo builds beside the tests (skipped,
//! saying so, when it is not built; `cargo test` alone neither builds nor rebuilds it, so run
//! `cargo build --release --example llama` first, as `scripts/test.sh` does, where a missing
//! runner fails instead).

mod common;

use common::{run, runner};

#[test]
fn bad_input_is_refused_before_the_work_with_what_to_change() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("cli");
    let plan = dir.join("input_plan.json"); // not the default --out of `plan`
    std::fs::write(&plan, "{}").unwrap();
    let plan = plan.to_str().unwrap();
    // a saved sensitivity of another TP degree, or of another model depth
    let sens = |blocks: usize, tp: usize| {
        let v = vec![0.1; blocks];
        serde_json::json!({"base_ppl": 10.0, "ppl_from": v, "sensitivity": v, "tp": tp}).to_string()
    };
    std::fs::write(dir.join("s3.json"), sens(30, 3)).unwrap();
    std::fs::write(dir.join("s5.json"), sens(5, 2)).unwrap();
    let plan_with = |file| {
        vec![
            "plan",
            "--tp",
            "2",
            "--budget-acc",
            "1",
            "--sensitivity",
            file,
        ]
    };
    let cases: Vec<(Vec<&str>, &str)> =
        vec![
        (plan_with("s3.json"), "measured at TP 3, this run is TP 2"),
        (plan_with("s5.json"), "has 5 blocks, the model 30"),
        (
            vec!["plan", "--tp", "2", "--budget-ppl", "5", "--reuse-baseline", "s5.json"],
            "--reuse-baseline s5.json: not a folder",
        ),
        (
            vec!["sweep", "--fractions", "0,1.5"],
            "SPD fraction 1.5 is not in [0, 1]",
        ),
        (
            vec!["sweep", "--lambada", "0"],
            "--lambada 0: must be at least 1",
        ),
        (
            vec!["sweep", "--tps", "2,3", "--sensitivity", "s3.json"],
            "sweep one TP degree per run",
        ),
        (
            vec![
                "sweep",
                "--tps",
                "2",
                "--sensitivity",
                "s3.json",
                "--limit",
                "1",
            ],
            "--sensitivity s3.json: the sensitivity was measured at TP 3, this run is TP 2",
        ),
        (
            vec!["distill", "--spd", plan, "--lr=-1", "--out", "d.json"],
            "learning rate must be a positive number",
        ),
        // negative numbers without `=` are values, not flags
        (
            vec!["distill", "--spd", plan, "--lr", "-1", "--out", "d.json"],
            "learning rate must be a positive number",
        ),
        (
            vec!["generate", "--top-p", "-0.5"],
            "top-p in (0, 1]; got 0 and -0.5",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-ppl", "-1"],
            "budget -1: a budget is 0 or more",
        ),
        (
            vec!["distill", "--spd", plan, "--epochs", "0", "--out", "d.json"],
            "at least one epoch",
        ),
        (
            vec![
                "distill",
                "--spd",
                plan,
                "--distill-calib",
                "4",
                "--holdout",
                "4",
                "--out",
                "d.json",
            ],
            "--holdout 4 leaves none of the 4 distillation passages (--distill-calib)",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--b2b",
                "--distill-calib",
                "3000",
            ],
            "--distill-calib 3000: BoolQ has 2939 distinct passages",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--b2b",
                "--distill-seq-len",
                "1",
            ],
            "--distill-seq-len 1: must be at least 2",
        ),
        (
            vec![
                "sweep",
                "--tps",
                "2",
                "--lc-fractions",
                "0.5",
                "--lc-rank",
                "0",
                "--out",
                "lc.json",
            ],
            "--lc-rank: linear compensation of rank 0",
        ),
        (
            vec!["sweep", "--fractions", "", "--b2b-fractions", "", "--out", "e.json"],
            "--lc-fractions are all empty: nothing to measure",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--compensate",
                "8",
                "--distill-text",
                "boolq,sciq",
            ],
            "--distill-text sciq: `eval` scores that task",
        ),
        (
            // a scored task's test split would leak into `eval --tasks arc_easy:test`
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--compensate",
                "8",
                "--distill-text",
                "openbookqa,arc_easy:test",
            ],
            "--distill-text arc_easy:test: `eval` scores that task",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-ppl", "5", "--compensate", "1000"],
            "--compensate: linear compensation of rank 1000: the rank is 1 to the hidden size 576",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--compensate",
                "8",
                "--distill-calib",
                "4",
                "--holdout",
                "4",
            ],
            "--holdout 4 leaves none of the 4 distillation passages (--distill-calib)",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--b2b",
                "--holdout",
                "1",
                "--patience",
                "0",
            ],
            "patience of at least one epoch",
        ),
        (
            vec!["distill", "--spd", plan, "--out", plan],
            "is the input plan",
        ),
        (
            vec!["distill", "--spd", "all", "--out", "d.json"],
            "distill needs --spd PLAN.json",
        ),
        // results that take long to make are not overwritten without --force
        (
            vec!["distill", "--spd", plan, "--out", "s3.json"],
            "--out s3.json exists: add --force",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-acc", "1", "--out", "s5.json"],
            "--out s5.json exists: add --force",
        ),
        (
            vec!["sensitivity", "--out", "s3.json"],
            "--out s3.json exists: add --force",
        ),
        (
            vec!["eval", "--split", "2"],
            "--split 2: 0 (the search half) or 1",
        ),
        (
            vec!["eval", "--limit", "0"],
            "--limit 0: must be at least 1",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-ppl", "5", "--max-task-drop", "3"],
            "--max-task-drop caps each task's accuracy drop: it needs --budget-acc",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-acc", "1", "--max-task-drop", "-1"],
            "--max-task-drop -1: a cap on each task's drop is 0 points or more",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-acc", "1", "--search-z", "-1"],
            "--search-z -1: a margin in standard errors is a finite number >= 0",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-acc",
                "1",
                "--max-task-drop",
                "3",
                "--task-z",
                "-0.5",
            ],
            "--task-z -0.5: a margin in standard errors is a finite number >= 0",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-acc", "1", "--heldout-limit", "0"],
            "--heldout-limit 0: must be at least 1",
        ),
        (
            // LAMBADA has 5,153 passages: 200 searched leave too few for 5,000 held out
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--limit",
                "200",
                "--heldout-limit",
                "5000",
            ],
            "--limit 200, --heldout-limit 5000: a perplexity budget scores 200 LAMBADA passages \
             in the search split and 5000 in the held-out split, and LAMBADA has 5153",
        ),
        (
            vec!["sensitivity", "--calib", "0"],
            "--calib 0: must be at least 1",
        ),
        (
            vec!["sensitivity", "--seq-len", "1"],
            "--seq-len 1: must be at least 2",
        ),
        (
            vec!["sensitivity", "--t1", "5", "--t2", "1"],
            "--t1 5 is above --t2 1",
        ),
        (vec!["sensitivity", "--spd", "all"], "drop --spd all"),
        (
            vec!["plan", "--tp", "1", "--budget-acc", "1"],
            "plan for TP 2 or more",
        ),
        (
            vec!["plan", "--tp", "2", "--budget-ppl=-5"],
            "a budget is 0 or more",
        ),
        (
            vec![
                "plan",
                "--tp",
                "2",
                "--budget-acc",
                "1",
                "--b2b",
                "--lr",
                "0",
            ],
            "learning rate",
        ),
        (
            vec!["perplexity", "--lambada", "0"],
            "--lambada 0: give at least 1",
        ),
        (
            vec!["perplexity", "--ctx", "100"],
            "--window 512 is longer than the KV cache",
        ),
        (
            vec!["bench", "--steps", "0"],
            "--steps 0: must be at least 1",
        ),
        (vec!["generate", "--system", "be brief"], "add --chat"),
        (vec!["generate", "--threads", "0"], "--threads 0"),
        (
            vec!["generate", "--model", "/nonexistent.gguf"],
            "no such file or folder",
        ),
        (
            vec!["perplexity", "--spd", "no-such-plan"],
            "not `none`, `all`, `layers:I,J-K`",
        ),
    ];
    for (args, want) in &cases {
        let (code, err) = run(&llama, &dir, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: wanted {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // nothing was written by the refused runs
    assert!(!dir.join("d.json").exists() && !dir.join("plan.svg").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// An existing sweep file is kept: added to only with --resume, and only by a run with the
/// same settings.
#[test]
fn sweep_keeps_an_existing_file() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("cli-sweep");
    let old = r#"{"limit_per_task": 1, "lambada_passages": 1, "points": [], "sensitivity": []}"#;
    std::fs::write(dir.join("sw.json"), old).unwrap();
    let base = [
        "sweep",
        "--tps",
        "2",
        "--fractions",
        "0",
        "--b2b-fractions=",
        "--lambada",
        "1",
        "--out",
        "sw.json",
    ];
    let (code, err) = run(&llama, &dir, &[&base[..], &["--limit", "1"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sw.json exists: add --resume"), "{err}");
    let (code, err) = run(
        &llama,
        &dir,
        &[&base[..], &["--limit", "2", "--resume"]].concat(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("other settings (limit_per_task 1 there, 2 here)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(dir.join("sw.json")).unwrap(), old);
    std::fs::remove_dir_all(dir).ok();
}

/// `--iso auto` calibrates on prefills that fit the KV cache: with `--ctx 100` (below the
/// default 256-token calibration prefill) generation still runs; at TP 1 ISO is off.
#[test]
fn iso_auto_calibrates_within_a_small_kv_cache() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("cli_iso_ctx");
    let (code, err) = run(
        &llama,
        &dir,
        &[
            "generate", "--tp", "2", "--iso", "auto", "--ctx", "100", "-n", "2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ISO cost model"), "{err}");
    let (code, err) = run(&llama, &dir, &["generate", "--iso", "auto", "-n", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ISO: off at TP 1"), "{err}");
}

/// `plan` saves the sensitivity it measured beside `--out` (minutes of work, and with
/// `--compensate` the only record of SPD + LC's block order); `--sensitivity` reuses it and
/// gives the same plan without measuring; the saved file is not overwritten without --force.
/// On the real model with tiny settings (a perplexity budget on 2 LAMBADA passages).
#[test]
fn plan_saves_its_measured_sensitivity_for_reuse() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("plan-sens");
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--tp",
            "2",
            "--threads",
            "2",
            "--budget-ppl",
            "5",
            "--limit",
            "2",
            "--calib",
            "2",
            "--seq-len",
            "32",
        ];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(&llama)
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("run the runner");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    };
    let read = |name: &str| -> serde_json::Value {
        let text =
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        serde_json::from_str(&text).unwrap()
    };

    let (ok, err) = plan(&["--out", "p.json"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("wrote p.sensitivity.json (reuse it with --sensitivity)"),
        "{err}"
    );
    let sens = read("p.sensitivity.json");
    let per_block = sens["sensitivity"].as_array().unwrap();
    assert_eq!(per_block.len(), 30);
    assert_eq!(sens["ppl_from"].as_array().unwrap().len(), 30);
    assert_eq!(sens["tp"], 2);
    assert_eq!(sens["passages"], 2);
    // the plan's per-layer sensitivities are the saved ones
    let p = read("p.json");
    let in_plan: Vec<&serde_json::Value> = p["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["sensitivity"])
        .collect();
    assert_eq!(in_plan, per_block.iter().collect::<Vec<_>>());

    // reused: the same plan, nothing measured, no second sensitivity file
    let (ok, err) = plan(&["--sensitivity", "p.sensitivity.json", "--out", "q.json"]);
    assert!(ok, "{err}");
    assert!(!err.contains("wrote q.sensitivity.json"), "{err}");
    assert!(!dir.join("q.sensitivity.json").exists());
    assert_eq!(read("q.json")["layers"], p["layers"]);

    // --reuse-baseline: the first plan keeps the TP baselines, the next reuses them and
    // makes the same plan
    let reuse = [
        "--sensitivity",
        "p.sensitivity.json",
        "--reuse-baseline",
        "base",
    ];
    let (ok, err) = plan(&[&reuse[..], &["--out", "r.json"]].concat());
    assert!(ok, "{err}");
    assert_eq!(err.matches("kept in base/").count(), 2, "{err}");
    let (ok, err) = plan(&[&reuse[..], &["--out", "s.json"]].concat());
    assert!(ok, "{err}");
    assert_eq!(err.matches("reused base/").count(), 2, "{err}");
    assert_eq!(read("s.json")["layers"], p["layers"]);
    assert_eq!(read("s.json")["outcome"], read("r.json")["outcome"]);

    // a new plan beside an existing sensitivity file refuses before any work
    std::fs::remove_file(dir.join("p.json")).unwrap();
    let (ok, err) = plan(&["--out", "p.json"]);
    assert!(!ok);
    assert!(
        err.contains("the sensitivity beside --out p.sensitivity.json exists: add --force"),
        "{err}"
    );
}

/// `compare` pairs `eval --out` scores (no model): `+`-joined halves act as one run, the
/// table, JSON and verdicts carry the paired losses, the plot is drawn, and bad input (other
/// documents, an unknown --without task, an output over an input) is refused with a reason.
#[test]
fn compare_pairs_saved_scores_and_draws_them() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    use syncdrop::tasks::{suite_score, task_score, DocOutcome};
    let dir = common::tmpdir("compare");
    let outcomes = |first: u64, bits: &[u8]| -> Vec<DocOutcome> {
        bits.iter()
            .enumerate()
            .map(|(i, b)| DocOutcome {
                id: first + i as u64,
                acc: *b == 1,
                acc_norm: *b == 1,
            })
            .collect()
    };
    let save = |name: &str, tasks: Vec<(&str, u64, &[u8])>| {
        let s = suite_score(
            tasks
                .into_iter()
                .map(|(t, first, bits)| task_score(t, outcomes(first, bits)))
                .collect(),
        );
        std::fs::write(dir.join(name), serde_json::to_string(&s).unwrap()).unwrap();
    };
    // base and plan, each in two files: sciq split across them, lambada only in the second
    save("base_a.json", vec![("sciq", 0, &[1, 1, 1, 0])]);
    save(
        "base_b.json",
        vec![("sciq", 4, &[1, 1]), ("lambada", 0, &[0, 0, 1, 0])],
    );
    save("plan_a.json", vec![("sciq", 0, &[1, 0, 1, 0])]);
    save(
        "plan_b.json",
        vec![("sciq", 4, &[0, 1]), ("lambada", 0, &[1, 1, 1, 0])],
    );
    let args = [
        "compare",
        "--base",
        "base_a.json+base_b.json",
        "--budget-acc",
        "1",
        "--out",
        "cmp.json",
        "--plot",
        "cmp.svg",
        "spd=plan_a.json+plan_b.json",
        "base_a.json+base_b.json",
    ];
    // (success, stdout, stderr) of a compare run
    let compare = |args: &[&str]| {
        let out = std::process::Command::new(&llama)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run the runner");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = compare(&args);
    assert!(ok, "{stderr}");
    // sciq: base - plan = [0,1,0,0,1,0]: +33.3 pt; lambada [-1,-1,0,0]: -50 pt; the
    // average (-8.33 pt) with s.e. sqrt(s_sciq^2/6 + s_lambada^2/4) / 2
    let sciq: [f64; 6] = [0., 1., 0., 0., 1., 0.];
    let lam: [f64; 4] = [-1., -1., 0., 0.];
    let var = |d: &[f64]| {
        let m = d.iter().sum::<f64>() / d.len() as f64;
        d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (d.len() - 1) as f64 / d.len() as f64
    };
    let se = 100.0 * (var(&sciq) + var(&lam)).sqrt() / 2.0;
    assert!(
        stdout.contains("| sciq | 6 | 83.3% | +33.3 +- "),
        "{stdout}"
    );
    assert!(
        stdout.contains("| lambada | 4 | 25.0% | -50.0 +- "),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("**-8.33 +- {se:.2}**")),
        "{stdout}"
    );
    // the baseline against itself: no loss, within any budget
    assert!(stdout.contains("base_a: within budget"), "{stdout}");
    assert!(stdout.contains("spd: "), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cmp.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["label"], "spd");
    assert!((runs[0]["average"]["diff"].as_f64().unwrap() + 1.0 / 12.0).abs() < 1e-12);
    assert_eq!(runs[1]["average"]["diff"].as_f64().unwrap(), 0.0);
    let svg = std::fs::read_to_string(dir.join("cmp.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("lambada") && svg.contains("spd"));

    // without lambada: the sciq loss alone
    let (ok, stdout, _) = compare(&[
        "compare",
        "--base",
        "base_a.json+base_b.json",
        "--without",
        "lambada",
        "plan_a.json+plan_b.json",
    ]);
    assert!(ok);
    assert!(
        stdout.contains("other than lambada") && stdout.contains("**+33.33 +- "),
        "{stdout}"
    );
    assert!(!stdout.contains("| lambada |"), "{stdout}");

    // refusals
    for (args, want) in [
        (
            vec![
                "compare",
                "--base",
                "base_a.json",
                "plan_a.json+plan_b.json",
            ],
            "tasks",
        ),
        (
            vec![
                "compare",
                "--base",
                "base_a.json",
                "--without",
                "piqa",
                "plan_a.json",
            ],
            "--without piqa: no such task",
        ),
        (
            vec![
                "compare",
                "--base",
                "base_a.json+base_a.json",
                "plan_a.json",
            ],
            "document 0 is also in an earlier score",
        ),
        (
            vec![
                "compare",
                "--base",
                "base_a.json",
                "--out",
                "plan_a.json",
                "plan_a.json",
            ],
            "--out plan_a.json is the input plan_a.json",
        ),
        (
            vec!["compare", "--base", "missing.json", "plan_a.json"],
            "missing.json",
        ),
        (
            vec![
                "compare",
                "--base",
                "base_a.json",
                "--budget-acc",
                "-1",
                "plan_a.json",
            ],
            "--budget-acc -1",
        ),
    ] {
        let (code, err) = run(&llama, &dir, &args);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
