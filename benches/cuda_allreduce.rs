//! P2P all-reduce sweep with virtual ranks on one GPU (issue: P2P communication):
//! latency and bus bandwidth (busbw = algbw * 2(n-1)/n) from 1 KiB to 64 MiB at 2, 4 and 8
//! ranks, one-shot and two-shot, f32 and bf16 on the wire (same bytes: a bf16 message has
//! twice the elements), next to the floor of a local device copy of the same bytes
//! (one launch); then the fused decode o_proj + all-reduce against GEMV + separate
//! all-reduce and cuBLAS GEMM + separate all-reduce on LLaMA2-7B/70B shard shapes at batch
//! 1 to 64, and the fused all-reduce +
//! residual add + RMSNorm against all-reduce + add_rmsnorm at 1, 4 and 16 rows. Virtual
//! ranks share one GPU's SMs and HBM: these numbers measure the kernels and the protocol,
//! not NVLink. With two or more GPUs (one rank per GPU, real links), the P2P one-shot and
//! two-shot kernels and NCCL run side by side on the same sizes; with one GPU that section
//! says it was skipped.
//!
//! `cargo bench --features cuda --bench cuda_allreduce -- [--out DIR] [--quick]`; without a
//! GPU it prints "skipped: no GPU".

use half::bf16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use syncdrop::backend::cuda::allreduce::{P2pGroup, P2pRank};
use syncdrop::backend::cuda::backend::GEMV_MAX_T;
use syncdrop::backend::cuda::elementwise::f32_to_bf16;
use syncdrop::backend::cuda::gemm::Gemm;
use syncdrop::backend::cuda::rmsnorm::add_rmsnorm_f32;
use syncdrop::backend::cuda::{context, gemv::gemv_bf16_f32, kernels::Kernels};
use syncdrop::comm::Wire;

mod gpu_common;

type Stream = Arc<cudarc::driver::CudaStream>;
/// A timed job on one rank: returns N timings (seconds per iteration).
type Job<const N: usize> = dyn Fn(&Stream, &Kernels, &mut P2pRank) -> [f64; N] + Send + Sync;

