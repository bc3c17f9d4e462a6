//! ISO split selection: where to cut a prefill into two chunks (DESIGN.md section 4).
//!
//! Equal token counts leave chunk 1 with ~3x chunk 0's attention work (its queries see the
//! whole prefix). The cost model prices a chunk of `len` tokens starting at `start` as
//! `linear * len + attn * sum_{p in chunk} (p + 1)` (per-token GEMM work plus causal attention
//! over the keys each query sees), balances the two chunks, rounds to a kernel-friendly
//! multiple, and turns ISO off below a length where splitting costs more than it hides.
//! The coefficients come from FLOP counts, or better from timing real prefills
//! ([`IsoCostModel::calibrate`]). The ISO paper leaves this "adaptive segmentation" open.
//!
//! Whether to split at all: a second chunk costs a fixed amount (on a GPU, every chunk
//! streams all the weights again; on any device, one more set of launches and one more
//! collective latency per layer), and can hide at most min(communication, compute) of the
//! prefill. When the calibration measured both, ISO is on only where the hidden time beats
//! the extra fixed cost (the latency model found ISO at 256 tokens *slower* on H100: the
//! second weight pass costs more than the link time it hides); without a measurement, a
//! plain length threshold decides.

#![warn(missing_docs)]

use crate::config::LlamaConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Whether and where a prefill is split into two ISO chunks (`--iso off|auto|N`; `on` is
/// `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsoMode {
    /// Never split.
    Off,
    /// A fixed split (tokens in chunk 0); 0, or a prefill of at most that many tokens, runs
    /// without ISO.
    Split(usize),
    /// Split chosen by the cost model; never at TP 1 (no all-reduce to hide).
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

/// The cost model that picks the ISO split: per-token, attention and per-chunk compute costs,
/// and optionally communication costs, all in one unit (FLOPs or seconds).
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
    /// Cost of a chunk whatever its length (weight streaming, launches), same unit.
    #[serde(default)]
    pub fixed: f64,
    /// Communication of a prefill: per token, and per chunk (collective latencies), same
    /// unit. Both 0 = not measured (then only `min_len` decides).
    #[serde(default)]
    pub comm_token: f64,
    /// The per-chunk part of the communication (see `comm_token`).
    #[serde(default)]
    pub comm_fixed: f64,
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
            fixed: 0.0,
            comm_token: 0.0,
            comm_fixed: 0.0,
        }
    }

    /// Predicted time ISO saves on a `t`-token prefill split at `s` (positive = faster), or
    /// None when communication was not measured. Without ISO the communication runs after
    /// the compute it depends on; with two chunks each chunk's all-reduces can hide under
    /// the other chunk's compute, at the price of one more chunk's fixed and collective
    /// latency costs. None also for a split that leaves a chunk empty (s = 0 or s >= t).
    pub fn iso_gain(&self, t: usize, s: usize) -> Option<f64> {
        if (self.comm_token == 0.0 && self.comm_fixed == 0.0) || s == 0 || s >= t {
            return None;
        }
        let (c0, c1) = (self.chunk_cost(0, s), self.chunk_cost(s, t - s));
        let comm = |len: usize| self.comm_fixed + self.comm_token * len as f64;
        // chunk 0's communication hides under chunk 1's compute and vice versa
        let hidden = comm(s).min(c1) + comm(t - s).min(c0);
        Some(hidden - self.fixed - self.comm_fixed)
    }

    /// Cost of the chunk of `len` tokens starting at position `start`.
    pub fn chunk_cost(&self, start: usize, len: usize) -> f64 {
        let (s, e) = (start as f64, (start + len) as f64);
        // sum_{p=start}^{start+len-1} (p + 1) = (e(e+1) - s(s+1)) / 2
        self.linear * len as f64 + self.attn * (e * (e + 1.0) - s * (s + 1.0)) / 2.0
    }

    /// The balanced split of a `t`-token prefill, or None when ISO should be off.
    pub fn split(&self, t: usize) -> Option<usize> {
        // at least one multiple per chunk (so 0 < s < t), with `multiple` 0 read as 1
        let m = self.multiple.max(1);
        if t < self.min_len.max(m.saturating_mul(2)) {
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
        let s = ((lo + m / 2) / m * m).clamp(m, t - m);
        match self.iso_gain(t, s) {
            Some(g) if g <= 0.0 => None,
            _ => Some(s),
        }
    }

    /// Fit the model (seconds) to prefills of `short`, the midpoint and `long` tokens timed
    /// on `engine` (best of `reps`), with the engine's own communication counters separating
    /// compute from communication: compute(L) = fixed + linear * L + attn * L(L+1)/2 and
    /// comm(L) = comm_fixed + comm_token * L. Returns the model and whether the fit was usable
    /// (non-negative coefficients, positive linear); if not, `self` is kept. `InvalidArgument`
    /// when `short` or `long` is 0 (a prefill needs a token).
    pub fn calibrate(
        self,
        engine: &mut Engine,
        short: usize,
        long: usize,
        reps: usize,
    ) -> Result<(IsoCostModel, bool)> {
        if short == 0 || long == 0 {
            return Err(Error::InvalidArgument(format!(
                "ISO calibration needs prefills of at least one token (short {short}, long {long})"
            )));
        }
        let time = |engine: &mut Engine, len: usize| -> Result<(f64, f64)> {
            // ids spread over the vocabulary (whatever its size)
            let vocab = engine.cfg.vocab.max(1) as u32;
            let toks: Vec<u32> = (0..len as u32).map(|i| (100 + i * 37) % vocab).collect();
            let mut best = (f64::MAX, 0.0);
            for _ in 0..reps.max(1) {
                engine.reset_comm_stats()?;
                let t0 = std::time::Instant::now();
                engine.forward(&toks, 0, len - 1..len)?;
                let total = t0.elapsed().as_secs_f64();
                // rank 0's time inside all-reduces (the ranks run in lockstep)
                let comm = engine.comm_stats()?.first().map_or(0.0, |c| c.seconds());
                if total < best.0 {
                    best = (total, comm.min(total));
                }
            }
            Ok(best)
        };
        let mid = (short + long) / 2;
        let mut points = Vec::new();
        // device collectives run asynchronously: without timing events their time would
        // read as zero and all of it as compute
        engine.set_comm_timing(true)?;
        let timed = [short, mid, long].map(|len| time(engine, len));
        let timing_off = engine.set_comm_timing(false);
        // a failed prefill poisons the engine, so report its own error, not the later
        // "engine unusable" of the calls after it
        for (len, r) in [short, mid, long].into_iter().zip(timed) {
            let (total, comm) = r?;
            points.push((len, total - comm, comm));
        }
        timing_off?;
        Ok(self.fit(&points))
    }

    /// The fit behind [`IsoCostModel::calibrate`], from (tokens, compute s, comm s) points
    /// at three distinct lengths.
    pub fn fit(mut self, points: &[(usize, f64, f64)]) -> (IsoCostModel, bool) {
        if points.len() != 3 {
            return (self, false);
        }
        // compute: exact solve of [1 L L(L+1)/2] [fixed linear attn]^T = compute
        let row = |l: usize| {
            let l = l as f64;
            [1.0, l, l * (l + 1.0) / 2.0]
        };
        let a = [row(points[0].0), row(points[1].0), row(points[2].0)];
        let b = [points[0].1, points[1].1, points[2].1];
        let Some([fixed, linear, attn]) = solve3(a, b) else {
            return (self, false);
        };
        // communication: least squares of comm_fixed + comm_token * L over the three points
        let n = 3.0;
        let (sx, sy) = points
            .iter()
            .fold((0.0, 0.0), |(x, y), p| (x + p.0 as f64, y + p.2));
        let (sxx, sxy) = points.iter().fold((0.0, 0.0), |(xx, xy), p| {
            (xx + (p.0 * p.0) as f64, xy + p.0 as f64 * p.2)
        });
        let den = n * sxx - sx * sx;
        let comm_token = if den > 0.0 {
            (n * sxy - sx * sy) / den
        } else {
            0.0
        };
        let comm_fixed = (sy - comm_token * sx) / n;
        let ok = linear > 0.0 && attn >= 0.0 && fixed >= -1e-3 * linear * points[2].0 as f64;
        if ok {
            self.fixed = fixed.max(0.0);
            self.linear = linear;
            self.attn = attn;
            self.comm_token = comm_token.max(0.0);
            self.comm_fixed = comm_fixed.max(0.0);
        }
        (self, ok)
    }
}

