//! Linear compensation (LC) of a dropped sync point: an SPD recovery of ours, not the paper's.
//!
//! In an SPD block (DESIGN.md section 2) rank r's MLP reads `RMSNorm(X + a_r)` where the TP
//! block's reads `RMSNorm(X + sum_j a_j)`. The part it misses, `m_r = sum_{j != r} a_j`, is
//! the other ranks' attention output, which depends on the context; but a good share of it
//! is predictable from the block input X that every rank already holds. LC adds a rank-k
//! linear estimate to the local MLP input:
//!
//! ```text
//! U_r = X + a_r + W_out[r] (W_in[r] x^),    x^ = X / rms(X)   (RMSNorm with unit weights)
//! ```
//!
//! No communication, no change to the attention, the KV cache or the all-reduce; per token
//! it costs 2 k d multiply-adds (k = 32, d = 8192 for LLaMA2-70B: 0.6% of one rank's MLP at
//! TP 8). The map is fitted in closed form on calibration text, per block and per rank:
//! ridge regression of `m_r` on `x^` (the normal equations are shared by all ranks, since
//! every rank sees the same X), then truncated to rank k along the top principal directions
//! of its fitted values (reduced-rank regression). A bias term was measured to add nothing:
//! the residual stream's large, nearly constant channels already give `x^` one.
//!
//! Measured on SmolLM2-135M at TP 8 (docs/ACCURACY.md): LC removes about half of zero-shot
//! SPD's perplexity increase, with no training.

#![warn(missing_docs)]

use crate::backend::cpu::{dot, gemm_strided, matmul, MatmulFn};
use crate::error::{Error, Result};

/// Default rank k of the estimate.
pub const DEFAULT_RANK: usize = 32;

/// Default ridge strength, relative to the mean diagonal of the normal matrix.
pub const DEFAULT_RIDGE: f64 = 1e-2;

/// One rank's LC map for one block: `estimate = W_out (W_in x^)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compensation {
    /// k, the rank of the map.
    pub rank: usize,
    /// (k, d): x^ -> the k coordinates.
    pub w_in: Vec<f32>,
    /// (d, k): the k coordinates -> the estimate of the missing partials.
    pub w_out: Vec<f32>,
}

impl Compensation {
    /// Check the shapes against hidden size `d`.
    pub fn check(&self, d: usize) -> Result<()> {
        if self.rank == 0 || self.w_in.len() != self.rank * d || self.w_out.len() != d * self.rank {
            return Err(Error::InvalidArgument(format!(
                "linear compensation of rank {} has W_in of {} and W_out of {} values; hidden \
                 size {d} needs {} each",
                self.rank,
                self.w_in.len(),
                self.w_out.len(),
                self.rank * d
            )));
        }
        Ok(())
    }

    /// `u` (t, d) += the estimate for block input `x` (t, d), on `th` threads with the
    /// CPU's default products.
    pub fn apply(&self, x: &[f32], d: usize, eps: f32, u: &mut [f32], th: usize) {
        self.apply_with(matmul, x, d, eps, u, th, &mut Vec::new());
    }

    /// [`Compensation::apply`] with the products `mm` (the CPU backend passes its own, so a
    /// row-invariant backend stays row-invariant), reusing `scratch` between calls.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_with(
        &self,
        mm: MatmulFn,
        x: &[f32],
        d: usize,
        eps: f32,
        u: &mut [f32],
        th: usize,
        scratch: &mut Vec<f32>,
    ) {
        let (t, k) = (x.len() / d, self.rank);
        let n = t * d;
        scratch.resize(2 * n + t * k, 0.0);
        let (xn, rest) = scratch.split_at_mut(n);
        let (est, h) = rest.split_at_mut(n);
        unit_rmsnorm_into(x, d, eps, xn);
        mm(xn, t, &self.w_in, k, d, h, th);
        mm(h, t, &self.w_out, d, k, est, th);
        u[..n].iter_mut().zip(&*est).for_each(|(u, e)| *u += e);
    }
}

