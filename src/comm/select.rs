//! All-reduce algorithm selection: an explicit chain with logged fallbacks and an environment
//! override (DESIGN.md section 5). Plain Rust, so it is unit-tested without a GPU.
//!
//! Chain: one-shot -> two-shot -> NCCL -> staged copy.
//! - one-shot (every rank pulls all peers): small messages, decode; needs P2P between all pairs;
//! - two-shot (reduce-scatter + all-gather): larger messages, P2P;
//! - NCCL: ranks in several processes (or machines), or no P2P, or messages past the custom kernels' buffer;
//! - staged copy through host memory: the last resort, always available, never silent.
//!
//! Size thresholds are starting points taken from vLLM's custom all-reduce (one-shot up to
//! 256 KiB at 8 ranks, 512 KiB at <= 4; two-shot up to its 64 MiB buffer); they are to be
//! re-tuned on GPU machines and the evidence recorded here.

use crate::error::{Error, Result};

/// An all-reduce algorithm: what [`select`] picks, or what `SYNCDROP_ALLREDUCE` forces
/// (`oneshot`, `twoshot`, `nccl`, `staged`; [`Algo::Identity`] cannot be forced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// One rank: nothing to communicate.
    Identity,
    /// Every rank reads all peers' buffers and sums them: small messages; P2P between all pairs.
    OneShot,
    /// Reduce-scatter then all-gather over P2P: larger messages, up to the registered buffer.
    TwoShot,
    /// NCCL's all-reduce, where the ranks have an NCCL communicator.
    Nccl,
    /// A copy through host memory, reduced by the host communicator: always available.
    StagedCopy,
}

impl std::str::FromStr for Algo {
    type Err = Error;
    fn from_str(s: &str) -> Result<Algo> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "oneshot" | "one-shot" => Algo::OneShot,
            "twoshot" | "two-shot" => Algo::TwoShot,
            "nccl" => Algo::Nccl,
            "staged" | "staged-copy" => Algo::StagedCopy,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "SYNCDROP_ALLREDUCE='{other}': expected oneshot, twoshot, nccl or staged"
                )))
            }
        })
    }
}

/// The all-reduce switches the environment sets, read once where the CUDA backend starts
/// (and where ranks compare their options): `SYNCDROP_ALLREDUCE` (a forced algorithm, as
/// written and parsed; a typo is an error), `SYNCDROP_FUSED_OPROJ` and `SYNCDROP_FUSED_NORM`
/// (`1` = on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvSwitches {
    /// `SYNCDROP_ALLREDUCE` as written and the algorithm it names; `None` when unset.
    pub forced: Option<(String, Algo)>,
    /// `SYNCDROP_FUSED_OPROJ=1`: the CUDA backend's fused o_proj + all-reduce (one-shot).
    pub fused_oproj: bool,
    /// `SYNCDROP_FUSED_NORM=1`: the CUDA backend's fused all-reduce + residual add + RMSNorm.
    pub fused_norm: bool,
}

impl EnvSwitches {
    /// Read the variables now; an `InvalidArgument` error when `SYNCDROP_ALLREDUCE` names no
    /// algorithm.
    pub fn read() -> Result<EnvSwitches> {
        let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        Ok(EnvSwitches {
            forced: forced(std::env::var("SYNCDROP_ALLREDUCE"))?,
            fused_oproj: on("SYNCDROP_FUSED_OPROJ"),
            fused_norm: on("SYNCDROP_FUSED_NORM"),
        })
    }
}

/// `SYNCDROP_ALLREDUCE` as `std::env::var` read it: `None` when unset; a value that is not
/// UTF-8 or names no algorithm is an `InvalidArgument` error (the parse error names the
/// variable).
fn forced(var: std::result::Result<String, std::env::VarError>) -> Result<Option<(String, Algo)>> {
    match var {
        Ok(v) => {
            let a = v.parse::<Algo>()?;
            Ok(Some((v, a)))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidArgument(format!(
            "SYNCDROP_ALLREDUCE='{}' is not valid UTF-8: expected oneshot, twoshot, nccl or staged",
            v.to_string_lossy()
        ))),
    }
}

/// What the selector needs to know about the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Ranks in the group.
    pub world: usize,
    /// Every pair of ranks has peer access: the driver's `cuDeviceCanAccessPeer` both ways
    /// (ranks on one device always do).
    pub p2p_all_pairs: bool,
    /// Every rank runs in this process: the P2P kernels share device pointers between the
    /// ranks' threads (no IPC handles), so one rank per process, and so ranks on several
    /// machines, take NCCL.
    pub one_process: bool,
    /// The ranks share an NCCL communicator.
    pub nccl_available: bool,
    /// Bytes of the registered buffer the custom kernels can use.
    pub custom_buffer_bytes: usize,
}

/// The largest message (bytes) whose chain starts at one-shot, at up to 4 ranks; larger ones
/// start at two-shot.
pub const ONE_SHOT_MAX_BYTES_SMALL_WORLD: usize = 512 << 10;
/// The largest message (bytes) whose chain starts at one-shot, at more than 4 ranks.
pub const ONE_SHOT_MAX_BYTES_LARGE_WORLD: usize = 256 << 10;

