//! Head grouping (HG) for extremely sensitive SPD blocks (DESIGN.md section 3).
//!
//! In an SPD block each rank's MLP sees only its own heads' attention output, so which heads
//! share a rank matters. HG (1) assigns heads to ranks so that heads on one rank are
//! dissimilar — the sum of pairwise distances between their attention-score patterns on
//! calibration data is maximised — and (2) pairs each head group with the MLP shard whose
//! output norm on that group's attention output is largest (an assignment over the N!
//! pairings, exhaustive up to 8 ranks, the Hungarian algorithm beyond). Every rank keeps its
//! number of query heads. With GQA whole KV groups move when the partition allows it (every
//! rank holds whole KV groups); otherwise heads move one by one and a rank computes every KV
//! head its query heads use.

#![warn(missing_docs)]

use crate::backend::cpu::{gemm_strided, rmsnorm};
use crate::config::LlamaConfig;
use crate::distill::{attention_output, mlp_into, qkv_rope};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::layout::{even_split, RankShard, TpLayout};
use crate::model::load_block;

/// Causal attention probabilities of every head of block `layer` on inputs `x` (t, d),
/// flattened per head: head h's pattern is rows p = 0..t of softmax over keys 0..=p.
pub fn head_patterns(engine: &Engine, layer: usize, xs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
    let cfg = &engine.cfg;
    let full = TpLayout::new(cfg, 1)?.ranks.remove(0);
    let w = load_block(&engine.files, cfg, &full, layer)?;
    let mut pats = vec![Vec::new(); cfg.n_heads];
    for x in xs {
        for (pat, p) in pats.iter_mut().zip(passage_patterns(cfg, &w, x)) {
            pat.extend(p);
        }
    }
    Ok(pats)
}

/// One passage's attention probabilities per head (see [`head_patterns`]).
fn passage_patterns(
    cfg: &LlamaConfig,
    w: &crate::backend::BlockWeights,
    x: &[f32],
) -> Vec<Vec<f32>> {
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let (nq, nkv) = (cfg.n_heads, cfg.n_kv_heads);
    let width = (nq + 2 * nkv) * hd;
    let t = x.len() / d;
    let qkv = qkv_rope(cfg, w, x, nq, nkv);
    let scale = 1.0 / (hd as f32).sqrt();
    (0..nq)
        .map(|h| {
            let kh = h / cfg.group_size();
            let mut pat = Vec::with_capacity(t * (t + 1) / 2);
            for p in 0..t {
                let q = &qkv[p * width + h * hd..p * width + (h + 1) * hd];
                let scores: Vec<f32> = (0..=p)
                    .map(|s| {
                        let k = &qkv[s * width + (nq + kh) * hd..s * width + (nq + kh + 1) * hd];
                        crate::backend::cpu::dot(q, k) * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = scores.iter().map(|s| (s - m).exp()).sum();
                pat.extend(scores.iter().map(|s| (s - m).exp() / z));
            }
            pat
        })
        .collect()
}

/// Pairwise Euclidean distances between head patterns.
pub fn distances(p: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let mut sq = vec![vec![0.0; p.len()]; p.len()];
    add_squared_distances(&mut sq, p);
    roots(sq)
}

/// Add the squared distances between `p`'s patterns to `sq` (upper triangle).
fn add_squared_distances(sq: &mut [Vec<f64>], p: &[Vec<f32>]) {
    let n = p.len();
    for i in 0..n {
        for j in i + 1..n {
            sq[i][j] = p[i]
                .iter()
                .zip(&p[j])
                .fold(sq[i][j], |s, (a, b)| s + ((a - b) as f64).powi(2));
        }
    }
}

/// Square roots of the upper triangle, mirrored.
fn roots(sq: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let n = sq.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| match i.cmp(&j) {
                    std::cmp::Ordering::Less => sq[i][j].sqrt(),
                    std::cmp::Ordering::Greater => sq[j][i].sqrt(),
                    std::cmp::Ordering::Equal => 0.0,
                })
                .collect()
        })
        .collect()
}

