//! Which heads, KV heads and MLP columns each rank owns: one value computed from the config
//! and the TP degree, used by weight loading, head grouping and SPD plans alike.
//!
//! Uneven partitions are first-class: SmolLM2's 9 query heads over 4 ranks are 3/2/2/2. A
//! KV head is computed on every rank whose query heads use it, so with GQA a KV head may be
//! replicated on two ranks (its K/V columns are loaded on both).

#![warn(missing_docs)]

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use std::ops::Range;

/// One rank's share of a block: its query heads, the KV heads they use, its FFN columns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankShard {
    /// Global query-head ids, in the order this rank computes them.
    pub q_heads: Vec<usize>,
    /// Global KV-head ids this rank needs (sorted, unique).
    pub kv_heads: Vec<usize>,
    /// Columns of gate/up (= rows of down) this rank owns.
    pub ffn: Range<usize>,
}

impl RankShard {
    /// Index into `kv_heads` of the KV head serving global query head `q`.
    pub fn local_kv(&self, q: usize, group: usize) -> usize {
        let kv = q / group;
        self.kv_heads
            .iter()
            .position(|k| *k == kv)
            .expect("layout invariant: every query head's KV head is local")
    }
}

/// The partition of a model's heads and FFN columns over the ranks of a TP group. Its
/// constructors give every query head to exactly one rank and every rank at least one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TpLayout {
    /// Each rank's share, indexed by rank.
    pub ranks: Vec<RankShard>,
}

/// Split `n` items into `parts` contiguous ranges whose sizes differ by at most one (larger first).
pub fn even_split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let (base, rem) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|r| {
            let len = base + usize::from(r < rem);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

impl TpLayout {
    /// Contiguous, as-even-as-possible layout. `tp` must be in 1..=n_heads.
    pub fn new(cfg: &LlamaConfig, tp: usize) -> Result<TpLayout> {
        if tp == 0 || tp > cfg.n_heads {
            return Err(Error::InvalidTpDegree {
                tp,
                n_heads: cfg.n_heads,
            });
        }
        let heads = even_split(cfg.n_heads, tp)
            .into_iter()
            .map(|r| r.collect())
            .collect();
        Self::with_heads(cfg, heads)
    }

    /// Layout with an explicit head assignment (e.g. from head grouping): every query head
    /// exactly once, every rank at least one head. The MLP is split evenly.
    pub fn with_heads(cfg: &LlamaConfig, heads: Vec<Vec<usize>>) -> Result<TpLayout> {
        let tp = heads.len();
        if tp == 0 || tp > cfg.n_heads {
            return Err(Error::InvalidTpDegree {
                tp,
                n_heads: cfg.n_heads,
            });
        }
        let mut seen = vec![false; cfg.n_heads];
        for h in heads.iter().flatten() {
            if *h >= cfg.n_heads || std::mem::replace(&mut seen[*h], true) {
                return Err(Error::InvalidArgument(format!(
                    "head assignment {heads:?} must use each of the {} heads exactly once",
                    cfg.n_heads
                )));
            }
        }
        if seen.iter().any(|s| !s) || heads.iter().any(|h| h.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "head assignment {heads:?} must cover all heads, at least one per rank"
            )));
        }
        let group = cfg.group_size();
        let ranks = heads
            .into_iter()
            .zip(even_split(cfg.ffn, tp))
            .map(|(q_heads, ffn)| {
                let mut kv_heads: Vec<usize> = q_heads.iter().map(|h| h / group).collect();
                kv_heads.sort_unstable();
                kv_heads.dedup();
                RankShard {
                    q_heads,
                    kv_heads,
                    ffn,
                }
            })
            .collect();
        Ok(TpLayout { ranks })
    }

    /// The TP degree: the number of ranks.
    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    /// Human-readable partition, e.g. "3/2/2/2".
    pub fn head_partition(&self) -> String {
        self.ranks
            .iter()
            .map(|r| r.q_heads.len().to_string())
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> LlamaConfig {
        LlamaConfig {
            arch: "llama".into(),
            hidden: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn: 1536,
            vocab: 49152,
            rope_theta: 1e5,
            rms_eps: 1e-5,
            rope_style: crate::config::RopeStyle::Interleaved,
            tied_embeddings: true,
            qkv_bias: false,
            context_length: 8192,
            sliding_window: None,
        }
    }

    #[test]
    fn smollm_tp4_is_3_2_2_2_with_replicated_kv() {
        let l = TpLayout::new(&smollm(), 4).unwrap();
        assert_eq!(l.head_partition(), "3/2/2/2");
        let kv: Vec<_> = l.ranks.iter().map(|r| r.kv_heads.clone()).collect();
        assert_eq!(kv, vec![vec![0], vec![1], vec![1, 2], vec![2]]);
        assert_eq!(l.ranks[3].ffn, 1152..1536);
    }

    #[test]
    fn bad_degrees_are_errors() {
        for tp in [0, 10] {
            assert!(matches!(
                TpLayout::new(&smollm(), tp),
                Err(Error::InvalidTpDegree { n_heads: 9, .. })
            ));
        }
        assert!(
            TpLayout::with_heads(&smollm(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7, 7]]).is_err()
        );
    }
}
