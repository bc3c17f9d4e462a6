//! How ranks that share no memory agree on one opaque 128-byte id (NCCL's unique id, which
//! holds rank 0's bootstrap address): rank 0 makes it, every other rank receives it.
//!
//! Three ways, one contract ([`Rendezvous::exchange`]): every rank returns the same bytes or
//! an error that says what went wrong, within the wait it was given; nothing hangs.
//! - [`Rendezvous::InProcess`]: the rank threads of one process (through memory).
//! - [`Rendezvous::File`]: processes on one machine or a shared filesystem. Rank 0 clears an
//!   earlier run's answers and writes the id file atomically (mode 0600: a line with the
//!   world size, one with its terms, the id); every other rank answers it in
//!   `<path>.ack-<rank>` (`ok <tag>`, or `refused <tag> <reason>`), and once all have
//!   answered `ok` rank 0 writes its verdict `<path>.go` (`ok <tag>`, else `error <tag>
//!   <reason>`); a rank takes the id only on an `ok` for it. The tag names one id, so
//!   answers and verdicts of an earlier run are ignored, and a stale id file is answered
//!   but never used: a rank waits until a starting rank 0 replaces it. So a missing rank
//!   is named at rank 0, a refusal stops rank 0 and every rank, and the exchange doubles as
//!   a start barrier, as over TCP. Rank 0 removes the id file before an `ok` (so no crash
//!   can leave an id beside an `ok` for it) and the answers once NCCL has started; the
//!   verdict stays until the next rank 0 clears it. One run per path at a time: rank 0
//!   holds `<path>.lock` (flock, released by the kernel if it dies) from before it clears
//!   the path until [`Rendezvous::finish`], so a second rank 0 on the path is refused, and
//!   a peer can tell an `error` verdict whose rank 0 died before clearing its id (its id
//!   stays, its lock free for 2 s: ignored, the peer waits for the next rank 0) from one
//!   whose rank 0 is still there or stopped cleanly. Likewise each peer holds
//!   `<path>.lock-<rank>` from before it answers until `finish`, so a second process
//!   answering as the same rank (say, a peer of an earlier run that outlived its rank 0) is
//!   refused, naming the first, instead of sharing its answer file. On NFS,
//!   attribute caching can delay each of the three hops (id, answer, verdict) by its cache
//!   time (`lookupcache=positive`, `actimeo`); ranks on several machines are better served
//!   by TCP.
//! - [`Rendezvous::Tcp`]: processes anywhere rank 0's address is reachable (the usual
//!   `MASTER_ADDR:PORT` of multi-node launchers). Rank 0 listens on every interface at that
//!   port; each other rank connects to `host:port` (retrying until rank 0 is up and the name
//!   resolves), says who it is, and once **all** ranks have arrived rank 0 sends the id to
//!   each (a rank whose connection died meanwhile may reconnect, e.g. after a restart). If
//!   rank 0 gives up, every connected rank is told why (and ranks still starting, for 2 s). So a missing rank is named at rank 0, a rank from another run (other
//!   world size) or a duplicate rank is refused with a reason, and the exchange doubles as a
//!   start barrier. Nothing is left on disk.
//!
//! Every rank also brings its [`Terms`]: the options that decide which collectives it will
//! issue (model, head layout, SPD plan, ISO mode, all-reduce path, CUDA graphs, ...). Ranks
//! in separate processes are started separately and can be started differently; a rank that
//! differs from rank 0 would pair its collectives with the wrong ones of its peers (wrong
//! sums or a hang), so the exchange stops rank 0 and every rank with an error that names
//! each difference.
//!
//! Lines on the wire (newline-terminated), then the raw id:
//! `syncdrop-rdv v2 world=W rank=R terms: k=v k=v` (peer -> rank 0), `syncdrop-rdv v2
//! world=W` + 128 bytes (rank 0 -> peer) or `error: <reason>` (rank 0 -> peer, then it
//! closes).

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The id ranks agree on.
pub type Id = [u8; 128];