/// `distances(&head_patterns(engine, layer, xs))`, bit for bit, one passage at a time: memory
/// for one passage's patterns (heads x t^2 / 2), not every passage's.
pub fn head_distances(engine: &Engine, layer: usize, xs: &[Vec<f32>]) -> Result<Vec<Vec<f64>>> {
    let cfg = &engine.cfg;
    let full = TpLayout::new(cfg, 1)?.ranks.remove(0);
    let w = load_block(&engine.files, cfg, &full, layer)?;
    let mut sq = vec![vec![0.0; cfg.n_heads]; cfg.n_heads];
    for x in xs {
        add_squared_distances(&mut sq, &passage_patterns(cfg, &w, x));
    }
    Ok(roots(sq))
}

/// Sum over ranks of the pairwise distances between the heads on that rank.
pub fn within_rank_dissimilarity(heads: &[Vec<usize>], dist: &[Vec<f64>]) -> f64 {
    heads
        .iter()
        .map(|g| {
            let mut s = 0.0;
            for (i, a) in g.iter().enumerate() {
                for b in &g[i + 1..] {
                    s += dist[*a][*b];
                }
            }
            s
        })
        .sum()
}

/// Re-assign heads to ranks (same count per rank) to maximise within-rank dissimilarity:
/// best-improvement swaps of equal-size units (KV groups when the partition allows, else
/// single heads) until none improves.
pub fn group_heads(cfg: &LlamaConfig, start: &[Vec<usize>], dist: &[Vec<f64>]) -> Vec<Vec<usize>> {
    let g = cfg.group_size();
    // KV-group ids of a rank's heads, sorted and unique
    let groups_of = |r: &[usize], unit: usize| -> Vec<usize> {
        let mut u: Vec<usize> = r.iter().map(|h| h / unit).collect();
        u.sort_unstable();
        u.dedup();
        u
    };
    // whole groups only when every rank holds complete KV groups (an explicit layout need
    // not be contiguous: [[0, 2], [1, 3]] has two heads per rank but splits both groups)
    let whole_groups = g > 1 && start.iter().all(|r| groups_of(r, g).len() * g == r.len());
    let unit = if whole_groups { g } else { 1 };
    // units per rank, as lists of unit ids; a unit is `unit` consecutive heads
    let mut ranks: Vec<Vec<usize>> = start.iter().map(|r| groups_of(r, unit)).collect();
    let heads_of = |ranks: &Vec<Vec<usize>>| -> Vec<Vec<usize>> {
        ranks
            .iter()
            .map(|us| us.iter().flat_map(|u| u * unit..(u + 1) * unit).collect())
            .collect()
    };
    let mut best = within_rank_dissimilarity(&heads_of(&ranks), dist);
    loop {
        let mut improvement = None;
        for ra in 0..ranks.len() {
            for rb in ra + 1..ranks.len() {
                for ia in 0..ranks[ra].len() {
                    for ib in 0..ranks[rb].len() {
                        let mut trial = ranks.clone();
                        let tmp = trial[ra][ia];
                        trial[ra][ia] = trial[rb][ib];
                        trial[rb][ib] = tmp;
                        let v = within_rank_dissimilarity(&heads_of(&trial), dist);
                        if v > best + 1e-12 && improvement.as_ref().is_none_or(|(bv, _)| v > *bv) {
                            improvement = Some((v, trial));
                        }
                    }
                }
            }
        }
        match improvement {
            Some((v, trial)) => {
                best = v;
                ranks = trial;
            }
            None => break,
        }
    }
    heads_of(&ranks)
        .into_iter()
        .map(|mut h| {
            h.sort_unstable();
            h
        })
        .collect()
}

/// All permutations of 0..n (n <= 8), lexicographic.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..n {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out.sort();
    out
}

