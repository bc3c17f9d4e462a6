//! ISO split selection: where to cut a prefill into two chunks (DESIGN.md section 4).
//!
//! Equal token counts leave chunk 1 with ~3x chunk 0's attention work (its queries see the
//! whole prefix). The cost model prices a chunk of `len` tokens starting at `start` as
//! `linear * len + attn * sum_{p in chunk} (p + 1)` (per-token GEMM work plus causal attention
//! over the keys each query sees), balances the two chunks, rounds to a kernel-friendly
//! multiple, and turns ISO off below a length where splitting costs more than it hides.
//! The coefficients come from FLOP counts, or better from timing real prefills
//! ([`IsoCostModel::calibrate`]). The ISO paper leaves this "adaptive segmentation" open.

use crate::config::LlamaConfig;
use crate::engine::Engine;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsoMode {
    Off,
    /// A fixed split (tokens in chunk 0).
    Split(usize),
    /// Split chosen by the cost model.
    Auto,
}

impl std::str::FromStr for IsoMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(IsoMode::Off),
            "auto" | "on" => Ok(IsoMode::Auto),
            n => n.parse::<usize>().map(IsoMode::Split).map_err(|_| {
                crate::Error::InvalidArgument(format!(
                    "--iso takes off, on, auto or a split length; got '{s}'"
                ))
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IsoCostModel {
    /// Cost per token of the per-token work (projections, MLP), in seconds or FLOPs.
    pub linear: f64,
    /// Cost per (query, key) pair of causal attention, same unit.
    pub attn: f64,
    /// Below this many tokens ISO is off.
    pub min_len: usize,
    /// Splits are rounded to a multiple of this.
    pub multiple: usize,
}

impl IsoCostModel {
    /// FLOP-based model of one rank at TP `tp`.
    pub fn from_config(cfg: &LlamaConfig, tp: usize) -> IsoCostModel {
        let (d, hd) = (cfg.hidden as f64, cfg.head_dim as f64);
        let per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) as f64 * hd
            + d * cfg.n_heads as f64 * hd
            + 3.0 * d * cfg.ffn as f64;
        IsoCostModel {
            linear: 2.0 * per_layer / tp as f64,
            attn: 4.0 * cfg.n_heads as f64 * hd / tp as f64,
            min_len: 64,
            multiple: 16,
        }
    }

    /// Cost of the chunk of `len` tokens starting at position `start`.
    pub fn chunk_cost(&self, start: usize, len: usize) -> f64 {
        let (s, e) = (start as f64, (start + len) as f64);
        // sum_{p=start}^{start+len-1} (p + 1) = (e(e+1) - s(s+1)) / 2
        self.linear * len as f64 + self.attn * (e * (e + 1.0) - s * (s + 1.0)) / 2.0
    }

    /// The balanced split of a `t`-token prefill, or None when ISO should be off.
    pub fn split(&self, t: usize) -> Option<usize> {
        if t < self.min_len.max(2 * self.multiple) {
            return None;
        }
        // cost(0, s) - cost(s, t - s) increases with s: bisect for the crossing
        let diff = |s: usize| self.chunk_cost(0, s) - self.chunk_cost(s, t - s);
        let (mut lo, mut hi) = (1usize, t - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if diff(mid) < 0.0 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let m = self.multiple.max(1);
        let s = ((lo + m / 2) / m * m).clamp(m, t - m);
        Some(s)
    }

    /// Fit `linear` and `attn` (seconds) to timed prefills of `short` and `long` tokens on
    /// `engine` (best of `reps`): time(L) = linear * L + attn * L(L+1)/2. Returns the model
    /// and whether the fit was usable (positive coefficients); if not, `self` is kept.
    pub fn calibrate(
        mut self,
        engine: &mut Engine,
        short: usize,
        long: usize,
        reps: usize,
    ) -> Result<(IsoCostModel, bool)> {
        let time = |engine: &mut Engine, len: usize| -> Result<f64> {
            let toks: Vec<u32> = (0..len as u32).map(|i| 100 + (i * 37) % 1000).collect();
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) {
                let t0 = std::time::Instant::now();
                engine.forward(&toks, 0, len - 1..len)?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let (t1, t2) = (time(engine, short)?, time(engine, long)?);
        let (l1, l2) = (short as f64, long as f64);
        let (q1, q2) = (l1 * (l1 + 1.0) / 2.0, l2 * (l2 + 1.0) / 2.0);
        // solve [l1 q1; l2 q2] [a; b] = [t1; t2]
        let det = l1 * q2 - l2 * q1;
        let a = (t1 * q2 - t2 * q1) / det;
        let b = (l1 * t2 - l2 * t1) / det;
        let ok = a > 0.0 && b >= 0.0;
        if ok {
            self.linear = a;
            self.attn = b;
        }
        Ok((self, ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(linear: f64, attn: f64) -> IsoCostModel {
        IsoCostModel {
            linear,
            attn,
            min_len: 64,
            multiple: 1,
        }
    }

    #[test]
    fn split_balances_the_two_chunks() {
        // no attention cost: half and half
        assert_eq!(model(1.0, 0.0).split(1000), Some(500));
        // attention dominates: s -> t / sqrt(2) (~0.71 t)
        let s = model(1e-9, 1.0).split(10_000).unwrap();
        assert!(
            (s as f64 / 10_000.0 - std::f64::consts::FRAC_1_SQRT_2).abs() < 0.01,
            "{s}"
        );
        // in between the split lies between the two, and the chunk costs match
        let m = model(1000.0, 1.0);
        let s = m.split(4096).unwrap();
        assert!(s > 2048 && s < 2900, "{s}");
        let (c0, c1) = (m.chunk_cost(0, s), m.chunk_cost(s, 4096 - s));
        assert!((c0 - c1).abs() / c0 < 0.01);
    }

    #[test]
    fn short_prompts_run_without_iso_and_splits_are_rounded() {
        let m = IsoCostModel {
            multiple: 16,
            ..model(1.0, 0.01)
        };
        assert_eq!(m.split(40), None);
        let s = m.split(1000).unwrap();
        assert_eq!(s % 16, 0);
        assert!((16..=984).contains(&s));
    }
}