/// Run `job` on `world` virtual ranks of GPU 0; the slowest rank's time of each timing.
fn on_ranks<const N: usize>(world: usize, cap: usize, job: Arc<Job<N>>) -> [f64; N] {
    let group = P2pGroup::new(world, cap).expect("group");
    let start = Arc::new(Barrier::new(world));
    let hs: Vec<_> = (0..world)
        .map(|r| {
            let (group, job, start) = (group.clone(), job.clone(), start.clone());
            std::thread::spawn(move || {
                let ctx = context(0).expect("ctx");
                // SAFETY: every buffer of this rank lives on its one stream.
                unsafe { ctx.disable_event_tracking() };
                let s = ctx.new_stream().expect("stream");
                let k = Kernels::load(&ctx).expect("kernels");
                let mut p = P2pRank::join(
                    &group,
                    r,
                    &s,
                    0,
                    world,
                    Duration::from_secs(2),
                    Duration::from_secs(30),
                )
                .expect("join");
                start.wait();
                let t = job(&s, &k, &mut p);
                p.check(&s).expect("no timeout");
                t
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank"))
        .fold([0.0; N], |a, b| std::array::from_fn(|i| a[i].max(b[i])))
}

fn per_iter(s: &Stream, iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    s.synchronize().expect("sync");
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    s.synchronize().expect("sync");
    t0.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let Some(gpu_common::GpuBenchArgs { quick, out }) = gpu_common::args("cuda_allreduce") else {
        return;
    };
    let (gpu, date) = gpu_common::machine();
    println!(
        "cuda_allreduce on {gpu}, {date}{}",
        if quick { " (--quick)" } else { "" }
    );
    // Hold the primary context for the whole run: every `on_ranks` call drops its ranks'
    // handles, and without this one the context (and its 12 modules per rank) would be torn
    // down and rebuilt for each of the sweep's hundred-odd points.
    let _primary = context(0).expect("a CUDA context on GPU 0");
    // What is measured so far, written after every section: a run the caller times out
    // keeps its finished sections in the JSON, not only in the printed tables.
    let save = |sweep: &[serde_json::Value],
                fused: &[serde_json::Value],
                norm: &[serde_json::Value],
                real: &serde_json::Value| {
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).ok();
            let v = serde_json::json!({"device": gpu, "date": date, "sweep": sweep,
                "fused_oproj": fused, "fused_add_rmsnorm": norm, "real_gpus_p2p_vs_nccl": real,
                "note": "virtual ranks on one GPU: kernels and protocol, not NVLink"});
            std::fs::write(
                dir.join("cuda_allreduce.json"),
                serde_json::to_string_pretty(&v).expect("json"),
            )
            .expect("write cuda_allreduce.json");
        }
    };
    let pending = serde_json::Value::Null;
    let mut rows = Vec::new();
    let max_bytes = if quick { 1 << 20 } else { 64 << 20 };
    println!(
        "| ranks | wire | bytes on the wire | algo | us | algbw GB/s | busbw GB/s | floor us (local copy) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for world in [2usize, 4, 8] {
        for wire in [Wire::F32, Wire::Bf16] {
            let mut bytes = 1usize << 10;
            while bytes <= max_bytes {
                // the same bytes on the wire: a bf16 message holds twice the elements
                let n = bytes / wire.bytes();
                let iters = if bytes <= 1 << 20 { 200 } else { 20 };
                for two_shot in [false, true] {
                    let job: Arc<Job<2>> = Arc::new(move |s, k, p| {
                        let mut d = s.alloc_zeros::<f32>(n).expect("alloc");
                        let mut dst = s.alloc_zeros::<u8>(bytes).expect("alloc");
                        let src = s.alloc_zeros::<u8>(bytes).expect("alloc");
                        let t = per_iter(s, iters, || {
                            p.all_reduce(s, k, &mut d.slice_mut(..), n, two_shot, wire)
                                .expect("all-reduce")
                        });
                        let floor =
                            per_iter(s, iters, || s.memcpy_dtod(&src, &mut dst).expect("copy"));
                        [t, floor]
                    });
                    let [t, floor] = on_ranks(world, n, job);
                    let algbw = bytes as f64 / t;
                    let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
                    let algo = if two_shot { "two-shot" } else { "one-shot" };
                    let wname = wire.name();
                    println!(
                        "| {world} | {wname} | {bytes} | {algo} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        t * 1e6,
                        algbw / 1e9,
                        busbw / 1e9,
                        floor * 1e6
                    );
                    rows.push(
                        serde_json::json!({"ranks": world, "wire": wname, "bytes": bytes,
                        "elements": n, "algo": algo, "us": t * 1e6, "algbw_gbps": algbw / 1e9,
                        "busbw_gbps": busbw / 1e9, "floor_us": floor * 1e6}),
                    );
                }
                bytes *= 4;
            }
        }
        save(&rows, &[], &[], &pending);
    }
    // fused o_proj + all-reduce against the unfused ways, decode batches 1 to 64: GEMV +
    // all-reduce (the backend's o_proj up to GEMV_MAX_T tokens), bf16 conversion + cuBLAS
    // GEMM + all-reduce (above it), each all-reduce the one the selection chain picks for
    // its size. The fused kernel is a GEMV (a warp per output element): where cuBLAS wins,
    // the table says at which batch the fusion stops paying.
    println!(
        "\n| model | ranks | batch | o_proj (n x k) | GEMV + all-reduce us | cuBLAS + all-reduce us | fused us | backend's unfused / fused |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut fused_rows = Vec::new();
    for (model, world, n, k) in [
        ("llama2-7b", 2usize, 4096usize, 2048usize),
        ("llama2-7b", 4, 4096, 1024),
        ("llama2-7b", 8, 4096, 512),
        ("llama2-70b", 8, 8192, 1024),
    ] {
        for t in [1usize, 2, 4, 8, 16, 32, 64] {
            let m = t * n;
            let iters = if quick {
                20
            } else if t <= 8 {
                500
            } else {
                50
            };
            // as comm::select picks for a message of m f32
            let one_shot_max = if world <= 4 {
                syncdrop::comm::select::ONE_SHOT_MAX_BYTES_SMALL_WORLD
            } else {
                syncdrop::comm::select::ONE_SHOT_MAX_BYTES_LARGE_WORLD
            };
            let two_shot = m * 4 > one_shot_max;
            let job: Arc<Job<3>> = Arc::new(move |s, kern, p| {
                let gemm = Gemm::new(s).expect("cuBLAS");
                let w = s.alloc_zeros::<bf16>(n * k).expect("alloc");
                let x = s.alloc_zeros::<f32>(t * k).expect("alloc");
                let mut xb = s.alloc_zeros::<bf16>(t * k).expect("alloc");
                let mut y = s.alloc_zeros::<f32>(m).expect("alloc");
                // cuBLAS sets itself up (workspace) here, before any collective of this job
                gemm.bf16_f32((t, n, k), &w.slice(..), &xb.slice(..), &mut y.slice_mut(..))
                    .expect("gemm");
                s.synchronize().expect("sync");
                let gemv = per_iter(s, iters, || {
                    gemv_bf16_f32(
                        s,
                        kern,
                        (t, n, k),
                        &w.slice(..),
                        &x.slice(..),
                        &mut y.slice_mut(..),
                    )
                    .expect("gemv");
                    p.all_reduce(s, kern, &mut y.slice_mut(..), m, two_shot, Wire::F32)
                        .expect("all-reduce");
                });
                let cublas = per_iter(s, iters, || {
                    f32_to_bf16(s, kern, t * k, &x.slice(..), &mut xb.slice_mut(..))
                        .expect("convert");
                    gemm.bf16_f32((t, n, k), &w.slice(..), &xb.slice(..), &mut y.slice_mut(..))
                        .expect("gemm");
                    p.all_reduce(s, kern, &mut y.slice_mut(..), m, two_shot, Wire::F32)
                        .expect("all-reduce");
                });
                let fused = per_iter(s, iters, || {
                    p.oproj_all_reduce(
                        s,
                        kern,
                        (t, n, k),
                        &w.slice(..),
                        &x.slice(..),
                        &mut y.slice_mut(..),
                        Wire::F32,
                    )
                    .expect("fused")
                });
                [gemv, cublas, fused]
            });
            let [gemv, cublas, fused] = on_ranks(world, m, job);
            let backend = if t <= GEMV_MAX_T { gemv } else { cublas };
            println!(
                "| {model} | {world} | {t} | {n} x {k} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                gemv * 1e6,
                cublas * 1e6,
                fused * 1e6,
                backend / fused
            );
            fused_rows.push(
                serde_json::json!({"model": model, "ranks": world, "batch": t,
                "n": n, "k": k, "gemv_unfused_us": gemv * 1e6, "cublas_unfused_us": cublas * 1e6,
                "unfused_us": backend * 1e6, "fused_us": fused * 1e6,
                "all_reduce": if two_shot { "two-shot" } else { "one-shot" }}),
            );
        }
    }
    save(&rows, &fused_rows, &[], &pending);
    // all-reduce + residual add + RMSNorm: one kernel vs all-reduce then add_rmsnorm
    println!(
        "\n| hidden | ranks | rows | all-reduce + add_rmsnorm us | fused us | fused speedup |"
    );
    println!("|---|---|---|---|---|---|");
    let mut norm_rows = Vec::new();
    for (d, world) in [(4096usize, 2usize), (4096, 8), (8192, 8)] {
        for t in [1usize, 4, 16] {
            let n = t * d;
            let iters = if quick { 20 } else { 500 };
            let job: Arc<Job<2>> = Arc::new(move |s, kern, p| {
                let mut delta = s.alloc_zeros::<f32>(n).expect("alloc");
                let mut x = s.alloc_zeros::<f32>(n).expect("alloc");
                let w = s.alloc_zeros::<f32>(d).expect("alloc");
                let mut normed = s.alloc_zeros::<f32>(n).expect("alloc");
                let unfused = per_iter(s, iters, || {
                    p.all_reduce(s, kern, &mut delta.slice_mut(..), n, false, Wire::F32)
                        .expect("all-reduce");
                    add_rmsnorm_f32(
                        s,
                        kern,
                        t,
                        d,
                        1e-5,
                        &mut x.slice_mut(..),
                        Some(&delta.slice(..)),
                        &w.slice(..),
                        &mut normed.slice_mut(..),
                    )
                    .expect("add_rmsnorm");
                });
                let fused = per_iter(s, iters, || {
                    p.all_reduce_add_rmsnorm(
                        s,
                        kern,
                        (t, d, 1e-5),
                        &delta.slice(..),
                        &mut x.slice_mut(..),
                        &w.slice(..),
                        &mut normed.slice_mut(..),
                        false,
                        Wire::F32,
                    )
                    .expect("fused")
                });
                [unfused, fused]
            });
            let [unfused, fused] = on_ranks(world, n, job);
            println!(
                "| {d} | {world} | {t} | {:.1} | {:.1} | {:.2}x |",
                unfused * 1e6,
                fused * 1e6,
                unfused / fused
            );
            norm_rows.push(serde_json::json!({"hidden": d, "ranks": world, "rows": t,
                "unfused_us": unfused * 1e6, "fused_us": fused * 1e6}));
        }
    }
    save(&rows, &fused_rows, &norm_rows, &pending);
    let real_rows = real_gpus(max_bytes);
    save(
        &rows,
        &fused_rows,
        &norm_rows,
        &serde_json::json!(real_rows),
    );
}

/// `per_iter` for calls that can fail, on ranks that can fail: the first error stops the
/// timing, and the waits for the stream are bounded (`limit`) and give up as soon as another
/// rank has failed (`stop`): an NCCL kernel waiting for a peer that left never ends by
/// itself, so `synchronize` could hang (the communicator's drop then aborts it).
fn try_per_iter(
    s: &Stream,
    iters: usize,
    stop: &AtomicBool,
    limit: Duration,
    mut f: impl FnMut() -> syncdrop::Result<()>,
) -> Result<f64, String> {
    let wait = |s: &Stream| -> Result<(), String> {
        let ev = s.record_event(None).map_err(|e| format!("event: {e:?}"))?;
        let deadline = Instant::now() + limit;
        while !ev.try_is_complete().map_err(|e| format!("CUDA: {e:?}"))? {
            if stop.load(Ordering::Acquire) {
                return Err("stopped: another rank failed".into());
            }
            if Instant::now() > deadline {
                return Err(format!("the stream did not finish within {limit:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    f().map_err(|e| e.to_string())?;
    wait(s)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f().map_err(|e| e.to_string())?;
    }
    wait(s)?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// Stops the other ranks of a real-GPU world when this one fails or panics: sets `stop` and
/// aborts the lockstep barrier with the reason (the first failure is the one reported).
struct Stopper<'a> {
    gate: &'a syncdrop::comm::ThreadComm,
    stop: &'a AtomicBool,
    first: &'a std::sync::Mutex<Option<(usize, String)>>,
    rank: usize,
}

impl Stopper<'_> {
    fn fail(&self, why: String) -> String {
        use syncdrop::comm::Communicator;
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if !self.stop.swap(true, Ordering::AcqRel) {
            *first = Some((self.rank, why.clone()));
        }
        drop(first);
        self.gate.abort(&why);
        why
    }
}

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fail("panicked".into());
        }
    }
}

/// One rank per GPU over real links: P2P one-shot / two-shot and NCCL on the same f32
/// messages, at 2, 4, 8 ranks as far as the GPUs go. Empty (and says so) with one GPU. A
/// rank whose collective (or setup) fails stops its world's sweep on every rank at once:
/// the table says which rank failed first and why, and the next world size runs.
fn real_gpus(max_bytes: usize) -> Vec<serde_json::Value> {
    use syncdrop::backend::cuda::nccl::{self, NcclRank, NcclTimeouts};
    use syncdrop::comm::rendezvous::{Rendezvous, Terms};
    use syncdrop::comm::{Communicator, ThreadComm};
    let gpus = syncdrop::backend::cuda::device_count().unwrap_or(0);
    println!("\n| ranks (one per GPU) | bytes | P2P one-shot us | P2P two-shot us | NCCL us | NCCL busbw GB/s |");
    println!("|---|---|---|---|---|---|");
    if gpus < 2 {
        println!("| skipped: {gpus} GPU(s); real links need two or more | | | | | |");
        return Vec::new();
    }
    let have_nccl = nccl::available();
    // bounded waits, short enough that a failed world costs well under the bench stage
    let limit = Duration::from_secs(30);
    let nccl_timeouts = NcclTimeouts {
        init: limit,
        call: limit,
    };
    let mut rows = Vec::new();
    for world in [2usize, 4, 8].into_iter().filter(|w| *w <= gpus) {
        let cap = max_bytes / 4;
        let group = P2pGroup::new(world, cap).expect("group");
        let rv = Rendezvous::in_process();
        // steps in lockstep: a barrier that a failing rank aborts (with its reason)
        let gates = ThreadComm::group(world).expect("gates");
        let stop = Arc::new(AtomicBool::new(false));
        let first = Arc::new(std::sync::Mutex::new(None));
        // which paths joined on every rank: a path runs only where all ranks have it (a rank
        // without P2P to some peer would otherwise leave the others spinning)
        let joined = Arc::new(std::sync::Mutex::new(vec![(false, false); world]));
        let hs: Vec<_> = gates
            .into_iter()
            .enumerate()
            .map(|(r, gate)| {
                let (group, rv, joined) = (group.clone(), rv.clone(), joined.clone());
                let (stop, first) = (stop.clone(), first.clone());
                std::thread::spawn(move || -> Result<Vec<(usize, [f64; 3])>, String> {
                    let cuda = |e: cudarc::driver::DriverError| format!("{e:?}");
                    let ctx = context(r).map_err(|e| e.to_string());
                    let stopper = Stopper {
                        gate: &gate,
                        stop: &stop,
                        first: &first,
                        rank: r,
                    };
                    let fail = |e: String| stopper.fail(e);
                    let ctx = ctx.map_err(fail)?;
                    // SAFETY: every buffer of this rank lives on its one stream.
                    unsafe { ctx.disable_event_tracking() };
                    let s = ctx.new_stream().map_err(cuda).map_err(fail)?;
                    let k = Kernels::load(&ctx).map_err(|e| fail(e.to_string()))?;
                    let mut p = P2pRank::join(
                        &group,
                        r,
                        &s,
                        r,
                        1,
                        Duration::from_secs(2),
                        Duration::from_secs(10),
                    )
                    .ok();
                    let nc = if have_nccl {
                        NcclRank::join_with(&rv, r, world, &Terms::new(), &s, nccl_timeouts)
                            .map_err(|e| eprintln!("rank {r}: NCCL: {e}"))
                            .ok()
                    } else {
                        None
                    };
                    // declared after the resources, so dropped (aborting the others on a
                    // panic) before they are
                    let stopper = stopper;
                    let fail = |e: String| stopper.fail(e);
                    joined.lock().unwrap()[r] = (p.is_some(), nc.is_some());
                    let gate = || gate.barrier().map_err(|e| e.to_string());
                    gate()?;
                    let (all_p2p, all_nccl) = {
                        let j = joined.lock().unwrap();
                        (j.iter().all(|x| x.0), j.iter().all(|x| x.1))
                    };
                    if !all_p2p {
                        p = None;
                    }
                    let nc = if all_nccl { nc } else { None };
                    let mut out = Vec::new();
                    let mut bytes = 1usize << 10;
                    while bytes <= max_bytes {
                        let n = bytes / 4;
                        let iters = if bytes <= 1 << 20 { 200 } else { 20 };
                        let mut d = s.alloc_zeros::<f32>(n).map_err(cuda).map_err(fail)?;
                        let mut t = [f64::NAN; 3];
                        for (i, two) in [false, true].into_iter().enumerate() {
                            if let Some(p) = p.as_mut() {
                                gate()?;
                                t[i] = try_per_iter(&s, iters, &stop, limit, || {
                                    p.all_reduce(&s, &k, &mut d.slice_mut(..), n, two, Wire::F32)
                                })
                                // a spin that timed out only sets the rank's error flag
                                .and_then(|t| p.check(&s).map(|_| t).map_err(|e| e.to_string()))
                                .map_err(|e| fail(format!("P2P {bytes} B: {e}")))?;
                            }
                        }
                        if let Some(nc) = &nc {
                            gate()?;
                            t[2] = try_per_iter(&s, iters, &stop, limit, || {
                                nc.all_reduce(&mut d.slice_mut(..))
                            })
                            // the watchdog may have aborted it meanwhile
                            .and_then(|t| nc.check().map(|_| t).map_err(|e| e.to_string()))
                            .map_err(|e| fail(format!("NCCL {bytes} B: {e}")))?;
                        }
                        out.push((bytes, t));
                        bytes *= 4;
                    }
                    Ok(out)
                })
            })
            .collect();
        let results: Vec<_> = hs
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect();
        if results.iter().any(Result::is_err) {
            let why = first
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map_or("a rank stopped".to_string(), |(r, why)| {
                    format!("first rank {r}: {why}")
                });
            println!("| {world} | failed ({why}) | | | | |");
            rows.push(serde_json::json!({"ranks": world, "failed": why}));
            continue;
        }
        let per_rank: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        for (i, (bytes, _)) in per_rank[0].iter().enumerate() {
            // the slowest rank's time (NaN where that path did not run)
            let t: Vec<f64> = (0..3)
                .map(|j| {
                    per_rank.iter().map(|r| r[i].1[j]).fold(0.0, |a: f64, b| {
                        if a.is_nan() || b.is_nan() {
                            f64::NAN
                        } else {
                            a.max(b)
                        }
                    })
                })
                .collect();
            let busbw = *bytes as f64 / t[2] * 2.0 * (world - 1) as f64 / world as f64 / 1e9;
            println!(
                "| {world} | {bytes} | {:.1} | {:.1} | {:.1} | {:.1} |",
                t[0] * 1e6,
                t[1] * 1e6,
                t[2] * 1e6,
                busbw
            );
            rows.push(serde_json::json!({"ranks": world, "bytes": bytes,
                "p2p_one_shot_us": t[0] * 1e6, "p2p_two_shot_us": t[1] * 1e6,
                "nccl_us": t[2] * 1e6, "nccl_busbw_gbps": busbw}));
        }
    }
    rows
}