/// x / sqrt(mean(x^2) + eps), row by row: RMSNorm with unit weights.
pub fn unit_rmsnorm(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    unit_rmsnorm_into(x, d, eps, &mut out);
    out
}

/// [`unit_rmsnorm`] into `out`: `cpu::rmsnorm`'s sums without a weight vector of ones.
fn unit_rmsnorm_into(x: &[f32], d: usize, eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let s = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
        or.iter_mut().zip(xr).for_each(|(o, v)| *o = v * s);
    }
}

/// The normal equations of the ridge regressions of one block, one per rank, accumulated
/// over calibration sequences: `A = sum x^^T x^` (shared) and `B_r = sum x^^T m_r`.
pub struct NormalEquations {
    d: usize,
    eps: f32,
    a: Vec<f64>,
    b: Vec<Vec<f64>>,
    tokens: usize,
}

impl NormalEquations {
    /// Empty equations for hidden size `d` and `ranks` ranks; `eps` is the model's RMSNorm
    /// epsilon (x^ must be computed as [`Compensation::apply`] computes it).
    pub fn new(d: usize, ranks: usize, eps: f32) -> NormalEquations {
        NormalEquations {
            d,
            eps,
            a: vec![0.0; d * d],
            b: vec![vec![0.0; d * d]; ranks],
            tokens: 0,
        }
    }

    /// Tokens accumulated so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Add one sequence: block input `x` (t, d) and each rank's attention partial
    /// `partials[r]` = `a_r` (t, d) of the TP block (so `m_r` = their sum less `a_r`).
    pub fn add(&mut self, x: &[f32], partials: &[Vec<f32>], th: usize) -> Result<()> {
        let d = self.d;
        let t = x.len() / d;
        if x.len() != t * d
            || partials.len() != self.b.len()
            || partials.iter().any(|p| p.len() != t * d)
        {
            return Err(Error::InvalidArgument(format!(
                "compensation data: X of {} values and {} partials (of {:?} values) for {} \
                 ranks at hidden size {d}",
                x.len(),
                partials.len(),
                partials.iter().map(Vec::len).collect::<Vec<_>>(),
                self.b.len()
            )));
        }
        let xn = unit_rmsnorm(x, d, self.eps);
        let mut total = vec![0f32; t * d];
        for p in partials {
            total.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        // products in f32 per sequence (t <= a few thousand), sums over sequences in f64
        let mut g = vec![0f32; d * d];
        gemm_strided(d, d, t, &mut g, false, (&xn, 1, d), (&xn, d, 1), th);
        self.a.iter_mut().zip(&g).for_each(|(a, g)| *a += *g as f64);
        for (b, p) in self.b.iter_mut().zip(partials) {
            let m: Vec<f32> = total.iter().zip(p).map(|(s, a)| s - a).collect();
            gemm_strided(d, d, t, &mut g, false, (&xn, 1, d), (&m, d, 1), th);
            b.iter_mut().zip(&g).for_each(|(b, g)| *b += *g as f64);
        }
        self.tokens += t;
        Ok(())
    }

    /// Solve for every rank's map of rank `k` (ridge `ridge` x the mean diagonal of A).
    pub fn solve(&self, k: usize, ridge: f64) -> Result<Vec<Compensation>> {
        use nalgebra::{DMatrix, SymmetricEigen};
        let d = self.d;
        if k == 0 || k > d {
            return Err(Error::InvalidArgument(format!(
                "linear compensation rank {k}: it must be 1 ..= the hidden size {d}"
            )));
        }
        if self.tokens == 0 {
            return Err(Error::InvalidArgument(
                "linear compensation needs calibration tokens; none were added".into(),
            ));
        }
        if !(ridge.is_finite() && ridge > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "linear compensation ridge {ridge}: it must be a positive number"
            )));
        }
        let a = DMatrix::from_row_slice(d, d, &self.a);
        let lambda = ridge * a.trace() / d as f64;
        let reg = &a + DMatrix::identity(d, d) * lambda;
        let chol = reg.cholesky().ok_or_else(|| {
            Error::InvalidArgument("linear compensation: the normal matrix is not positive definite (calibration data with NaN or infinite activations?)".into())
        })?;
        self.b
            .iter()
            .map(|b| {
                // W (d, d): m ~ x^ W (rows are tokens)
                let w = chol.solve(&DMatrix::from_row_slice(d, d, b));
                // reduced rank: the top-k eigenvectors V of the fitted values' covariance
                // W^T A W; the map is x^ W V V^T, so W_in = (W V)^T and W_out = V
                let cov = w.transpose() * &a * &w;
                let eig = SymmetricEigen::new(cov);
                let mut order: Vec<usize> = (0..d).collect();
                order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
                let v = DMatrix::from_fn(d, k, |r, c| eig.eigenvectors[(r, order[c])]);
                let wv = &w * &v; // (d, k)
                let w_in: Vec<f32> = (0..k)
                    .flat_map(|c| (0..d).map(move |r| (c, r)))
                    .map(|(c, r)| wv[(r, c)] as f32)
                    .collect();
                let w_out: Vec<f32> = (0..d)
                    .flat_map(|r| (0..k).map(move |c| (r, c)))
                    .map(|(r, c)| v[(r, c)] as f32)
                    .collect();
                if w_in.iter().chain(&w_out).any(|v| !v.is_finite()) {
                    return Err(Error::InvalidArgument(
                        "linear compensation: the fitted map is not finite".into(),
                    ));
                }
                Ok(Compensation {
                    rank: k,
                    w_in,
                    w_out,
                })
            })
            .collect()
    }
}