/// How long ranks wait for each other by default (`SYNCDROP_RENDEZVOUS_TIMEOUT`, seconds,
/// overrides it): long enough for processes started by hand one after another.
pub fn default_wait() -> Duration {
    std::env::var("SYNCDROP_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(120), Duration::from_secs_f64)
}

/// How ranks exchange the id.
#[derive(Clone, Debug)]
pub enum Rendezvous {
    /// Threads of one process: rank 0 publishes the id here, the others wait for it.
    InProcess(Arc<(Mutex<Option<Id>>, Condvar)>),
    /// Separate processes with a common filesystem: rank 0 writes the id to this file.
    File(PathBuf),
    /// Separate processes anywhere: rank 0 listens on this address (`host:port`), the others
    /// connect to it.
    Tcp(String),
}

impl Rendezvous {
    /// A rendezvous for the rank threads of one process, with no id yet: give each rank a
    /// clone. It serves one exchange (the id rank 0 publishes stays).
    pub fn in_process() -> Rendezvous {
        Rendezvous::InProcess(Arc::new((Mutex::new(None), Condvar::new())))
    }

    /// Rank 0 calls `make` and hands its id to every other rank; the others return it.
    /// Fails (never hangs) when the ranks have not all met within `wait`, and when a rank's
    /// `terms` (with the syncdrop build added: version and source id, [`crate::BUILD`])
    /// differ from rank 0's: in separate processes (file, TCP) rank 0 and the differing rank
    /// both stop with an error naming each difference. (The threads of one process share
    /// their options; `terms` is not compared in process.)
    pub fn exchange(
        &self,
        rank: usize,
        world: usize,
        wait: Duration,
        terms: &Terms,
        make: impl FnOnce() -> Result<Id>,
    ) -> Result<Id> {
        let terms = terms.versioned();
        if rank >= world {
            return Err(Error::InvalidArgument(format!(
                "rendezvous: rank {rank} is not a rank of a world of {world}"
            )));
        }
        if rank == 0 {
            let id = make()?;
            match self {
                Rendezvous::InProcess(cell) => {
                    *cell.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                    cell.1.notify_all();
                }
                Rendezvous::File(path) => serve_file(path, world, &terms, &id, wait)?,
                Rendezvous::Tcp(addr) => serve(addr, world, &terms, &id, wait)?,
            }
            return Ok(id);
        }
        match self {
            Rendezvous::InProcess(cell) => {
                let (lock, cv) = &**cell;
                let slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                let (slot, _) = cv
                    .wait_timeout_while(slot, wait, |s| s.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                slot.ok_or_else(|| {
                    Error::Comm(format!(
                        "rendezvous: rank 0 published no id within {wait:?}"
                    ))
                })
            }
            Rendezvous::File(path) => fetch_file(path, rank, world, &terms, wait),
            Rendezvous::Tcp(addr) => fetch(addr, rank, world, &terms, wait),
        }
    }

    /// What the ranks of a run (in this process) that die after the rendezvous leave
    /// behind: the kernel releases their locks, their files stay. For tests of what later
    /// runs make of leftovers; a running rank calls [`Rendezvous::finish`] instead.
    #[doc(hidden)]
    pub fn abandon(&self) {
        if let Rendezvous::File(path) = self {
            held_locks().retain(|(p, _), lock| {
                if p != path {
                    return true;
                }
                drop(lock.hold.take()); // unlock, keep the lock file
                false
            });
        }
    }

    /// What every rank of `world` does once NCCL has started (or failed to). Through a file,
    /// rank 0 removes the answers (and an id file a failure left), then releases its lock on
    /// the path (held since it served); a peer releases its claim on its rank (held since it
    /// answered). The verdict stays, for ranks that have not read it yet; it names an id
    /// whose file is gone, so no later run can use it, and the next rank 0 clears it. (TCP
    /// and in-process leave nothing behind; a world of 1 wrote nothing to remove.)
    pub fn finish(&self, rank: usize, world: usize) {
        if let (2.., Rendezvous::File(path)) = (world, self) {
            if rank == 0 {
                remove_id_and_answers(path);
            }
            // then the lock (no other rank 0 could clear or replace the files above
            // meanwhile), or the claim
            held_locks().remove(&(path.clone(), rank));
        }
    }
}

// ---------------------------------------------------------------------------------- terms

/// What ranks started separately must have in common besides the world size: the options
/// that decide which collectives each rank issues, in what order and how large. A rank that
/// differs would pair its collectives with the wrong ones of its peers (wrong sums, or a
/// hang), so rank 0 compares every rank's terms with its own at the rendezvous and stops
/// the run naming each difference. `key=value` pairs; [`Rendezvous::exchange`] adds the
/// syncdrop build (version and source id) itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Terms(Vec<(String, String)>);

/// Percent-encodes what would break a `key=value key=value` line: whitespace, control
/// characters, `%` (and `=` in keys).
fn encode_term(s: &str, key: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() || c == '%' || (key && c == '=') {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                out += &format!("%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The text [`encode_term`] encoded (for messages); a malformed escape stays as it is.
fn decode_term(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Terms {
    /// No terms (the exchange still compares the syncdrop build).
    pub fn new() -> Terms {
        Terms::default()
    }

    /// Sets an encoded key to an encoded value (replacing an earlier value).
    fn put(&mut self, k: String, v: String) {
        match self.0.iter_mut().find(|(old, _)| *old == k) {
            Some(slot) => slot.1 = v,
            None => self.0.push((k, v)),
        }
    }

    /// Sets `key` (replacing an earlier value).
    pub fn set(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Terms {
        self.put(
            encode_term(key, true),
            encode_term(&value.to_string(), false),
        );
        self
    }

    /// `self` with `key` set.
    pub fn with(mut self, key: &str, value: impl std::fmt::Display) -> Terms {
        self.set(key, value);
        self
    }

    /// `self` with the syncdrop build first (version and source id, [`crate::BUILD`]: what
    /// every exchange compares too).
    fn versioned(&self) -> Terms {
        Terms::new().with("syncdrop", crate::BUILD).extended(self)
    }

    /// `self` with every pair of `other` set too (`other`'s values win).
    pub fn extended(mut self, other: &Terms) -> Terms {
        for (k, v) in &other.0 {
            self.put(k.clone(), v.clone());
        }
        self
    }

    /// The value of `key` as written on the wire (percent-encoded), if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        let k = encode_term(key, true);
        self.0
            .iter()
            .find(|(m, _)| *m == k)
            .map(|(_, v)| v.as_str())
    }

    /// One line of `key=value` pairs separated by spaces.
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The pairs of a line [`Terms::encode`] wrote; a word without `=` is a key with an
    /// empty value.
    pub fn decode(line: &str) -> Terms {
        Terms(
            line.split_whitespace()
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (w.to_string(), String::new()),
                })
                .collect(),
        )
    }

    /// Each key whose value differs between `self` (called `me`) and `other` (`them`),
    /// as `key (me: value, them: value)`; empty when they agree (order does not matter).
    pub fn differences(&self, me: &str, other: &Terms, them: &str) -> Vec<String> {
        let keys = self.0.iter().chain(&other.0).map(|(k, _)| k.as_str()).fold(
            Vec::new(),
            |mut ks: Vec<&str>, k| {
                if !ks.contains(&k) {
                    ks.push(k);
                }
                ks
            },
        );
        let value = |t: &Terms, k: &str| t.0.iter().find(|(m, _)| m == k).map(|(_, v)| v.clone());
        let shown = |v: Option<String>| v.map_or("(unset)".to_string(), |v| decode_term(&v));
        keys.into_iter()
            .filter_map(|k| {
                let (a, b) = (value(self, k), value(other, k));
                (a != b).then(|| {
                    format!(
                        "{} ({me}: {}, {them}: {})",
                        decode_term(k),
                        shown(a),
                        shown(b)
                    )
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------- file

const FILE_MAGIC: &str = "syncdrop-nccl-id v2";
/// How often file readers and rank 0 look again.
const POLL: Duration = Duration::from_millis(50);
/// How long an `error` verdict's id file must stand with its lock free before a peer takes
/// both for a dead rank 0's leftovers: twice a stopping rank 0's grace (20 polls), which
/// also covers filesystems whose locks are local to each machine (a peer elsewhere sees
/// every lock free).
const ORPHAN_AFTER: Duration = Duration::from_secs(2);

/// A file beside the id file: `<path>.<suffix>`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(format!(".{suffix}"));
    PathBuf::from(p)
}

/// The first 8 bytes of `bytes`' sha256, in hex: a short name for a longer value in terms
/// and tags.
pub(crate) fn short_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::files::hex(&sha2::Sha256::digest(bytes)[..8])
}

/// A short name for one id (its bytes hold rank 0's address and a random magic): answers
/// and the verdict carry it, so that anything written for another id (an earlier run's) is
/// ignored.
fn id_tag(id: &Id) -> String {
    short_digest(id)
}

/// Write `bytes` under a name no other writer uses, readable by this user only (the id
/// holds rank 0's address), then rename: readers see all of it or nothing.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = beside(path, &format!("tmp-{}", std::process::id()));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Removes rank 0's id file, every rank's answer (`<path>.ack-<rank>`) and what a writer
/// that died mid-write left (`<path>.tmp-*`, `<path>.go.tmp-*`).
fn remove_id_and_answers(path: &Path) {
    let _ = std::fs::remove_file(path);
    for (suffix, p) in beside_files(path) {
        if ["ack-", "tmp-", "go.tmp-"]
            .iter()
            .any(|s| suffix.starts_with(s))
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The files beside `path` named `<its name>.<suffix>`, as (suffix, path).
fn beside_files(path: &Path) -> Vec<(String, PathBuf)> {
    let Some(name) = path.file_name() else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let Ok(entries) = std::fs::read_dir(dir.unwrap_or(Path::new("."))) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            Some((n.strip_prefix(&prefix)?.to_string(), e.path()))
        })
        .collect()
}

/// The parts of a complete id file: first line, terms line, id. `None` while incomplete.
fn split_id_file(bytes: &[u8]) -> Option<(String, String, Id)> {
    let mut lines = bytes.splitn(3, |&c| c == b'\n');
    let (head, terms, id) = (lines.next()?, lines.next()?, lines.next()?);
    Some((
        String::from_utf8_lossy(head).into_owned(),
        String::from_utf8_lossy(terms).into_owned(),
        <Id>::try_from(id).ok()?,
    ))
}

/// The id in a rendezvous file's bytes: `Some` when complete, `None` when not yet (a reader
/// retries), an error for a file that is not a syncdrop id file, or was written for another
/// world size, by another syncdrop version or by a rank 0 whose terms differ from `terms`
/// (each difference named).
pub fn parse_id_file(bytes: &[u8], world: usize, terms: &Terms, path: &Path) -> Result<Option<Id>> {
    check_id_file(bytes, world, terms, path, "this rank")
}

/// [`parse_id_file`], naming the reader `me` in the differences it lists.
fn check_id_file(
    bytes: &[u8],
    world: usize,
    terms: &Terms,
    path: &Path,
    me: &str,
) -> Result<Option<Id>> {
    let first = bytes.split(|&c| c == b'\n').next().unwrap_or_default();
    let complete_line = first.len() < bytes.len();
    // a first line still being written may be a prefix of ours
    let ours = if complete_line {
        first.starts_with(format!("{FILE_MAGIC} ").as_bytes())
    } else {
        FILE_MAGIC.as_bytes().starts_with(first) || first.starts_with(FILE_MAGIC.as_bytes())
    };
    if !ours {
        let other_version = first.starts_with(b"syncdrop-nccl-id v");
        return Err(Error::Comm(format!(
            "{} is not a syncdrop NCCL id file{}",
            path.display(),
            if other_version {
                " of this version (written by another syncdrop version?)"
            } else {
                ""
            }
        )));
    }
    let Some((head, theirs, id)) = split_id_file(bytes) else {
        return Ok(None);
    };
    if head != format!("{FILE_MAGIC} world={world}") {
        return Err(Error::Comm(format!(
            "the id file was written for another world size ({head}), {me}'s is {world}"
        )));
    }
    let Some(theirs) = theirs.strip_prefix("terms: ") else {
        return Err(Error::Comm(format!(
            "{} is not a syncdrop NCCL id file (no terms line)",
            path.display()
        )));
    };
    let diff = terms
        .versioned()
        .differences(me, &Terms::decode(theirs), "rank 0");
    if !diff.is_empty() {
        return Err(Error::Comm(format!(
            "the id file was written by a rank 0 started with other options: {}",
            diff.join("; ")
        )));
    }
    Ok(Some(id))
}

/// The reply in `file` (a rank's answer `ok <tag>` / `refused <tag> <reason>`, or rank 0's
/// verdict `ok <tag>` / `error <tag> <reason>`) if there is one for the id `tag`: Ok to go
/// on, Err with the reason to stop.
fn reply_for(file: &Path, tag: &str) -> Option<std::result::Result<(), String>> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut words = text.trim_end().splitn(3, ' ');
    match (words.next()?, words.next()?, words.next()) {
        (_, t, _) if t != tag => None, // a reply about another id
        ("ok", _, _) => Some(Ok(())),
        ("refused" | "error", _, why) => Some(Err(why.unwrap_or("no reason given").into())),
        _ => None,
    }
}

/// A rank's hold on its lock file beside the id file: an exclusive `flock`, which the kernel
/// releases if the process dies. Rank 0 holds `<path>.lock` from before it clears the
/// path's files until they are cleared again: a second rank 0 on the same path is refused
/// meanwhile, and a peer that finds an `error` verdict beside an id file whose lock stays
/// free knows that rank 0 died before clearing up (see `fetch_file`). Peer r holds
/// `<path>.lock-<r>` from before it answers until [`Rendezvous::finish`]: a second process
/// answering as rank r (a peer of an earlier run that outlived its rank 0, and would answer
/// this run's id into the same answer file) is refused, naming the first. Dropping it
/// removes the lock file, then unlocks. Where the filesystem has no locks, the rank goes on
/// without one and removes the file (peers then judge a verdict by its id file alone: gone
/// within the grace, or left for ORPHAN_AFTER).
struct ServeLock {
    hold: Option<(std::fs::File, PathBuf)>,
}

/// The locks of ranks that went through a file rendezvous successfully in this process, by
/// (path, rank), kept until [`Rendezvous::finish`]: the id's ranks are still starting NCCL,
/// and a rank 0 of another run clearing the path meanwhile would remove answers and a
/// verdict they may still read; another process answering as one of them would be mistaken
/// for it.
type HeldLocks = std::collections::HashMap<(PathBuf, usize), ServeLock>;
fn held_locks() -> std::sync::MutexGuard<'static, HeldLocks> {
    static HELD: std::sync::OnceLock<Mutex<HeldLocks>> = std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `flock(fd, op | LOCK_NB)`: Ok(true) locked, Ok(false) held by another, Err otherwise.
fn try_flock(file: &std::fs::File, op: libc::c_int) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// This process and machine, as a lock holder names itself.
fn holder_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "?".into()
    };
    format!("pid {} on {host}", std::process::id())
}

impl ServeLock {
    /// The lock of `rank` on `id_path`: rank 0's, or peer `rank`'s claim.
    fn take(id_path: &Path, rank: usize) -> Result<ServeLock> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = beside(id_path, &lock_suffix(rank));
        // a peer probing the lock holds it for a moment: look again before calling it taken
        let deadline = Instant::now() + 10 * POLL;
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match try_flock(&file, libc::LOCK_EX) {
                Ok(true) => {
                    // the last holder may have removed the file between our open and lock
                    // (inode numbers only: some overlay filesystems report another st_dev
                    // through the descriptor)
                    let same = match (file.metadata(), std::fs::metadata(&path)) {
                        (Ok(a), Ok(b)) => a.ino() == b.ino(),
                        _ => false,
                    };
                    if !same {
                        if Instant::now() >= deadline {
                            // a filesystem whose inodes do not compare: serve unlocked
                            return Ok(ServeLock { hold: None });
                        }
                        std::thread::sleep(POLL / 5);
                        continue;
                    }
                    let _ = file.set_len(0);
                    let _ = writeln!(file, "{}", holder_name());
                    return Ok(ServeLock {
                        hold: Some((file, path)),
                    });
                }
                Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL / 5),
                Ok(false) => {
                    let who = std::fs::read_to_string(&path).unwrap_or_default();
                    let who = who.trim();
                    let who = if who.is_empty() { "not named yet" } else { who };
                    return Err(Error::Comm(if rank == 0 {
                        format!(
                            "rendezvous through {}: another rank 0 ({who}) is serving this file \
                             right now; two runs cannot share one id file: give each run its \
                             own path (and stop any rank of this run that may have answered \
                             the other)",
                            id_path.display(),
                        )
                    } else {
                        format!(
                            "rendezvous through {}: rank {rank} is already taken on this file by \
                             another process ({who}): a rank of an earlier run still waiting? \
                             stop it, or give each run its own path",
                            id_path.display(),
                        )
                    }));
                }
                // no locks on this filesystem: serve without one (and leave no lock file;
                // peers then judge a verdict by its id file alone)
                Err(_) => {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    return Ok(ServeLock { hold: None });
                }
            }
        }
    }
}

impl Drop for ServeLock {
    fn drop(&mut self) {
        if let Some((file, path)) = self.hold.take() {
            // remove, then unlock (by closing): a rank 0 that opened the old file before the
            // removal sees that it locked a removed file and opens again
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

/// The lock file of `rank` beside an id file: `lock` for rank 0, `lock-<r>` for a peer.
fn lock_suffix(rank: usize) -> String {
    if rank == 0 {
        "lock".into()
    } else {
        format!("lock-{rank}")
    }
}

/// Whether a rank 0 holds `id_path`'s lock now (or it cannot be probed: assume so). False
/// when there is no lock file or it is free: rank 0 finished, or died.
fn rank0_serving(id_path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(beside(id_path, "lock")) else {
        return false;
    };
    // a shared probe, released when `file` closes
    !matches!(try_flock(&file, libc::LOCK_SH), Ok(true))
}

/// Rank 0 through a file: clear an earlier run's answers, write the id file, then wait until
/// every rank has answered for this id. An answer `refused` (the rank's world size or terms
/// differ), an answer from a rank outside the world, or a rank missing at the deadline stops
/// the run; the verdict file (`<path>.go`: `ok <tag>` or `error <tag> <reason>`) tells the
/// ranks either way. The id file is removed before an `ok`: every rank that may use the id
/// holds it already, and no file is ever left beside an `ok` for it (a crash right after
/// cannot hand a later run's ranks this id).
fn serve_file(path: &Path, world: usize, terms: &Terms, id: &Id, wait: Duration) -> Result<()> {
    if world == 1 {
        return Ok(());
    }
    let go = beside(path, "go");
    // held until this fails (after the id is removed) or, on success, until `finish`
    let lock = ServeLock::take(path, 0)?;
    // the old verdict first: a peer that saw it beside the old id and finds the id gone
    // looks at the verdict again before it believes it
    let _ = std::fs::remove_file(&go);
    remove_id_and_answers(path);
    let mut bytes = format!("{FILE_MAGIC} world={world}\nterms: {}\n", terms.encode()).into_bytes();
    bytes.extend_from_slice(id);
    write_atomic(path, &bytes)?;
    let tag = id_tag(id);
    let deadline = Instant::now() + wait;
    let answer = |r: usize| reply_for(&beside(path, &format!("ack-{r}")), &tag);
    // an answer for this id from a rank of another world size (a wrong --tp)
    let outsider = || -> Option<(usize, String)> {
        beside_files(path).into_iter().find_map(|(suffix, p)| {
            let r: usize = suffix.strip_prefix("ack-")?.parse().ok()?;
            if r < world {
                return None;
            }
            Some((r, reply_for(&p, &tag)?.err().unwrap_or_default()))
        })
    };
    let stop = |why: String| {
        // the verdict first, then the id stays a moment (1 s at most) for the ranks that
        // have not read it yet: they need its tag to take the verdict as theirs
        let _ = write_atomic(&go, format!("error {tag} {why}\n").as_bytes());
        let grace = Instant::now() + 20 * POLL;
        while Instant::now() < grace && (1..world).any(|r| answer(r).is_none()) {
            std::thread::sleep(POLL);
        }
        remove_id_and_answers(path);
        Err(Error::Comm(format!(
            "rendezvous through {}: {why}",
            path.display()
        )))
    };
    loop {
        let mut arrived = 1;
        for r in 1..world {
            match answer(r) {
                Some(Ok(())) => arrived += 1,
                Some(Err(why)) => {
                    return stop(format!(
                    "rank {r} refused rank 0's id: {why}; start every rank with the same options"
                ))
                }
                // none yet; or none any more: a rank that gave up removes its answer
                None => {}
            }
        }
        if let Some((r, why)) = outsider() {
            return stop(format!(
                "a rank {r} answered, but the world is {world} ranks: {why}"
            ));
        }
        if arrived == world {
            let _ = std::fs::remove_file(path);
            write_atomic(&go, format!("ok {tag}\n").as_bytes())?;
            held_locks().insert((path.to_path_buf(), 0), lock);
            return Ok(());
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..world).filter(|&r| answer(r) != Some(Ok(()))).collect();
            return stop(format!(
                "rank(s) {missing:?} of {world} did not answer within {wait:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// An error's own words (without the `communicator: ` of its display), to pass on.
fn message(e: Error) -> String {
    match e {
        Error::Comm(m) => m,
        e => e.to_string(),
    }
}

/// A peer through a file: claim its rank (`<path>.lock-<rank>`, refused while another
/// process holds it), then poll the id file; answer each id it holds (`ok`, or `refused` with
/// the reason when the world size or terms differ: rank 0 then stops the run, naming it);
/// return the id once rank 0's verdict for it is `ok`. A file that changes meanwhile (a
/// stale one replaced by a starting rank 0) is answered again.
fn fetch_file(path: &Path, rank: usize, world: usize, terms: &Terms, wait: Duration) -> Result<Id> {
    // this rank's claim, kept until `finish` once the id is ours (dropped on every error)
    let claim = ServeLock::take(path, rank)?;
    let id = fetch_file_claimed(path, rank, world, terms, wait)?;
    held_locks().insert((path.to_path_buf(), rank), claim);
    Ok(id)
}

fn fetch_file_claimed(
    path: &Path,
    rank: usize,
    world: usize,
    terms: &Terms,
    wait: Duration,
) -> Result<Id> {
    let (ack, go) = (beside(path, &format!("ack-{rank}")), beside(path, "go"));
    let me = format!("rank {rank}");
    let deadline = Instant::now() + wait;
    // the tag answered, and the id if accepted or the reason if refused
    let mut answered: Option<(String, std::result::Result<Id, String>)> = None;
    let mut not_ours = None;
    // an `error` verdict for the id answered, not yet believed
    struct Doubt {
        tag: String,
        why: String,
        /// Since when its id file has stood beside it with the lock free; ORPHAN_AFTER of
        /// that and it is a dead rank 0's verdict, ignored from then on.
        free_since: Option<Instant>,
    }
    impl Doubt {
        fn orphan(&self) -> bool {
            self.free_since.is_some_and(|t| t.elapsed() >= ORPHAN_AFTER)
        }
    }
    let mut doubted: Option<Doubt> = None;
    let fail = |msg: String| {
        Err(Error::Comm(format!(
            "rendezvous through {}: {me}: {msg}",
            path.display()
        )))
    };
    // rank 0's verdict for `tag`: Some(Ok) to go, Some(Err(reason)) to stop
    let verdict = |tag: &str| reply_for(&go, tag);
    loop {
        let bytes = std::fs::read(path).unwrap_or_default();
        if let Some((_, _, file_id)) = split_id_file(&bytes) {
            let tag = id_tag(&file_id);
            if answered.as_ref().is_none_or(|a| a.0 != tag) {
                let mine = check_id_file(&bytes, world, terms, path, &me)
                    .map(|_| file_id)
                    .map_err(message);
                let reply = match &mine {
                    Ok(_) => format!("ok {tag}\n"),
                    Err(why) => format!("refused {tag} {why}\n"),
                };
                match write_atomic(&ack, reply.as_bytes()) {
                    Ok(()) => answered = Some((tag, mine)),
                    // rank 0 clearing an earlier run's answers took the half-written one
                    // with it: answer again at the next look
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return fail(message(e)),
                }
            }
        } else if let Err(e) = check_id_file(&bytes, world, terms, path, &me) {
            // a file that is not ours (yet): named if the wait ends
            not_ours = Some(message(e));
        }
        if let Some((tag, mine)) = &answered {
            match (verdict(tag), mine) {
                (Some(Ok(())), Ok(id)) => return Ok(*id),
                (Some(Err(why)), _) => {
                    // A rank 0 that stops removes its id within its grace (1 s), then
                    // unlocks. So: the id gone and the verdict still there -> believe it;
                    // the id there with the lock held -> rank 0 is in its grace (or a new
                    // rank 0 is clearing the path): look again; the id there with the lock
                    // free for ORPHAN_AFTER -> its rank 0 died mid-stop, the verdict was for
                    // nobody now: wait for the next rank 0. (Lock first, then the id.)
                    let d = match &mut doubted {
                        Some(d) if &d.tag == tag => d,
                        d => d.insert(Doubt {
                            tag: tag.clone(),
                            why,
                            free_since: None,
                        }),
                    };
                    if !d.orphan() {
                        let free = !rank0_serving(path);
                        let id_now = split_id_file(&std::fs::read(path).unwrap_or_default());
                        let id_there = id_now.is_some_and(|(_, _, id)| &id_tag(&id) == tag);
                        if !id_there {
                            if let Some(Err(why)) = verdict(tag) {
                                return fail(format!("rank 0 stopped the run: {why}"));
                            }
                        } else if !free {
                            d.free_since = None;
                        } else {
                            d.free_since.get_or_insert_with(Instant::now);
                        }
                    }
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                // withdraw the answer, then look once more: a rank 0 that counted it
                // before it went has told every rank to go
                let _ = std::fs::remove_file(&ack);
                if let (Some(Ok(())), Ok(id)) = (verdict(tag), mine) {
                    return Ok(*id);
                }
                let left = match doubted.take() {
                    Some(d) if &d.tag == tag && d.free_since.is_some() => format!(
                        "; the id file there was left by a rank 0 that died while stopping \
                         its run ({})",
                        d.why
                    ),
                    _ => String::new(),
                };
                return fail(match mine {
                    Err(why) => {
                        format!("{why} (a stale file from an earlier run? delete it){left}")
                    }
                    Ok(_) => format!(
                        "rank 0 did not confirm within {wait:?} (are all {world} ranks \
                         started?){left}"
                    ),
                });
            }
        } else if Instant::now() >= deadline {
            let last = std::fs::read_to_string(&go).unwrap_or_default();
            return fail(match (not_ours.take(), last.strip_prefix("error ")) {
                (Some(e), _) => e,
                (None, Some(old)) => format!(
                    "no id after {wait:?}; the last run through this file stopped: {}",
                    old.split_once(' ').map_or(old, |(_, why)| why).trim_end()
                ),
                (None, None) => format!("no complete id after {wait:?} (is rank 0 running?)"),
            });
        }
        std::thread::sleep(POLL);
    }
}

// ----------------------------------------------------------------------------------- tcp

const MAGIC: &str = "syncdrop-rdv v2";
/// How long a rank 0 that stopped the run still answers late ranks with the reason.
const LINGER: Duration = Duration::from_secs(2);
/// Longest line either side reads: a hello (its terms included) or an error is far shorter;
/// a client that sends more without a newline is not one of ours.
const MAX_LINE: usize = 64 << 10;

fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "rendezvous address {addr:?} (expected host:port): {e}"
            ))
        })?
        .collect();
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "rendezvous address {addr:?} resolves to nothing"
        )));
    }
    Ok(v)
}

/// One newline-terminated line, read byte by byte (what follows it, the id, stays in the
/// stream) before `deadline` and at most `MAX_LINE` bytes long; `None` on EOF, an
/// `InvalidData` error for a line too long, a `TimedOut` error past the deadline (however
/// slowly the other end trickles).
fn read_line(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while buf.len() < MAX_LINE {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        if s.read(&mut b)? == 0 {
            return Ok(None);
        }
        if b[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        buf.push(b[0]);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("a line longer than {MAX_LINE} bytes"),
    ))
}

/// Whether a peer's earlier connection is gone (closed, reset): a restarted rank may then
/// take its place.
fn is_dead(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let dead = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    dead
}

/// Tell a late rank why the run stopped, and close without losing the message. Its hello
/// is read first and the close waits for the rank to hang up (half a second at most each):
/// closing a socket with unread input sends a reset, and a reset that reaches the rank
/// before it reads the line discards it ("connection reset by peer" instead of the reason;
/// seen on a loaded 2-core machine).
fn answer_and_close(mut s: TcpStream, msg: &str) {
    let _ = s.set_nonblocking(false);
    let _ = read_line(&mut s, Instant::now() + Duration::from_millis(500));
    refuse(s, msg);
}

/// Send `error: {msg}` as one line in one write (a line formatted piecewise goes out in
/// several segments, and a close can cut it after the first), then close gracefully: our
/// side first, then whatever the other end still sends is read and dropped until it hangs
/// up (half a second, 64 KiB at most), so that no reset overtakes the line.
fn refuse(mut s: TcpStream, msg: &str) {
    let _ = say_error(&mut s, msg);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let until = Instant::now() + Duration::from_millis(500);
    let (mut buf, mut left) = ([0u8; 4096], 64 << 10);
    while left > 0 && Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => left -= n.min(left),
        }
    }
}

