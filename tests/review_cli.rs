//! Review of the runner (`examples/llama/`): bad input refused before the model loads (or
//! before the sensitivity / a later TP degree's hours), no panic on a malformed saved file, no
//! output written over another output or over an input, a sweep that keeps its points as it
//! goes, and `plan --budget-acc` on a Hugging Face folder. Runs the example binary as
//! tests/cli.rs does (skipped, saying so, when it is not built).

mod common;

use common::{run, runner};

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn refused(llama: &Path, dir: &Path, args: &[&str], want: &str) -> String {
    let (code, err) = run(llama, dir, args);
    assert_eq!(code, 1, "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: wanted {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

/// A saved sensitivity (all blocks alike) of `blocks` blocks measured at TP `tp`.
fn sensitivity_json(blocks: usize, tp: usize) -> String {
    let v = vec![0.1; blocks];
    serde_json::json!({"base_ppl": 10.0, "ppl_from": v, "sensitivity": v, "tp": tp}).to_string()
}

/// `sensitivity --from-json` indexed `ppl_from` by the blocks of `sensitivity`: a file with
/// fewer perplexities panicked (index out of bounds) halfway through the table.
#[test]
fn sensitivity_from_json_of_unequal_lengths_is_refused_not_a_panic() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("rcli-sens");
    std::fs::write(
        dir.join("s.json"),
        r#"{"base_ppl": 10, "ppl_from": [11], "sensitivity": [0.1, 0.2]}"#,
    )
    .unwrap();
    refused(
        &llama,
        &dir,
        &["sensitivity", "--from-json", "s.json", "--plot", "s.svg"],
        "2 sensitivities but 1 perplexities",
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Input that can only fail is refused before the model loads (a 70B model loads for
/// minutes; bench then ran its prefills, plan its sensitivity), and outputs that would land
/// on one file (or on the reference of --paired-with) are refused before the work. The model
/// here is a file that is no model: a check that comes only after loading names it instead.
#[test]
fn bad_input_and_colliding_outputs_are_refused_before_the_model_loads() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("rcli-early");
    std::fs::write(dir.join("bogus.gguf"), b"not a model").unwrap();
    std::fs::write(dir.join("plan.json"), "{}").unwrap();
    let reference = "{\"not\": \"read\"}";
    std::fs::write(dir.join("base.json"), reference).unwrap();
    std::fs::write(dir.join("s.json"), sensitivity_json(30, 2)).unwrap();
    let m = ["--model", "bogus.gguf"];
    let with_model = |args: &[&'static str]| [args, &m[..]].concat();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            with_model(&["perplexity", "--stride", "0"]),
            "--window 512 --stride 0: need",
        ),
        (
            with_model(&["perplexity", "--stride", "600"]),
            "0 < stride <= window",
        ),
        (
            with_model(&["perplexity", "--file", "nope.txt"]),
            "--file nope.txt",
        ),
        (
            with_model(&["eval", "--tasks", "arc_esy", "--limit", "1"]),
            "no task 'arc_esy'",
        ),
        (
            with_model(&["eval", "--paired-with", "base.json", "--out", "base.json"]),
            "is the --paired-with file",
        ),
        (
            with_model(&["bench", "--prompt", "2040"]),
            "need a KV cache of 2074 tokens, more than --ctx 2048",
        ),
        (
            with_model(&["plan", "--tp", "2"]),
            "give --budget-ppl PERCENT or --budget-acc POINTS",
        ),
        (
            with_model(&[
                "plan",
                "--tp",
                "2",
                "--budget-ppl",
                "5",
                "--limit",
                "3000",
                "--out",
                "fresh.json",
            ]),
            "3000 in the held-out split, and LAMBADA has 5153: give fewer",
        ),
        (
            with_model(&["plan", "--tp", "2", "--budget-acc", "1", "--out", "p.svg"]),
            "--out and the plot beside --out are both p.svg",
        ),
        (
            with_model(&[
                "plan",
                "--tp",
                "2",
                "--budget-acc",
                "1",
                "--b2b",
                "--out",
                "p.safetensors",
            ]),
            "--out and the distilled weights beside --out are both p.safetensors",
        ),
        (
            with_model(&["distill", "--spd", "plan.json", "--out", "d.safetensors"]),
            "are both d.safetensors",
        ),
        (
            with_model(&["sensitivity", "--out", "x.svg", "--plot", "x.svg"]),
            "--out and --plot are both x.svg",
        ),
        (
            vec!["sensitivity", "--from-json", "s.json", "--plot", "s.json"],
            "--from-json and --plot are both s.json",
        ),
    ];
    for (args, want) in &cases {
        let err = refused(&llama, &dir, args, want);
        assert!(!err.contains("loaded "), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("base.json")).unwrap(),
        reference
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("s.json")).unwrap(),
        sensitivity_json(30, 2)
    );
    for f in ["p.svg", "p.safetensors", "d.safetensors", "x.svg"] {
        assert!(!dir.join(f).exists(), "{f} was written");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `sweep` checks every TP degree of --tps before the first one's work (a TP the model cannot
/// run failed only when its turn came, hours in; one listed twice was measured twice), and
/// `--resume` refuses a file whose points it cannot read (they were dropped: the file, say a
/// plan given as --out by mistake, was then replaced). `--rank` is refused when the first TP
/// degree opens the model: a check that comes later does not run.
#[test]
fn sweep_refuses_bad_tps_and_a_file_it_cannot_resume_before_the_work() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("rcli-sweep");
    let base = [
        "sweep",
        "--fractions",
        "0",
        "--b2b-fractions=",
        "--lambada",
        "1",
        "--limit",
        "1",
        "--rank",
        "0",
    ];
    let sweep = |more: &[&'static str]| [&base[..], more].concat();
    refused(
        &llama,
        &dir,
        &sweep(&["--tps", "2,16"]),
        "--tps: TP 16 is not within 1..=9",
    );
    refused(
        &llama,
        &dir,
        &sweep(&["--tps", "2,3,2"]),
        "--tps: TP 2 is listed twice",
    );
    refused(
        &llama,
        &dir,
        &[
            "sweep",
            "--fractions=",
            "--b2b-fractions=",
            "--rank",
            "0",
            "--tps",
            "2",
        ],
        "nothing to measure",
    );
    refused(
        &llama,
        &dir,
        &sweep(&["--tps", "2", "--out", "sw.svg"]),
        "--out and the plot beside --out are both sw.svg",
    );
    let not_sweeps = [
        r#"{"version": 1, "layers": []}"#,
        r#"{"limit_per_task": 1, "points": [{"tp": 2}], "sensitivity": []}"#,
        r#"{"limit_per_task": 1, "points": [], "sensitivity": 3}"#,
    ];
    for old in not_sweeps {
        std::fs::write(dir.join("sw.json"), old).unwrap();
        refused(
            &llama,
            &dir,
            &sweep(&["--tps", "2", "--out", "sw.json", "--resume"]),
            "(not a file from `sweep`?): this run would replace it",
        );
        assert_eq!(std::fs::read_to_string(dir.join("sw.json")).unwrap(), old);
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A sweep writes its file after every point: before, a TP degree's points (zero-shot and
/// B2B) reached the file only when all its distillations were done, so a run stopped in the
/// last block lost hours. The sweep is stopped while it distils its first block.
#[test]
fn sweep_writes_each_point_as_it_is_measured() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("rcli-sweep-points");
    std::fs::write(dir.join("s.json"), sensitivity_json(30, 2)).unwrap();
    let mut child = Command::new(&llama)
        .args([
            "sweep",
            "--tps",
            "2",
            "--threads",
            "1",
            "--fractions",
            "0",
            "--b2b-fractions",
            "1",
            "--lambada",
            "1",
            "--limit",
            "1",
            "--sensitivity",
            "s.json",
            "--out",
            "sw.json",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the runner");
    let t0 = Instant::now();
    let file = dir.join("sw.json");
    let mut points = None;
    while t0.elapsed() < Duration::from_secs(45) {
        if let Ok(v) = std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()))
        {
            points = Some(v["points"].clone());
            // The plot is drawn just after the JSON is written: wait for it too.
            if dir.join("sw.svg").is_file() {
                break;
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().ok();
    child.wait().ok();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(still_running, "the sweep ended: {err}");
    let points = points.unwrap_or_else(|| panic!("no sw.json while distilling: {err}"));
    let p = &points.as_array().expect("a list of points")[..];
    assert_eq!(p.len(), 1, "{points}");
    assert_eq!(p[0]["method"], "zero-shot");
    assert_eq!(p[0]["spd_blocks"], 0);
    assert!(dir.join("sw.svg").is_file());
    std::fs::remove_dir_all(dir).ok();
}

/// `plan --budget-acc` took the tokenizer from a GGUF only: with a Hugging Face folder it
/// failed after the sensitivity ("accuracy budgets need a GGUF model"), though every other
/// subcommand reads the folder's tokenizer.json. A tiny folder model with a word-level
/// tokenizer now plans.
#[test]
fn plan_with_an_accuracy_budget_runs_on_a_hugging_face_folder() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let dir = common::tmpdir("rcli-plan-hf");
    let model = dir.join("model");
    let tiny = common::Tiny::small();
    common::write_hf_folder(&model, &tiny, 3);
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]",
                  "vocab": {"[UNK]": 0, "the": 1, "a": 2, ".": 3, ",": 4}}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("s.json"), sensitivity_json(tiny.n_layers, 2)).unwrap();
    let args = [
        "plan",
        "--model",
        "model",
        "--tp",
        "2",
        "--threads",
        "1",
        "--budget-acc",
        "100",
        "--limit",
        "1",
        "--sensitivity",
        "s.json",
        "--out",
        "p.json",
    ];
    let (code, err) = run(&llama, &dir, &args);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("p.json")).unwrap()).unwrap();
    assert_eq!(plan["layers"].as_array().map(Vec::len), Some(tiny.n_layers));
    // the held-out split's outcomes beside the plan, in eval's format: one document per
    // task, seven tasks, averages equal to the plan's held-out scores
    let outcome = &plan["notes"]["outcome"];
    for (file, score) in [
        ("p.heldout_base.json", "heldout_base"),
        ("p.heldout_plan.json", "heldout_score"),
    ] {
        let text =
            std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let suite: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tasks = suite["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 7, "{file}");
        assert!(
            tasks
                .iter()
                .all(|t| t["docs"].as_array().map(Vec::len) == Some(1)),
            "{file}"
        );
        let (avg, want) = (
            suite["average"].as_f64().unwrap(),
            outcome[score].as_f64().unwrap(),
        );
        assert!(
            (avg - want).abs() < 1e-12,
            "{file}: {avg} vs {score} {want}"
        );
    }
    assert!(
        err.contains("`compare --base p.heldout_base.json p.heldout_plan.json"),
        "{err}"
    );
    // with the plan moved away, a new plan to the same --out would overwrite the outcome
    // files: refused without --force, naming them
    std::fs::rename(dir.join("p.json"), dir.join("kept.json")).unwrap();
    std::fs::remove_file(dir.join("p.svg")).unwrap();
    let (code, err) = run(&llama, &dir, &args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the held-out outcomes beside --out p.heldout_base.json exists: add --force"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `perplexity --help` says how many LAMBADA passages it scores by default.
#[test]
fn perplexity_help_names_the_lambada_default() {
    let Some(llama) = runner() else {
        println!("skipped: examples/llama is not built (cargo test builds it)");
        return;
    };
    let out = Command::new(&llama)
        .args(["perplexity", "--help"])
        .output()
        .expect("run the runner");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Default when no --file: 50"), "{help}");
}