/// Choose the algorithm for a message of `bytes`. `env` is the override
/// (SYNCDROP_ALLREDUCE). Returns the choice and a log line per step that was skipped or
/// overridden (callers print them once per shape).
pub fn select(bytes: usize, t: &Topology, env: Option<&str>) -> Result<(Algo, Vec<String>)> {
    if t.world == 0 {
        return Err(Error::InvalidArgument("all-reduce over 0 ranks".into()));
    }
    if t.world == 1 {
        return Ok((Algo::Identity, vec![]));
    }
    let mut log = Vec::new();
    let custom_ok = t.p2p_all_pairs && t.one_process && t.world <= 8;
    let fits = bytes <= t.custom_buffer_bytes;
    let supported = |a: Algo| -> std::result::Result<(), String> {
        match a {
            Algo::Identity => Err("identity is for one rank".into()),
            Algo::OneShot | Algo::TwoShot if !custom_ok => Err(format!(
                "needs <= 8 ranks in this process with P2P between all of them (world {}, one process {}, p2p {})",
                t.world, t.one_process, t.p2p_all_pairs
            )),
            Algo::OneShot | Algo::TwoShot if !fits => Err(format!(
                "{bytes} bytes exceed the registered buffer of {} bytes",
                t.custom_buffer_bytes
            )),
            Algo::Nccl if !t.nccl_available => Err("NCCL is not available".into()),
            _ => Ok(()),
        }
    };
    if let Some(e) = env {
        let want: Algo = e.parse()?;
        return match supported(want) {
            Ok(()) => {
                log.push(format!("all-reduce: {want:?} forced by SYNCDROP_ALLREDUCE"));
                Ok((want, log))
            }
            Err(why) => Err(Error::Comm(format!(
                "SYNCDROP_ALLREDUCE={e} cannot run here: {why}"
            ))),
        };
    }
    let one_shot_max = if t.world <= 4 {
        ONE_SHOT_MAX_BYTES_SMALL_WORLD
    } else {
        ONE_SHOT_MAX_BYTES_LARGE_WORLD
    };
    let chain: Vec<Algo> = if bytes <= one_shot_max {
        vec![Algo::OneShot, Algo::TwoShot, Algo::Nccl, Algo::StagedCopy]
    } else {
        vec![Algo::TwoShot, Algo::Nccl, Algo::StagedCopy]
    };
    for a in chain {
        match supported(a) {
            Ok(()) => return Ok((a, log)),
            Err(why) => log.push(format!("all-reduce: {a:?} skipped: {why}")),
        }
    }
    unreachable!("staged copy is always supported")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvlink(world: usize) -> Topology {
        Topology {
            world,
            p2p_all_pairs: true,
            one_process: true,
            nccl_available: true,
            custom_buffer_bytes: 64 << 20,
        }
    }

    #[test]
    fn sizes_pick_one_shot_then_two_shot_then_nccl() {
        assert_eq!(select(8 << 10, &nvlink(8), None).unwrap().0, Algo::OneShot);
        assert_eq!(
            select(300 << 10, &nvlink(8), None).unwrap().0,
            Algo::TwoShot
        );
        assert_eq!(
            select(300 << 10, &nvlink(4), None).unwrap().0,
            Algo::OneShot
        );
        let (a, log) = select(100 << 20, &nvlink(8), None).unwrap();
        assert_eq!(a, Algo::Nccl);
        assert!(log[0].contains("exceed the registered buffer"), "{log:?}");
        assert_eq!(select(1 << 10, &nvlink(1), None).unwrap().0, Algo::Identity);
    }

    #[test]
    fn unsupported_topologies_fall_back_with_a_log_never_silently() {
        let pcie = Topology {
            p2p_all_pairs: false,
            ..nvlink(4)
        };
        let (a, log) = select(4 << 10, &pcie, None).unwrap();
        assert_eq!(a, Algo::Nccl);
        assert_eq!(log.len(), 2, "{log:?}");
        let bare = Topology {
            nccl_available: false,
            ..pcie
        };
        let (a, log) = select(4 << 10, &bare, None).unwrap();
        assert_eq!(a, Algo::StagedCopy);
        assert_eq!(log.len(), 3);
        let wide = nvlink(16);
        let (a, log) = select(4 << 10, &wide, None).unwrap();
        assert_eq!(a, Algo::Nccl);
        assert!(log[0].contains("world 16"), "{log:?}");
        let processes = Topology {
            one_process: false,
            ..nvlink(2)
        };
        let (a, log) = select(4 << 10, &processes, None).unwrap();
        assert_eq!(a, Algo::Nccl);
        assert!(log[0].contains("one process false"), "{log:?}");
    }

    #[test]
    fn the_override_wins_or_fails_loudly() {
        assert_eq!(
            select(8 << 10, &nvlink(8), Some("twoshot")).unwrap().0,
            Algo::TwoShot
        );
        assert_eq!(
            select(8 << 10, &nvlink(8), Some("nccl")).unwrap().0,
            Algo::Nccl
        );
        let pcie = Topology {
            p2p_all_pairs: false,
            ..nvlink(4)
        };
        let e = select(8 << 10, &pcie, Some("oneshot"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("P2P"), "{e}");
        assert!(select(8 << 10, &nvlink(2), Some("magic")).is_err());
    }

    /// `SYNCDROP_ALLREDUCE` unset is no override; a typo, or a value that is not UTF-8, is an
    /// error that names the variable once.
    #[test]
    fn the_env_override_is_read_strictly() {
        use std::env::VarError;
        use std::os::unix::ffi::OsStringExt;
        assert_eq!(forced(Err(VarError::NotPresent)).unwrap(), None);
        assert_eq!(
            forced(Ok("TwoShot".into())).unwrap(),
            Some(("TwoShot".into(), Algo::TwoShot))
        );
        let e = forced(Ok("magic".into())).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid argument: SYNCDROP_ALLREDUCE='magic': expected oneshot, twoshot, nccl or staged"
        );
        let bytes = std::ffi::OsString::from_vec(b"one\xffshot".to_vec());
        let e = forced(Err(VarError::NotUnicode(bytes)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        assert_eq!(e.matches("SYNCDROP_ALLREDUCE").count(), 1, "{e}");
    }
}
