//! syncdrop's P2P all-reduce on its own, the way an inference engine would link it instead
//! of calling NCCL: ranks are threads of one process (one per GPU, or several per GPU as
//! virtual ranks), each registers its buffers once in a shared [`P2pGroup`], and then sums
//! device buffers in place on its own stream, with no host work per call (CUDA-graph safe).
//!
//! ```sh
//! cargo run --release --features cuda --example p2p_allreduce -- --ranks 4 --elems 1048576
//! ```
//!
//! Per rank, in order (see `rank_main`): a context and a stream of its own, the kernels
//! (`Kernels::load`), `P2pRank::join` (waits for every peer to register), then
//! `P2pRank::all_reduce` on that stream, `P2pRank::check` after a synchronisation (a peer
//! that never arrived is an `Error::CommTimeout` naming rank, peer and flag, not a hang).
//! Before any of it the process decides, once, whether the P2P kernels may run at all:
//! every pair of GPUs must pass the driver's peer probe, virtual ranks need memory pools,
//! and the selection chain (`comm::select`) says one-shot, two-shot, or "use NCCL" for a
//! message of this size. This example checks the result against an exact oracle (small
//! integers times powers of two: every rank must hold the same, exact sum) and times it.

use clap::Parser;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use syncdrop::backend::cuda::allreduce::{P2pGroup, P2pRank, MAX_WORLD};
use syncdrop::backend::cuda::kernels::Kernels;
use syncdrop::backend::cuda::{context, device_count, topology};
use syncdrop::comm::select::{select, Algo};
use syncdrop::comm::Wire;
use syncdrop::{Error, Result};

/// Sum a buffer across ranks with syncdrop's P2P all-reduce, check it exactly, and time it.
/// The selection chain picks one-shot or two-shot by size; SYNCDROP_ALLREDUCE=oneshot or
/// twoshot forces one.
#[derive(Parser, Debug, Clone)]
#[command(version = syncdrop::BUILD)]
struct Args {
    /// Ranks (threads), 2 ..= 8, placed on GPU `rank % GPUs` (several per GPU: virtual ranks)
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// f32 elements per rank (the message is this many elements of the wire type)
    #[arg(long, default_value_t = 1 << 20)]
    elems: usize,
    /// Timed all-reduces after the checked one
    #[arg(long, default_value_t = 100)]
    iters: usize,
    /// What moves between ranks: f32 (exact) or bf16 (each contribution rounded once)
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    wire: String,
    /// Spin budget of every barrier: a peer that does not arrive within it is an error
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

fn cuda<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| Error::Cuda(e.to_string()))
}

/// Rank `r`'s contribution to element `i`: an integer below 2^8 times 1/4, so every partial
/// sum of up to 8 ranks is exact in f32 and, for `--wire bf16`, each contribution is exact
/// in bf16 too (8 significant bits).
fn contribution(r: usize, i: usize) -> f32 {
    ((i * 7 + r * 31) % 97) as f32 * 0.25
}

/// What one rank measured.
struct RankResult {
    /// The first element that is not the exact sum: (index, got, want).
    first_mismatch: Option<(usize, f32, f32)>,
    seconds_per_call: f64,
}