/// Write `error: {msg}\n` in one `write_all` (1 s at most).
fn say_error(s: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(format!("error: {msg}\n").as_bytes())
}

/// Rank 0: accept every other rank's hello, then send each the id. On failure every peer
/// that is connected gets the reason, not just a closed socket.
fn serve(addr: &str, world: usize, terms: &Terms, id: &Id, wait: Duration) -> Result<()> {
    if world == 1 {
        return Ok(());
    }
    // listen on every interface at the port: the host the peers use may resolve, on rank
    // 0's own machine, to loopback (Debian's 127.0.1.1) or to an address it cannot bind
    // (a service IP)
    let first = resolve(addr)?[0];
    let any: SocketAddr = if first.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, first.port()).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, first.port()).into()
    };
    let listener = TcpListener::bind(any).map_err(|e| {
        Error::Comm(format!(
            "rendezvous: rank 0 cannot listen on port {} ({e}); give a free port",
            first.port()
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Comm(format!("rendezvous: {e}")))?;
    let deadline = Instant::now() + wait;
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut refused: Vec<String> = Vec::new();
    let tell_all = |peers: &mut [Option<TcpStream>], msg: &str| {
        for s in peers.iter_mut().flatten() {
            let _ = say_error(s, msg);
        }
    };
    // after a stop, ranks still starting get the reason for a moment (they would otherwise
    // retry connecting until their own wait ends, not knowing why)
    let linger = |msg: &str| {
        let until = Instant::now() + LINGER;
        while Instant::now() < until {
            match listener.accept() {
                Ok((s, _)) => answer_and_close(s, msg),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    loop {
        if peers[1..].iter().all(Option::is_some) {
            // complete, unless a rank died meanwhile: its restart must find a free slot
            for p in peers.iter_mut().skip(1) {
                if p.as_ref().is_some_and(is_dead) {
                    *p = None;
                }
            }
            if peers[1..].iter().all(Option::is_some) {
                break;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (1..world).filter(|&r| peers[r].is_none()).collect();
            let mut msg = format!("rank(s) {missing:?} of {world} did not connect within {wait:?}");
            if !refused.is_empty() {
                msg += &format!("; refused: {}", refused.join("; "));
            }
            tell_all(&mut peers, &msg);
            linger(&msg);
            return Err(Error::Comm(format!("rendezvous on {addr}: {msg}")));
        }
        let (mut s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                let msg = format!("rank 0 could not accept: {e}");
                tell_all(&mut peers, &msg);
                return Err(Error::Comm(format!("rendezvous on {addr}: {msg}")));
            }
        };
        // a hello must come promptly (5 s at most, in all): a silent or trickling client is
        // dropped, not waited on
        let _ = s.set_nonblocking(false);
        let hello_by = (now + Duration::from_secs(5)).min(deadline);
        let hello = match read_line(&mut s, hello_by) {
            Ok(line) => Ok(line.unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(format!("its hello is {e} (terms too long?)"))
            }
            Err(_) => Ok(String::new()),
        };
        match hello.and_then(|h| parse_hello(&h, world)) {
            Ok((r, _)) if peers[r].as_ref().is_some_and(|old| !is_dead(old)) => {
                let why = format!("rank {r} connected twice (from {from})");
                refuse(s, &why);
                refused.push(why);
            }
            Ok((r, theirs)) => {
                let diff = theirs.differences(&format!("rank {r}"), terms, "rank 0");
                if !diff.is_empty() {
                    // a rank of this run started with other options: waiting cannot fix it
                    let msg = format!(
                        "rank {r} was started with other options than rank 0: {}; start every rank with the same options",
                        diff.join("; ")
                    );
                    refuse(s, &msg);
                    tell_all(&mut peers, &msg);
                    linger(&msg);
                    return Err(Error::Comm(format!("rendezvous on {addr}: {msg}")));
                }
                // new, or a restarted rank replacing its dead connection
                peers[r] = Some(s);
            }
            Err(why) => {
                refuse(s, &why);
                refused.push(format!("{from}: {why}"));
            }
        }
    }
    let mut msg = format!("{MAGIC} world={world}\n").into_bytes();
    msg.extend_from_slice(id);
    let mut failed = Vec::new();
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("every rank arrived");
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        if let Err(e) = s.write_all(&msg) {
            failed.push(format!("rank {r}: {e}"));
        }
    }
    if !failed.is_empty() {
        // the others got the id but will wait in NCCL's init for the ranks that did not
        // (and fail there within its timeout)
        return Err(Error::Comm(format!(
            "rendezvous on {addr}: sending the id failed for {}",
            failed.join(", ")
        )));
    }
    Ok(())
}

/// The rank and terms a peer's hello names, or why it is refused.
fn parse_hello(line: &str, world: usize) -> std::result::Result<(usize, Terms), String> {
    let fields = line
        .strip_prefix(MAGIC)
        .and_then(|rest| rest.strip_prefix(" world="))
        .and_then(|rest| rest.split_once(" rank="))
        .and_then(|(w, rest)| {
            let (r, terms) = rest.split_once(" terms: ")?;
            Some((w.parse::<usize>().ok()?, r.parse::<usize>().ok()?, terms))
        });
    let Some((w, r, terms)) = fields else {
        let shown: String = line.chars().take(60).collect();
        if line.starts_with("syncdrop-rdv v") && !line.starts_with(&format!("{MAGIC} ")) {
            return Err(format!(
                "a rank of another syncdrop version (said {shown:?}, rank 0 speaks {MAGIC:?})"
            ));
        }
        return Err(format!("not a syncdrop rank (said {shown:?})"));
    };
    if w != world {
        return Err(format!(
            "rank {r} belongs to a world of {w}, rank 0's is {world} (another run, or a wrong --tp?)"
        ));
    }
    if r == 0 || r >= world {
        return Err(format!("rank {r} is not a peer rank of a world of {world}"));
    }
    Ok((r, Terms::decode(terms)))
}

/// A peer rank: connect (retrying while rank 0 is not up yet), say who it is, wait for the id.
fn fetch(addr: &str, rank: usize, world: usize, terms: &Terms, wait: Duration) -> Result<Id> {
    let deadline = Instant::now() + wait;
    let timed_out = |what: &str| {
        Error::Comm(format!(
            "rendezvous on {addr}: rank {rank} of {world} {what} within {wait:?} (is rank 0 running, and are all {world} ranks started?)"
        ))
    };
    // a name that does not resolve yet (a pod not yet in DNS) is retried like a refused
    // connection; a malformed address fails at once
    if !addr.contains(':') {
        resolve(addr)?;
    }
    let mut s = loop {
        let connected = resolve(addr).unwrap_or_default().into_iter().find_map(|a| {
            let left = deadline.saturating_duration_since(Instant::now());
            TcpStream::connect_timeout(
                &a,
                left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
            )
            .ok()
        });
        if let Some(s) = connected {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(timed_out("could not connect"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let io = |e: std::io::Error| Error::Comm(format!("rendezvous on {addr}: rank {rank}: {e}"));
    writeln!(
        s,
        "{MAGIC} world={world} rank={rank} terms: {}",
        terms.encode()
    )
    .map_err(io)?;
    // rank 0 answers once every rank has arrived
    let line = match read_line(&mut s, deadline) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(Error::Comm(format!(
                "rendezvous on {addr}: rank {rank}: the other end closed without an answer (not a syncdrop rank 0?)"
            )))
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(timed_out("got no id"))
        }
        Err(e) => return Err(io(e)),
    };
    if let Some(why) = line.strip_prefix("error: ") {
        return Err(Error::Comm(format!(
            "rendezvous on {addr}: rank {rank}: rank 0 stopped the run: {why}"
        )));
    }
    if line != format!("{MAGIC} world={world}") {
        let shown: String = line.chars().take(60).collect();
        return Err(Error::Comm(format!(
            "rendezvous on {addr}: rank {rank}: unexpected answer {shown:?} (not a syncdrop rank 0?)"
        )));
    }
    let mut id = [0u8; 128];
    s.read_exact(&mut id).map_err(io)?;
    Ok(id)
}
