//! Writing result files so that nothing is lost half-way, and naming file contents.
//!
//! A plan, a sweep or an evaluation can take an hour to compute; a crash, a full disk or a
//! Ctrl-C while its file is written must not leave a truncated file where the previous good
//! one was. [`write_atomic`] writes a temporary file beside the target, flushes it to disk and
//! renames it over the target (atomic on POSIX file systems): readers see the old file or the
//! new one, never half of one.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (temporary file in the same folder, fsync, rename).
/// The file gets the mode any new file of this process gets (0666 less the umask).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_beside(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// `.NAME.PID.tmp` in `path`'s folder (the same file system, so the rename is atomic).
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// `v` as indented JSON, except that an object or array holding only scalars (numbers,
/// strings, booleans, nulls) is written on one line: `{"id": 428, "acc": true}`.
///
/// Result files hold long lists of small records (an evaluation's per-document outcomes, a
/// plan's layers, a sensitivity's per-block values): one record per line keeps them
/// readable and diffable at about 60% of `serde_json::to_string_pretty`'s size, which
/// matters because the repository travels to the GPU machine with every call.
pub fn to_json_pretty_compact(v: &impl serde::Serialize) -> String {
    let v = serde_json::to_value(v).expect("a serialisable value");
    let mut out = String::new();
    write_value(&mut out, &v, 0);
    out.push('\n');
    out
}

fn is_scalar(v: &serde_json::Value) -> bool {
    !matches!(
        v,
        serde_json::Value::Array(_) | serde_json::Value::Object(_)
    )
}

fn write_value(out: &mut String, v: &serde_json::Value, depth: usize) {
    use serde_json::Value;
    let scalar = |v: &Value| serde_json::to_string(v).expect("JSON scalar");
    let key = |k: &str| serde_json::to_string(k).expect("JSON string");
    let pad = |out: &mut String, d: usize| out.extend(std::iter::repeat_n("  ", d));
    match v {
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Object(o) if o.is_empty() => out.push_str("{}"),
        Value::Array(a) if a.iter().all(is_scalar) => {
            let items: Vec<String> = a.iter().map(scalar).collect();
            out.push_str(&format!("[{}]", items.join(", ")));
        }
        Value::Object(o) if o.values().all(is_scalar) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", key(k), scalar(v)))
                .collect();
            out.push_str(&format!("{{{}}}", items.join(", ")));
        }
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                pad(out, depth + 1);
                write_value(out, x, depth + 1);
                out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
            }
            pad(out, depth);
            out.push(']');
        }
        Value::Object(o) => {
            out.push_str("{\n");
            for (i, (k, x)) in o.iter().enumerate() {
                pad(out, depth + 1);
                out.push_str(&key(k));
                out.push_str(": ");
                write_value(out, x, depth + 1);
                out.push_str(if i + 1 < o.len() { ",\n" } else { "\n" });
            }
            pad(out, depth);
            out.push('}');
        }
        _ => out.push_str(&scalar(v)),
    }
}

/// sha256 of a file's bytes, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_puts_scalar_records_on_one_line_and_round_trips() {
        let v = serde_json::json!({
            "tasks": [{"task": "arc_easy", "n": 2, "acc": 0.5,
                       "docs": [{"id": 4, "acc": true}, {"id": 1, "acc": false}]}],
            "sensitivity": [1.5, -0.25, 3e-9],
            "zeta_before_alpha": {"z": "a \"quoted\" name", "a": null},
            "empty": [], "nothing": {}, "nested": [[1, 2], [3]]
        });
        let text = to_json_pretty_compact(&v);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        assert!(
            text.contains("\n        {\"id\": 4, \"acc\": true},\n"),
            "{text}"
        );
        assert!(
            text.contains("\"sensitivity\": [1.5, -0.25, 3e-9],"),
            "{text}"
        );
        // declaration order, not sorted (serde_json's preserve_order)
        assert!(
            text.contains("{\"z\": \"a \\\"quoted\\\" name\", \"a\": null}"),
            "{text}"
        );
        assert!(text.contains("\"empty\": [],") && text.contains("\"nothing\": {},"));
        assert!(text.ends_with("}\n"));
        // smaller than serde_json's pretty form (the reason it exists)
        assert!(text.len() < serde_json::to_string_pretty(&v).unwrap().len());
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("syncdrop-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("plan.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("plan.json")]);
        // a folder that does not exist: an error naming the target, nothing written
        let e = write_atomic(&dir.join("no/such/dir/x.json"), b"x").unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
        assert_eq!(
            sha256_file(&p).unwrap(),
            hex(&Sha256::digest(b"second, longer"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