/// `score[g][m]`: sum over calibration tokens of ||MLP_m(RMSNorm(X + a_g))|| for head group g
/// (its attention output through its W_o columns) and MLP shard m.
pub fn mlp_scores(
    engine: &Engine,
    layer: usize,
    heads: &[Vec<usize>],
    xs: &[Vec<f32>],
) -> Result<Vec<Vec<f64>>> {
    let cfg = &engine.cfg;
    let tp = heads.len();
    let ffn = even_split(cfg.ffn, tp);
    let d = cfg.hidden;
    let mut score = vec![vec![0.0; tp]; tp];
    // each MLP shard's weights, loaded (dequantised) once for every group and passage
    let mlps = ffn
        .iter()
        .map(|range| {
            // only the MLP is used: the smallest attention share (head 0) comes along
            let shard = RankShard {
                q_heads: vec![0],
                kv_heads: vec![0],
                ffn: range.clone(),
            };
            load_block(&engine.files, cfg, &shard, layer)
        })
        .collect::<Result<Vec<_>>>()?;
    for (g, hs) in heads.iter().enumerate() {
        let shard_g = TpLayout::with_heads(cfg, {
            let mut all = vec![hs.clone()];
            let rest: Vec<usize> = (0..cfg.n_heads).filter(|h| !hs.contains(h)).collect();
            if !rest.is_empty() {
                all.push(rest);
            }
            all
        })?
        .ranks
        .remove(0);
        let wg = load_block(&engine.files, cfg, &shard_g, layer)?;
        let q = hs.len() * cfg.head_dim;
        for x in xs {
            let t = x.len() / d;
            let att = attention_output(cfg, &shard_g, &wg, x);
            let mut u = x.clone();
            gemm_strided(t, d, q, &mut u, true, (&att, q, 1), (&wg.wo, 1, q), 1);
            let mut n = vec![0f32; t * d];
            rmsnorm(&u, &wg.ffn_norm, cfg.rms_eps, &mut n);
            for (m, wm) in mlps.iter().enumerate() {
                let mut out = vec![0f32; t * d];
                mlp_into(&n, &wm.w_gate_up, &wm.w_down, d, 1, &mut out);
                score[g][m] += out
                    .chunks_exact(d)
                    .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
                    .sum::<f64>();
            }
        }
    }
    Ok(score)
}

/// The MLP shard for each head group maximising the summed score: exhaustive up to 8 ranks,
/// the Hungarian algorithm beyond (same optimum, ties aside). `InvalidArgument` for a score
/// matrix that is not square, or (beyond 8 ranks) has a non-finite entry.
pub fn pair_mlp(score: &[Vec<f64>]) -> Result<Vec<usize>> {
    let n = score.len();
    if score.iter().any(|r| r.len() != n) {
        return Err(Error::InvalidArgument(format!(
            "MLP pairing needs a square score matrix ({n} head groups)"
        )));
    }
    if n > 8 {
        if score.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(
                "MLP pairing: non-finite MLP output norm".into(),
            ));
        }
        return Ok(hungarian_max(score));
    }
    let mut best = (f64::NEG_INFINITY, (0..n).collect::<Vec<_>>());
    for p in permutations(n) {
        let v: f64 = p.iter().enumerate().map(|(g, m)| score[g][*m]).sum();
        if v > best.0 + 1e-12 {
            best = (v, p);
        }
    }
    Ok(best.1)
}

