//! Review of the engine, the block schedule, generation and the CPU backend: positions past
//! the end of `usize`, capacities whose tables overflow, head-grouping shards that disagree
//! with themselves, and bad arguments that used to poison the engine (or panic) instead of
//! being refused. Each test fails without its fix.

mod common;
use common::*;
use std::sync::Arc;
use syncdrop::backend::cpu::CpuBackend;
use syncdrop::backend::Backend;
use syncdrop::comm::{Identity, Wire};
use syncdrop::Error;

/// The small tiny model (seed 5, f32) written as a GGUF into `dir`, opened.
fn tiny_files(dir: &std::path::Path) -> syncdrop::ModelFiles {
    let path = dir.join("m.gguf");
    write_gguf(
        &path,
        &Tiny::small(),
        5,
        syncdrop::quant::GgmlType::F32,
        "llama",
    );
    syncdrop::ModelFiles::open(&path).unwrap()
}

const PROMPT: [u32; 5] = [3, 1, 4, 1, 5];

/// The engine still runs a forward, and gives the logits it gave before.
fn still_usable(e: &mut syncdrop::Engine, before: &[f32], what: &str) {
    match e.forward(&PROMPT, 0, 4..5) {
        Ok(l) => assert_eq!(l.data, before, "{what}: logits changed"),
        Err(err) => panic!("{what}: the engine is unusable afterwards: {err}"),
    }
}