/// Solve a 3x3 linear system by Cramer's rule; None when it is singular.
fn solve3(a: [[f64; 3]; 3], b: [f64; 3]) -> Option<[f64; 3]> {
    let det = |m: [[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(a);
    if d.abs()
        < 1e-12
            * a.iter()
                .flatten()
                .map(|x| x.abs())
                .fold(0.0, f64::max)
                .powi(3)
    {
        return None;
    }
    let mut x = [0.0; 3];
    for (j, xj) in x.iter_mut().enumerate() {
        let mut m = a;
        for i in 0..3 {
            m[i][j] = b[i];
        }
        *xj = det(m) / d;
    }
    Some(x)
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
            fixed: 0.0,
            comm_token: 0.0,
            comm_fixed: 0.0,
        }
    }

    #[test]
    fn measured_costs_decide_whether_to_split() {
        // communication per token comparable to compute: ISO hides it, even short prompts
        let m = IsoCostModel {
            fixed: 1e-3,
            comm_token: 5e-6,
            comm_fixed: 1e-4,
            ..model(1e-5, 1e-9)
        };
        let s = m.split(2048).expect("ISO pays at 2k tokens");
        assert!(m.iso_gain(2048, s).unwrap() > 0.0);
        // a second weight pass that costs more than the link time it could hide: no ISO
        let heavy = IsoCostModel { fixed: 5e-3, ..m };
        assert_eq!(heavy.split(256), None);
        assert!(heavy.split(8192).is_some(), "long prompts still pay");
        // the gain never exceeds min(comm, compute) and is None without measurements
        let t = 4096;
        let s = m.split(t).unwrap();
        let comm = m.comm_fixed + m.comm_token * t as f64;
        let compute = m.chunk_cost(0, t);
        assert!(m.iso_gain(t, s).unwrap() <= comm.min(compute) + 1e-12);
        assert_eq!(model(1.0, 0.0).iso_gain(1000, 500), None);
    }

    #[test]
    fn fit_recovers_the_coefficients_of_three_timed_prefills() {
        let truth = IsoCostModel {
            fixed: 2e-3,
            comm_token: 3e-6,
            comm_fixed: 4e-4,
            ..model(1.5e-5, 2e-9)
        };
        let pts: Vec<(usize, f64, f64)> = [64usize, 160, 256]
            .iter()
            .map(|&l| {
                let compute = truth.fixed + truth.chunk_cost(0, l);
                (l, compute, truth.comm_fixed + truth.comm_token * l as f64)
            })
            .collect();
        let (f, ok) = model(1.0, 1.0).fit(&pts);
        assert!(ok);
        for (got, want) in [
            (f.fixed, truth.fixed),
            (f.linear, truth.linear),
            (f.attn, truth.attn),
            (f.comm_token, truth.comm_token),
            (f.comm_fixed, truth.comm_fixed),
        ] {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-9),
                "{got} vs {want}"
            );
        }
        // a fit that makes no sense (time falling with length) keeps the old model
        let bad = [(64, 3.0, 0.0), (160, 2.0, 0.0), (256, 1.0, 0.0)];
        let (k, ok) = model(7.0, 0.5).fit(&bad);
        assert!(!ok);
        assert_eq!((k.linear, k.attn), (7.0, 0.5));
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