fn rank_main(
    group: Arc<P2pGroup>,
    (rank, device, per_device): (usize, usize, usize),
    args: Args,
    two_shot: bool,
    wire: Wire,
) -> Result<RankResult> {
    let ctx = context(device)?;
    // one stream per rank and every buffer on it: cudarc's per-buffer events are not needed
    // and would not belong in a CUDA-graph capture
    // SAFETY: every buffer of this rank is used on `stream` only.
    unsafe { ctx.disable_event_tracking() };
    let stream: Arc<CudaStream> = cuda(ctx.new_stream())?;
    let kern = Kernels::load(&ctx)?;
    let mut p2p = P2pRank::join(
        &group,
        rank,
        &stream,
        device,
        per_device,
        Duration::from_millis(args.timeout_ms),
        Duration::from_secs(60),
    )?;
    let n = args.elems;
    let host: Vec<f32> = (0..n).map(|i| contribution(rank, i)).collect();
    let mut buf: CudaSlice<f32> = cuda(stream.clone_htod(&host))?;
    p2p.all_reduce(&stream, &kern, &mut buf.slice_mut(..n), n, two_shot, wire)?;
    let got: Vec<f32> = cuda(stream.clone_dtoh(&buf))?;
    p2p.check(&stream)?;
    let first_mismatch = (0..n).find_map(|i| {
        let want: f32 = (0..args.ranks).map(|r| contribution(r, i)).sum();
        (got[i] != want).then_some((i, got[i], want))
    });
    // timing: sums of sums grow by `world` each call, so time on zeros (the kernels' speed
    // does not depend on the values)
    let mut zeros: CudaSlice<f32> = cuda(stream.alloc_zeros(n.max(1)))?;
    p2p.all_reduce(&stream, &kern, &mut zeros.slice_mut(..n), n, two_shot, wire)?; // warm-up
    cuda(stream.synchronize())?;
    let t0 = Instant::now();
    for _ in 0..args.iters {
        p2p.all_reduce(&stream, &kern, &mut zeros.slice_mut(..n), n, two_shot, wire)?;
    }
    cuda(stream.synchronize())?;
    let secs = t0.elapsed().as_secs_f64();
    p2p.check(&stream)?;
    Ok(RankResult {
        first_mismatch,
        seconds_per_call: secs / args.iters.max(1) as f64,
    })
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("p2p_allreduce: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if !(2..=MAX_WORLD).contains(&args.ranks) {
        return Err(Error::InvalidArgument(format!(
            "--ranks {}: the P2P kernels take 2 ..= {MAX_WORLD} ranks",
            args.ranks
        )));
    }
    if args.elems == 0 {
        return Err(Error::InvalidArgument("--elems 0: nothing to sum".into()));
    }
    let wire: Wire = args.wire.parse()?;
    let gpus = device_count()?;
    if gpus == 0 {
        return Err(Error::Cuda("the CUDA driver sees no device".into()));
    }
    let rank_devices: Vec<usize> = (0..args.ranks).map(|r| r % gpus).collect();
    let per_device = args.ranks.div_ceil(gpus);
    let devs = topology::distinct(&rank_devices);
    if devs.len() > 1 {
        for line in topology::survey_lines(&devs)? {
            eprintln!("{line}");
        }
    }
    // Once per process: may the spinning P2P kernels run for this placement at all?
    if let Some(why) = topology::spin_hazard(&rank_devices)? {
        return Err(Error::Comm(format!("P2P kernels unsafe here: {why}")));
    }
    let bytes = args.elems * wire.bytes();
    let topo = topology::topology(&rank_devices, bytes)?;
    // SYNCDROP_ALLREDUCE=oneshot|twoshot forces the algorithm, as it does in the engine
    let forced = std::env::var("SYNCDROP_ALLREDUCE").ok();
    let (algo, log) = select(bytes, &topo, forced.as_deref())?;
    for line in &log {
        eprintln!("selection: {line}");
    }
    let two_shot = match algo {
        Algo::OneShot => false,
        Algo::TwoShot => true,
        other => {
            return Err(Error::Comm(format!(
                "the selection chain chose {other:?} for {bytes} bytes over ranks on GPUs \
                 {rank_devices:?}: this example runs only the P2P kernels (CudaBackend also \
                 takes NCCL and the host-staged copy)"
            )))
        }
    };
    let name = cuda(context(devs[0])?.name())?;
    println!(
        "{} ranks on GPU(s) {:?} ({name}; {} per GPU), {} elements ({} bytes on the {} wire): {}",
        args.ranks,
        devs,
        per_device,
        args.elems,
        bytes,
        args.wire,
        if two_shot { "two-shot" } else { "one-shot" }
    );
    let group = P2pGroup::new(args.ranks, args.elems)?;
    let handles: Vec<_> = (0..args.ranks)
        .map(|r| {
            let (group, args) = (group.clone(), args.clone());
            let place = (r, rank_devices[r], per_device);
            std::thread::spawn(move || rank_main(group, place, args, two_shot, wire))
        })
        .collect();
    let mut results = Vec::new();
    for (r, h) in handles.into_iter().enumerate() {
        let res = h
            .join()
            .map_err(|_| Error::Comm(format!("rank {r} panicked")))?;
        results.push(res.map_err(|e| Error::Comm(format!("rank {r}: {e}")))?);
    }
    for (r, res) in results.iter().enumerate() {
        if let Some((i, got, want)) = res.first_mismatch {
            return Err(Error::Comm(format!(
                "rank {r}: element {i} is {got}, the exact sum is {want}"
            )));
        }
    }
    let worst = results
        .iter()
        .map(|r| r.seconds_per_call)
        .fold(0.0, f64::max);
    let algbw = bytes as f64 / worst / 1e9;
    let n = args.ranks as f64;
    println!(
        "every rank holds the exact sum; {:.2} us per all-reduce (slowest rank, {} calls), \
         algbw {:.2} GB/s, busbw {:.2} GB/s",
        worst * 1e6,
        args.iters,
        algbw,
        algbw * 2.0 * (n - 1.0) / n
    );
    if name.starts_with("syncdrop simulated GPU") {
        println!("(the simulated driver runs kernels on CPU threads: these timings mean nothing)");
    }
    Ok(())
}