/// A forward at a position whose end overflows `usize`, or that runs past the KV cache, is a
/// `ContextOverflow` that leaves the engine usable: the driver checks it before any rank sees
/// it. Before, the wrapped `pos0 + t` passed the capacity check and each rank thread panicked
/// indexing its RoPE table ("rank thread exited unexpectedly"); later the ranks refused it
/// themselves, which poisoned the engine for good.
#[test]
fn a_position_past_the_cache_is_a_context_overflow_that_leaves_the_engine_usable() {
    let (mut e, dir) = tiny_engine(2, "rv-posmax", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    assert_eq!(e.capacity(), 64);
    let long = vec![1u32; 65];
    let cases: [(&[u32], usize, usize); 4] = [
        (&PROMPT[..1], usize::MAX, usize::MAX),
        (&PROMPT[..], usize::MAX - 2, usize::MAX),
        (&PROMPT[..], 60, 65),
        (&long[..], 0, 65),
    ];
    for (tokens, pos0, needed) in cases {
        match e.forward(tokens, pos0, 0..1) {
            Err(Error::ContextOverflow {
                needed: n,
                capacity,
            }) => assert_eq!((n, capacity), (needed, 64), "pos0 {pos0}"),
            other => panic!("pos0 {pos0}: expected ContextOverflow, got {other:?}"),
        }
        still_usable(&mut e, &before, &format!("forward at {pos0}"));
    }
    // the ISO prefill and the block-input path check it too
    assert!(matches!(
        e.forward_iso(&long, 30, 0..1),
        Err(Error::ContextOverflow { needed: 65, .. })
    ));
    still_usable(&mut e, &before, "forward_iso");
    assert!(matches!(
        e.block_input(&long, 1),
        Err(Error::ContextOverflow { needed: 65, .. })
    ));
    still_usable(&mut e, &before, "block_input");
    // the last position that fits is still accepted
    e.forward(&PROMPT, 59, 4..5).unwrap();
    std::fs::remove_dir_all(dir).ok();
}

/// The same at the CPU backend's own seam (`RankModel` is not the only caller of
/// `attn_in` / `attention`): an error, not a panic.
#[test]
fn cpu_backend_checks_positions_without_overflow() {
    let dir = tmpdir("rv-cpupos");
    let files = tiny_files(&dir);
    let cfg = files.config().unwrap();
    let layout = syncdrop::TpLayout::new(&cfg, 1).unwrap();
    let dims = syncdrop::model::rank_dims(&cfg, &layout.ranks[0], &(0..cfg.vocab), 16);
    let comm = Arc::new(Identity::with_wire(Wire::F32));
    let mut be = CpuBackend::new(dims, comm, 1, false).unwrap();
    let w = syncdrop::model::load_block(&files, &cfg, &layout.ranks[0], 0).unwrap();
    be.load_layer(0, w).unwrap();
    let x = be.alloc(cfg.hidden).unwrap();
    let mut q = be.alloc(cfg.n_heads * cfg.head_dim).unwrap();
    let mut out = be.alloc(cfg.n_heads * cfg.head_dim).unwrap();
    // the last position fits
    be.attn_in(0, &x, 1, 15, &mut q).unwrap();
    be.attention(0, &q, 1, 15, &mut out).unwrap();
    for pos0 in [usize::MAX, usize::MAX - 3] {
        let r = be.attn_in(0, &x, 4, pos0, &mut q);
        assert!(
            matches!(r, Err(Error::ContextOverflow { .. })),
            "attn_in at {pos0}: {r:?}"
        );
        let r = be.attention(0, &q, 4, pos0, &mut out);
        assert!(
            matches!(r, Err(Error::ContextOverflow { .. })),
            "attention at {pos0}: {r:?}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A capacity whose RoPE tables / KV cache overflow `usize` is refused with
/// `InvalidArgument`. Before, the table size wrapped (to 0 for 2^62 tokens) and every rank
/// panicked filling it, or panicked with "capacity overflow".
#[test]
fn a_capacity_too_large_to_address_is_refused() {
    let dir = tmpdir("rv-cap");
    let files = Arc::new(tiny_files(&dir));
    for capacity in [usize::MAX, usize::MAX / 4 + 1] {
        let opts = syncdrop::EngineOptions {
            tp: 2,
            threads: 1,
            capacity,
            ..Default::default()
        };
        match syncdrop::Engine::new(files.clone(), &opts) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("too large"), "{m}"),
            Err(e) => panic!("capacity {capacity}: expected InvalidArgument, got {e}"),
            Ok(_) => panic!("capacity {capacity} accepted"),
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// An SPD plan of the wrong length is refused on the driver and leaves the engine usable.
/// Before, every rank refused it, aborted the communicator and poisoned the engine for good.
#[test]
fn a_wrong_length_spd_plan_leaves_the_engine_usable() {
    let (mut e, dir) = tiny_engine(2, "rv-spdlen", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    for bad in [&[true][..], &[true, true, true], &[]] {
        assert!(matches!(e.set_spd(bad), Err(Error::InvalidArgument(_))));
        assert_eq!(e.spd(), &[false, false]);
        still_usable(&mut e, &before, "set_spd");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Logits rows outside the tokens, and a forward of no tokens, are refused on the driver and
/// leave the engine usable (forward, forward_iso, prefill under every ISO mode).
#[test]
fn bad_logits_rows_leave_the_engine_usable() {
    use syncdrop::iso::IsoMode;
    let (mut e, dir) = tiny_engine(2, "rv-rows", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    #[allow(clippy::reversed_empty_ranges)]
    let bad_rows = [0..6, 5..6, 3..3, 4..2];
    for rows in bad_rows.clone() {
        let r = e.forward(&PROMPT, 0, rows.clone());
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{rows:?}");
        still_usable(&mut e, &before, "forward");
        let r = e.forward_iso(&PROMPT, 2, rows.clone());
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "iso {rows:?}");
        still_usable(&mut e, &before, "forward_iso");
    }
    for mode in [IsoMode::Off, IsoMode::Split(2), IsoMode::Auto] {
        e.set_iso(mode, None);
        let r = e.prefill(&[], 0..1);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{mode:?}");
        for rows in bad_rows.clone() {
            let r = e.prefill(&PROMPT, rows.clone());
            assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "{mode:?} {rows:?}"
            );
        }
        e.set_iso(IsoMode::Off, None);
        still_usable(&mut e, &before, "prefill");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `block_input` of a block past the last, or of no tokens, is refused on the driver and
/// leaves the engine usable.
#[test]
fn a_bad_block_input_leaves_the_engine_usable() {
    let (mut e, dir) = tiny_engine(2, "rv-blockin", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    assert!(matches!(
        e.block_input(&PROMPT, 2),
        Err(Error::InvalidArgument(_))
    ));
    still_usable(&mut e, &before, "block_input past the last block");
    assert!(matches!(
        e.block_input(&[], 1),
        Err(Error::InvalidArgument(_))
    ));
    still_usable(&mut e, &before, "block_input of no tokens");
    // the good call still works: block 0's input is the embeddings
    let h = e.block_input(&PROMPT[..2], 0).unwrap();
    assert_eq!(h.len(), 2 * e.cfg.hidden);
    std::fs::remove_dir_all(dir).ok();
}

/// `load_layer` with one rank's shard of the wrong shape (or a block past the last) is
/// refused before any rank installs anything: the engine stays usable with its old weights.
/// Before, rank 0 installed its new shard, rank 1 refused its own, and the engine was
/// poisoned (half a block replaced).
#[test]
fn a_bad_shard_in_load_layer_changes_nothing() {
    let (mut e, dir) = tiny_engine(2, "rv-loadlayer", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    let shards = e.block_shards(0);
    let good: Vec<_> = shards
        .iter()
        .map(|s| syncdrop::model::load_block(&e.files, &e.cfg, s, 0).unwrap())
        .collect();
    // rank 0 gets different (valid) weights, rank 1 a shard that is one value short
    let mut bad = good.clone();
    bad[0].w_down.iter_mut().for_each(|v| *v *= 2.0);
    bad[1].attn_norm.pop();
    let r = e.load_layer(0, bad);
    assert!(
        matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("rank 1")),
        "{r:?}"
    );
    still_usable(&mut e, &before, "load_layer with a bad shard");
    // a block past the last
    let r = e.load_layer(2, good.clone());
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    still_usable(&mut e, &before, "load_layer past the last block");
    // the good shards load
    e.load_layer(0, good).unwrap();
    still_usable(&mut e, &before, "load_layer of the same weights");
    std::fs::remove_dir_all(dir).ok();
}

/// Head-grouping shards whose KV heads are not those their query heads use are refused.
/// Before, `load_block` panicked on the caller's thread ("layout invariant: every query
/// head's KV head is local").
#[test]
fn block_shards_with_the_wrong_kv_heads_are_refused() {
    let (mut e, dir) = tiny_engine(2, "rv-kvheads", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    let mut shards = e.block_shards(0);
    assert_eq!(shards[0].kv_heads, vec![0]);
    shards[0].kv_heads = vec![1];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.set_block_shards(0, shards)
    }));
    match r {
        Ok(Err(Error::InvalidArgument(m))) => assert!(m.contains("KV heads"), "{m}"),
        Ok(other) => panic!("expected InvalidArgument, got {other:?}"),
        Err(_) => panic!("set_block_shards panicked"),
    }
    still_usable(&mut e, &before, "set_block_shards with wrong KV heads");
    assert_eq!(e.block_shards(0), e.layout.ranks);
    std::fs::remove_dir_all(dir).ok();
}

/// Head-grouping shards whose FFN ranges overlap, leave a gap or run past the FFN are
/// refused. Before, overlapping ranges were accepted and the MLP summed some columns twice
/// (the logits silently changed); a permutation of the ranges is still accepted.
#[test]
fn block_shards_whose_ffn_ranges_do_not_partition_are_refused() {
    let (mut e, dir) = tiny_engine(2, "rv-ffn", 2, false);
    let before = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    let ffn = e.cfg.ffn;
    for (a, b) in [
        (0..40, 20..ffn),     // overlap
        (0..30, 32..ffn),     // gap
        (0..32, 32..ffn + 8), // past the end
        (0..ffn, 0..ffn),     // everything twice
        (0..ffn, 5..5),       // all on one rank: allowed
    ] {
        let mut shards = e.block_shards(0);
        shards[0].ffn = a.clone();
        shards[1].ffn = b.clone();
        let r = e.set_block_shards(0, shards);
        if b.is_empty() {
            r.unwrap();
            let l = e.forward(&PROMPT, 0, 4..5).unwrap().data;
            assert!(max_abs_diff(&l, &before) < 1e-4, "{a:?} {b:?}");
            let shards = e.layout.ranks.clone();
            e.set_block_shards(0, shards).unwrap();
            continue;
        }
        match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("FFN"), "{m}"),
            other => panic!("{a:?} / {b:?}: expected InvalidArgument, got {other:?}"),
        }
        still_usable(&mut e, &before, "set_block_shards with bad FFN ranges");
    }
    // the two halves swapped: same sum (up to the summation order)
    let mut shards = e.block_shards(0);
    shards[0].ffn = 32..ffn;
    shards[1].ffn = 0..32;
    e.set_block_shards(0, shards).unwrap();
    let l = e.forward(&PROMPT, 0, 4..5).unwrap().data;
    assert!(max_abs_diff(&l, &before) < 1e-4);
    std::fs::remove_dir_all(dir).ok();
}

/// A CPU rank that records every position `attn_in` / `attention` are asked for: what a
/// backend without its own overflow check (the CUDA decode graph's `graph_set_pos` adds
/// `pos0 + 1` unchecked) would have been handed.
struct Recording {
    inner: CpuBackend,
    positions: Vec<(usize, usize)>,
}

impl Backend for Recording {
    type Buf = Vec<f32>;
    type Pending = <CpuBackend as Backend>::Pending;
    fn name(&self) -> &'static str {
        "recording"
    }
    fn dims(&self) -> &syncdrop::backend::RankDims {
        self.inner.dims()
    }
    fn alloc(&mut self, n: usize) -> syncdrop::Result<Vec<f32>> {
        self.inner.alloc(n)
    }
    fn upload(&mut self, h: &[f32], b: &mut Vec<f32>) -> syncdrop::Result<()> {
        self.inner.upload(h, b)
    }
    fn download(&mut self, b: &Vec<f32>, h: &mut [f32]) -> syncdrop::Result<()> {
        self.inner.download(b, h)
    }
    fn load_layer(&mut self, l: usize, w: syncdrop::backend::BlockWeights) -> syncdrop::Result<()> {
        self.inner.load_layer(l, w)
    }
    fn load_head(&mut self, w: syncdrop::backend::HeadWeights) -> syncdrop::Result<()> {
        self.inner.load_head(w)
    }
    fn attn_in(
        &mut self,
        l: usize,
        x: &Vec<f32>,
        t: usize,
        pos0: usize,
        q: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.positions.push((pos0, t));
        self.inner.attn_in(l, x, t, pos0, q)
    }
    fn attention(
        &mut self,
        l: usize,
        q: &Vec<f32>,
        t: usize,
        pos0: usize,
        o: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.positions.push((pos0, t));
        self.inner.attention(l, q, t, pos0, o)
    }
    fn o_proj(
        &mut self,
        l: usize,
        a: &Vec<f32>,
        t: usize,
        o: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.inner.o_proj(l, a, t, o)
    }
    fn spd_compensate(
        &mut self,
        l: usize,
        x: &Vec<f32>,
        t: usize,
        u: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.inner.spd_compensate(l, x, t, u)
    }
    fn add_ffn_norm(
        &mut self,
        l: usize,
        r: &mut Vec<f32>,
        d: &Vec<f32>,
        t: usize,
        n: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.inner.add_ffn_norm(l, r, d, t, n)
    }
    fn mlp(&mut self, l: usize, n: &Vec<f32>, t: usize, o: &mut Vec<f32>) -> syncdrop::Result<()> {
        self.inner.mlp(l, n, t, o)
    }
    fn add(&mut self, a: &mut Vec<f32>, x: &Vec<f32>, n: usize) -> syncdrop::Result<()> {
        self.inner.add(a, x, n)
    }
    fn copy(&mut self, s: &Vec<f32>, d: &mut Vec<f32>, n: usize) -> syncdrop::Result<()> {
        self.inner.copy(s, d, n)
    }
    fn all_reduce(&mut self, b: &mut Vec<f32>, n: usize) -> syncdrop::Result<()> {
        self.inner.all_reduce(b, n)
    }
    fn all_reduce_start(&mut self, b: Vec<f32>, n: usize) -> syncdrop::Result<Self::Pending> {
        self.inner.all_reduce_start(b, n)
    }
    fn all_reduce_wait(&mut self, p: Self::Pending) -> syncdrop::Result<Vec<f32>> {
        self.inner.all_reduce_wait(p)
    }
    fn lm_head(
        &mut self,
        x: &Vec<f32>,
        rows: std::ops::Range<usize>,
        o: &mut Vec<f32>,
    ) -> syncdrop::Result<()> {
        self.inner.lm_head(x, rows, o)
    }
    fn comm_stats(&self) -> syncdrop::comm::CommStats {
        self.inner.comm_stats()
    }
    fn reset_comm_stats(&mut self) {
        self.inner.reset_comm_stats()
    }
}

/// The block schedule (`RankModel`, backend-agnostic) refuses positions past the KV cache,
/// overflowing ones included, before it issues any op: no backend is handed a position
/// whose end wraps around `usize`. Before, it passed them on and relied on each backend's
/// own (wrapping) check.
#[test]
fn the_block_schedule_refuses_overflowing_positions_before_any_op() {
    let dir = tmpdir("rv-schedpos");
    let files = tiny_files(&dir);
    let cfg = files.config().unwrap();
    let layout = syncdrop::TpLayout::new(&cfg, 1).unwrap();
    let vocab = 0..cfg.vocab;
    let dims = syncdrop::model::rank_dims(&cfg, &layout.ranks[0], &vocab, 16);
    let inner = CpuBackend::new(dims, Arc::new(Identity::with_wire(Wire::F32)), 1, false).unwrap();
    let be = Recording {
        inner,
        positions: Vec::new(),
    };
    let mut m = syncdrop::model::RankModel::load(&files, &cfg, &layout, 0, vocab, be).unwrap();
    let emb = syncdrop::model::embed(&files, &cfg, &PROMPT).unwrap();
    // the cache's last position is fine
    m.forward(&emb[..cfg.hidden], 15, 0..1).unwrap();
    assert!(!m.backend.positions.is_empty());
    m.backend.positions.clear();
    for (t, pos0) in [(1, usize::MAX), (5, usize::MAX - 2), (5, 12), (1, 16)] {
        let r = m.forward(&emb[..t * cfg.hidden], pos0, 0..1);
        assert!(
            matches!(r, Err(Error::ContextOverflow { .. })),
            "{t} tokens at {pos0}: {r:?}"
        );
        assert!(
            m.backend.positions.is_empty(),
            "{t} tokens at {pos0}: ops issued at {:?}",
            m.backend.positions
        );
    }
    // ISO: 17 tokens do not fit 16 positions, whatever the split
    let long: Vec<u32> = (0..17).map(|i| i % 60).collect();
    let emb = syncdrop::model::embed(&files, &cfg, &long).unwrap();
    let r = m.forward_iso(&emb, 8, 16..17);
    assert!(matches!(r, Err(Error::ContextOverflow { .. })), "{r:?}");
    assert!(m.backend.positions.is_empty(), "{:?}", m.backend.positions);
    std::fs::remove_dir_all(dir).ok();
}

/// `EngineOptions::layout` (public fields, may be built by hand) is checked like head
/// grouping's shards. Before, a missing KV head panicked in every rank's `load_block` ("rank
/// thread exited unexpectedly") and overlapping FFN ranges loaded a wrong model silently.
#[test]
fn an_inconsistent_layout_is_refused_by_engine_new() {
    let dir = tmpdir("rv-layout");
    let files = Arc::new(tiny_files(&dir));
    let cfg = files.config().unwrap();
    let good = syncdrop::TpLayout::new(&cfg, 2).unwrap();
    let mut no_kv = good.clone();
    no_kv.ranks[1].kv_heads = vec![0];
    let mut overlap = good.clone();
    overlap.ranks[0].ffn = 0..40;
    for (bad, needle) in [(no_kv, "KV heads"), (overlap, "FFN")] {
        let opts = syncdrop::EngineOptions {
            tp: 2,
            threads: 1,
            capacity: 16,
            layout: Some(bad.clone()),
            ..Default::default()
        };
        match syncdrop::Engine::new(files.clone(), &opts) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
            Err(e) => panic!("{bad:?}: expected InvalidArgument, got {e}"),
            Ok(_) => panic!("{bad:?} accepted"),
        }
    }
    let opts = syncdrop::EngineOptions {
        tp: 2,
        threads: 1,
        capacity: 16,
        layout: Some(good),
        ..Default::default()
    };
    syncdrop::Engine::new(files, &opts).unwrap();
    std::fs::remove_dir_all(dir).ok();
}
