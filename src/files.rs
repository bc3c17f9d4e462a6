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