/// Maximum-weight perfect matching of rows to columns of a square, finite matrix (the
/// Hungarian algorithm with potentials, O(n^3), on costs -score): `out[row]` = column.
fn hungarian_max(score: &[Vec<f64>]) -> Vec<usize> {
    let n = score.len();
    // 1-based; column 0 is the virtual start, p[j] the row matched to column j (0: none)
    let (mut u, mut v) = (vec![0f64; n + 1], vec![0f64; n + 1]);
    let (mut p, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=n {
                if !used[j] {
                    let cur = -score[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        while j0 != 0 {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
        }
    }
    let mut out = vec![0; n];
    for j in 1..=n {
        out[p[j] - 1] = j - 1;
    }
    out
}

/// The head grouping of one block: which query heads and which FFN shard each rank gets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Grouping {
    /// `heads[r]`: the global query heads of rank r.
    pub heads: Vec<Vec<usize>>,
    /// `ffn_order[r]`: which of the even FFN shards rank r gets.
    pub ffn_order: Vec<usize>,
    /// [`within_rank_dissimilarity`] of the engine's layout before grouping (0 for a grouping
    /// read from a plan).
    pub dissimilarity_before: f64,
    /// [`within_rank_dissimilarity`] of `heads` (0 for a grouping read from a plan).
    pub dissimilarity_after: f64,
}

impl Grouping {
    /// Every rank's shard of the block: `heads` with the KV heads they use, and FFN shard
    /// `ffn_order[r]` of an even split. `InvalidArgument` when `ffn_order` is not a
    /// permutation of the ranks; the errors of [`TpLayout::with_heads`] for bad `heads`.
    pub fn shards(&self, cfg: &LlamaConfig) -> Result<Vec<RankShard>> {
        let mut sorted = self.ffn_order.clone();
        sorted.sort_unstable();
        if sorted != (0..self.heads.len()).collect::<Vec<_>>() {
            return Err(Error::InvalidArgument(format!(
                "MLP shard order {:?} is not a permutation of 0..{}",
                self.ffn_order,
                self.heads.len()
            )));
        }
        let ffn = even_split(cfg.ffn, self.heads.len());
        let mut layout = TpLayout::with_heads(cfg, self.heads.clone())?;
        for (r, s) in layout.ranks.iter_mut().enumerate() {
            s.ffn = ffn[self.ffn_order[r]].clone();
        }
        Ok(layout.ranks)
    }
}

/// Head grouping of block `layer` on calibration sequences; applies it to the engine (original
/// weights, re-assigned) and returns it.
pub fn group_block(engine: &mut Engine, layer: usize, calib: &[Vec<u32>]) -> Result<Grouping> {
    if calib.iter().all(|s| s.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "head grouping of block {layer} needs calibration tokens; got {} empty sequences",
            calib.len()
        )));
    }
    let xs = calib
        .iter()
        .map(|s| engine.block_input(s, layer))
        .collect::<Result<Vec<_>>>()?;
    let start: Vec<Vec<usize>> = engine
        .layout
        .ranks
        .iter()
        .map(|r| r.q_heads.clone())
        .collect();
    let dist = head_distances(engine, layer, &xs)?;
    let heads = group_heads(&engine.cfg, &start, &dist);
    let score = mlp_scores(engine, layer, &heads, &xs)?;
    let g = Grouping {
        dissimilarity_before: within_rank_dissimilarity(&start, &dist),
        dissimilarity_after: within_rank_dissimilarity(&heads, &dist),
        ffn_order: pair_mlp(&score)?,
        heads,
    };
    let shards = g.shards(&engine.cfg)?;
    engine.set_block_shards(layer, shards)?;
    Ok(g)
}

/// Apply a recorded grouping (from a plan file).
pub fn apply(
    engine: &mut Engine,
    layer: usize,
    heads: Vec<Vec<usize>>,
    ffn_order: Vec<usize>,
) -> Result<()> {
    let g = Grouping {
        heads,
        ffn_order,
        dissimilarity_before: 0.0,
        dissimilarity_after: 0.0,
    };
    let shards = g.shards(&engine.cfg)?;
    engine.set_block_shards(layer, shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_all_distinct() {
        let p = permutations(4);
        assert_eq!(p.len(), 24);
        let mut q = p.clone();
        q.dedup();
        assert_eq!(q.len(), 24);
    }

    #[test]
    fn pairing_finds_the_best_assignment() {
        let s = vec![
            vec![1.0, 5.0, 0.0],
            vec![4.0, 1.0, 0.0],
            vec![0.0, 0.0, 2.0],
        ];
        assert_eq!(pair_mlp(&s).unwrap(), vec![1, 0, 2]);
    }
}