/// How much of the missing partials LC leaves, on sequences it was not fitted on: the sum
/// over ranks and tokens of `|m_r - estimate|^2 / |m_r|^2` (1 = no better than zero-shot
/// SPD, 0 = exact).
pub fn residual_fraction(
    comps: &[Compensation],
    seqs: &[(Vec<f32>, Vec<Vec<f32>>)],
    d: usize,
    eps: f32,
    th: usize,
) -> f64 {
    let (mut err, mut base) = (0f64, 0f64);
    for (x, partials) in seqs {
        let mut total = vec![0f32; x.len()];
        for p in partials {
            total.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        for (c, p) in comps.iter().zip(partials) {
            let m: Vec<f32> = total.iter().zip(p).map(|(s, a)| s - a).collect();
            let mut est = vec![0f32; x.len()];
            c.apply(x, d, eps, &mut est, th);
            for (m, e) in m.iter().zip(&est) {
                base += (*m as f64).powi(2);
                err += (*m as f64 - *e as f64).powi(2);
            }
        }
    }
    if base == 0.0 {
        0.0
    } else {
        err / base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Sequences whose missing partials are an exact rank-2 linear function of x^ for rank 0
    /// and zero for rank 1 (rank 1's partial carries everything).
    fn planted(d: usize, seqs: usize, t: usize) -> Vec<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut s = 7u64;
        let u: Vec<f32> = (0..d * 2).map(|_| lcg(&mut s)).collect(); // (2, d)
        let v: Vec<f32> = (0..d * 2).map(|_| lcg(&mut s)).collect(); // (d, 2)
        let mut full = vec![0f32; d * d]; // m = x^ M, M (d, d) = U^T V^T
        for i in 0..d {
            for j in 0..d {
                full[i * d + j] = u[i] * v[j * 2] + u[d + i] * v[j * 2 + 1];
            }
        }
        (0..seqs)
            .map(|_| {
                let x: Vec<f32> = (0..t * d).map(|_| 3.0 * lcg(&mut s)).collect();
                let xn = unit_rmsnorm(&x, d, 1e-5);
                let mut m = vec![0f32; t * d];
                gemm_strided(t, d, d, &mut m, false, (&xn, d, 1), (&full, d, 1), 1);
                // rank 0's partial is noise, rank 1's is m: rank 0 misses exactly m, rank 1
                // misses noise
                let a0: Vec<f32> = (0..t * d).map(|_| lcg(&mut s)).collect();
                (x, vec![a0, m])
            })
            .collect()
    }

    #[test]
    fn a_planted_low_rank_map_is_recovered_on_unseen_sequences() {
        let d = 24;
        let data = planted(d, 12, 16);
        let mut ne = NormalEquations::new(d, 2, 1e-5);
        for (x, p) in &data[..8] {
            ne.add(x, p, 1).unwrap();
        }
        assert_eq!(ne.tokens(), 8 * 16);
        let comps = ne.solve(2, 1e-6).unwrap();
        let held = &data[8..];
        let f0 = residual_fraction(&comps[..1], held, d, 1e-5, 1);
        assert!(f0 < 1e-4, "rank 0 keeps {f0} of a planted rank-2 map");
        // rank 1 misses rank 0's partial, pure noise: nothing to predict
        let swapped: Vec<_> = held
            .iter()
            .map(|(x, p)| (x.clone(), vec![p[1].clone(), p[0].clone()]))
            .collect();
        let f1 = residual_fraction(&comps[1..], &swapped, d, 1e-5, 1);
        assert!(f1 > 0.9, "noise predicted away ({f1}): overfitting");
        // a rank-1 map cannot hold a rank-2 one
        let one = ne.solve(1, 1e-6).unwrap();
        let f = residual_fraction(&one[..1], held, d, 1e-5, 1);
        assert!(f > 0.05 && f < 0.95, "rank 1 of a rank-2 map left {f}");
    }

    #[test]
    fn bad_ranks_ridges_and_shapes_are_refused() {
        let d = 8;
        let mut ne = NormalEquations::new(d, 2, 1e-5);
        assert!(ne.solve(2, 1e-2).is_err(), "no data");
        let x = vec![1.0; 3 * d];
        assert!(
            ne.add(&x, &[vec![0.0; 3 * d]], 1).is_err(),
            "one partial for two ranks"
        );
        assert!(ne
            .add(&x, &[vec![0.0; 3 * d], vec![0.0; 2 * d]], 1)
            .is_err());
        let data = planted(d, 2, 5);
        for (x, p) in &data {
            ne.add(x, p, 1).unwrap();
        }
        assert!(ne.solve(0, 1e-2).is_err());
        assert!(ne.solve(d + 1, 1e-2).is_err());
        assert!(ne.solve(2, 0.0).is_err());
        assert!(ne.solve(2, f64::NAN).is_err());
        let c = ne.solve(3, 1e-2).unwrap();
        assert_eq!((c.len(), c[0].rank), (2, 3));
        c[0].check(d).unwrap();
        assert!(c[0].check(d + 1).is_err());
    }

    #[test]
    fn apply_adds_w_out_w_in_of_the_unit_normed_input() {
        let (d, k, t) = (5, 2, 3);
        let mut s = 3u64;
        let c = Compensation {
            rank: k,
            w_in: (0..k * d).map(|_| lcg(&mut s)).collect(),
            w_out: (0..d * k).map(|_| lcg(&mut s)).collect(),
        };
        let x: Vec<f32> = (0..t * d).map(|_| 4.0 * lcg(&mut s)).collect();
        let mut u = vec![1.0f32; t * d];
        c.apply(&x, d, 1e-5, &mut u, 1);
        for ti in 0..t {
            let row = &x[ti * d..(ti + 1) * d];
            let r = (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-5).sqrt();
            for o in 0..d {
                let mut want = 1.0f64;
                for j in 0..k {
                    let h: f64 = (0..d)
                        .map(|i| c.w_in[j * d + i] as f64 * (row[i] / r) as f64)
                        .sum();
                    want += c.w_out[o * k + j] as f64 * h;
                }
                assert!((u[ti * d + o] as f64 - want).abs() < 1e-5, "{ti},{o}");
            }
        }
    }
}
