//! The P2P all-reduce kernels (csrc/allreduce.cu) run through the host simulator with ranks
//! as OS threads: each rank's launch on its own thread, its blocks concurrent (they meet
//! their peers' blocks at the peer barriers), the same grid on every rank, buffers laid out
//! as src/backend/cuda/allreduce.rs registers them. Results are checked bit for bit against
//! the CPU mirror (comm::ThreadComm: rank-order sums from rank 0's value, Wire::Bf16 rounding
//! each contribution once), and against the decode GEMV and the CPU RMSNorm for the fused
//! kernels; then consecutive launches (slots, counters, grid barrier), and the timeout path
//! with a peer that never arrives (the error recorded, then sticky). Without the `host-sim`
//! feature the test says "skipped".

#[cfg(not(feature = "host-sim"))]
#[test]
fn host_sim_allreduce_skipped_without_the_feature() {
    eprintln!("skipped: built without the `host-sim` feature");
}

#[cfg(feature = "host-sim")]
mod common;

#[cfg(feature = "host-sim")]
mod sim {
    use super::common::xorshift_f32 as rand_f32;
    use cudarc::driver::LaunchConfig;
    use half::bf16;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};
    use syncdrop::backend::cpu::rmsnorm;
    use syncdrop::backend::cuda::allreduce::{
        self as ar, ArParams, PeerPtrs, MAX_BLOCKS, MAX_WORLD, NORM_MAX_ROWS,
    };
    use syncdrop::backend::cuda::gemv;
    use syncdrop::backend::cuda::host_sim::{kernels, launch, Blocks, Ptr};
    use syncdrop::comm::{Communicator, ThreadComm, Wire};

    /// u32 flags per rank: [phase][slot][block][peer] (allreduce.rs FLAGS).
    const FLAGS: usize = 2 * 2 * MAX_BLOCKS * MAX_WORLD;
    /// Spin budget of a healthy launch, in nanoseconds (%globaltimer; the simulator's clock): long
    /// enough that a loaded 2-core host never times a live peer out.
    const BUDGET: i64 = 20_000_000_000;
    /// The timeout test's budget when a rank has no live peer (2 ms); with live peers too,
    /// 500 ms, so they surely arrive in time on a loaded host (the simulator starts the
    /// ranks' block threads one after another: 2 ms can pass before a live peer's first
    /// signal, and the record then names that peer, rightly).
    const SHORT_BUDGET: i64 = 2_000_000;
    const SHORT_BUDGET_LIVE_PEERS: i64 = 500_000_000;
    const EPS: f32 = 1e-5;

    /// 16 bytes, 16-aligned: the registered data buffers take the kernels' 16-byte loads
    /// (cuMemAlloc bases are 256-aligned on a GPU).
    #[repr(C, align(16))]
    #[derive(Clone, Copy, Default)]
    struct Pack([f32; 4]);

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum ArKind {
        F32,
        F32Bf16Wire,
        Bf16,
    }

    /// One launch of one kernel family, with its shape.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        /// allreduce_f32 / _bf16wire / allreduce_bf16 of n elements; with `residual` out =
        /// residual + sum.
        Ar {
            kind: ArKind,
            n: usize,
            two_shot: bool,
            residual: bool,
        },
        /// oproj_allreduce_f32(_bf16wire): out (t, rows) = sum_r x_r (t, k) @ W_r (rows, k)^T.
        Oproj {
            wire: Wire,
            t: usize,
            rows: usize,
            k: usize,
        },
        /// allreduce_add_rmsnorm_f32(_bf16wire): x += sum of delta, normed = RMSNorm(x) * w.
        Norm {
            wire: Wire,
            rows: usize,
            d: usize,
            two_shot: bool,
        },
    }

    impl Op {
        /// Elements all-reduced (what sets the grid).
        fn n(self) -> usize {
            match self {
                Op::Ar { n, .. } => n,
                Op::Oproj { t, rows, .. } => t * rows,
                Op::Norm { rows, d, .. } => rows * d,
            }
        }
    }

    /// One rank's kernel arguments besides the group's (null where the kernel takes none).
    /// `input` and `out` point at bf16 for ArKind::Bf16.
    #[derive(Clone, Copy)]
    struct Args {
        input: Ptr<f32>,
        out: Ptr<f32>,
        resid: Ptr<f32>,
        w: Ptr<bf16>,
        weight: Ptr<f32>,
        normed: Ptr<f32>,
    }

    impl Default for Args {
        fn default() -> Args {
            let null = std::ptr::null_mut();
            Args {
                input: Ptr(null),
                out: Ptr(null),
                resid: Ptr(null),
                w: Ptr(std::ptr::null_mut()),
                weight: Ptr(null),
                normed: Ptr(null),
            }
        }
    }

    /// The group's state as P2pRank::join allocates it: per rank, registered data (2 slots x
    /// 2 regions of region_width(capacity) f32) and flags, both zeroed, and the rank's own
    /// round counters, error record, norm scratch and grid barrier.
    struct Group {
        world: usize,
        capacity: usize,
        max_grid: usize,
        data: Vec<Vec<Pack>>,
        flags: Vec<Vec<u32>>,
        ctr: Vec<Vec<u32>>,
        err: Vec<Vec<u32>>,
        scratch: Vec<Vec<f32>>,
        gbar: Vec<Vec<u32>>,
        data_peers: PeerPtrs,
        flag_peers: PeerPtrs,
    }

    /// What one rank's launch gets from the group.
    #[derive(Clone, Copy)]
    struct Rk {
        rank: usize,
        p: ArParams,
        ctr: Ptr<u32>,
        err: Ptr<u32>,
        scratch: Ptr<f32>,
        gbar: Ptr<u32>,
    }

    impl Group {
        fn new(world: usize, capacity: usize, max_grid: usize) -> Group {
            assert!((1..=MAX_WORLD).contains(&world));
            let width = ar::region_width(capacity);
            assert_eq!(width % 8, 0);
            let mut data: Vec<Vec<Pack>> =
                (0..world).map(|_| vec![Pack::default(); width]).collect(); // 4 * width f32
            let mut flags: Vec<Vec<u32>> = (0..world).map(|_| vec![0u32; FLAGS]).collect();
            let (mut data_peers, mut flag_peers) = (PeerPtrs::default(), PeerPtrs::default());
            for r in 0..world {
                data_peers.p[r] = data[r].as_mut_ptr() as u64;
                flag_peers.p[r] = flags[r].as_mut_ptr() as u64;
            }
            Group {
                world,
                capacity,
                max_grid,
                data,
                flags,
                ctr: vec![vec![0; MAX_BLOCKS]; world],
                err: vec![vec![0; 8]; world],
                scratch: vec![vec![0.0; NORM_MAX_ROWS * MAX_BLOCKS]; world],
                gbar: vec![vec![0; 2]; world],
                data_peers,
                flag_peers,
            }
        }

        /// The state after rounds 1..=k of every block on every rank (the slot of round k
        /// holds k in its flags, the other slot k - 1): what 2^32 launches later looks like.
        fn set_round(&mut self, k: u32) {
            for r in 0..self.world {
                self.ctr[r].fill(k);
                for (i, f) in self.flags[r].iter_mut().enumerate() {
                    let slot = (i / (MAX_BLOCKS * MAX_WORLD)) % 2;
                    *f = if slot == (k & 1) as usize {
                        k
                    } else {
                        k.wrapping_sub(1)
                    };
                }
            }
        }

        /// The backend's launch shape for n elements (allreduce.rs launch_config).
        fn cfg(&self, n: usize) -> LaunchConfig {
            ar::launch_config(n, self.max_grid).expect("n > 0")
        }

        fn grid(&self, n: usize) -> usize {
            self.cfg(n).grid_dim.0 as usize
        }

        /// P2pRank::params (+ has_residual as its callers set it).
        fn params(&self, rank: usize, op: Op, budget: i64) -> ArParams {
            let (two_shot, residual) = match op {
                Op::Ar {
                    two_shot, residual, ..
                } => (two_shot, residual),
                Op::Oproj { .. } => (false, false),
                Op::Norm { two_shot, .. } => (two_shot, true),
            };
            ArParams {
                rank: rank as i32,
                world: self.world as i32,
                n: op.n() as i64,
                capacity: ar::region_width(self.capacity) as i64,
                budget,
                two_shot: two_shot as i32,
                has_residual: residual as i32,
            }
        }

        /// Launch `op` on the ranks `who` (each rank's launch on its own OS thread, its
        /// blocks concurrent); `args` is indexed by rank. The launches' results, in `who`'s
        /// order.
        fn launch(
            &mut self,
            op: Op,
            who: &[usize],
            budget: i64,
            args: &[Args],
        ) -> Vec<Result<(), String>> {
            let cfg = self.cfg(op.n());
            let rks: Vec<Rk> = who
                .iter()
                .map(|&rank| Rk {
                    rank,
                    p: self.params(rank, op, budget),
                    ctr: Ptr(self.ctr[rank].as_mut_ptr()),
                    err: Ptr(self.err[rank].as_mut_ptr()),
                    scratch: Ptr(self.scratch[rank].as_mut_ptr()),
                    gbar: Ptr(self.gbar[rank].as_mut_ptr()),
                })
                .collect();
            let (data, flags) = (self.data_peers, self.flag_peers);
            let call = move |rk: Rk| {
                let a = args[rk.rank];
                let (ctr, err) = (rk.ctr.get(), rk.err.get());
                // SAFETY: every pointer holds what the kernel reads or writes for `op`'s
                // shape (the callers size the buffers), and the group's buffers as the
                // backend registers them.
                unsafe {
                    match op {
                        Op::Ar { kind, .. } => match kind {
                            ArKind::F32 | ArKind::F32Bf16Wire => {
                                let f = if kind == ArKind::F32 {
                                    kernels::allreduce_f32
                                } else {
                                    kernels::allreduce_f32_bf16wire
                                };
                                f(
                                    rk.p,
                                    data,
                                    flags,
                                    ctr,
                                    err,
                                    a.input.get(),
                                    a.out.get(),
                                    a.resid.get(),
                                )
                            }
                            ArKind::Bf16 => kernels::allreduce_bf16(
                                rk.p,
                                data,
                                flags,
                                ctr,
                                err,
                                a.input.get() as *const bf16,
                                a.out.get() as *mut bf16,
                                a.resid.get() as *const bf16,
                            ),
                        },
                        Op::Oproj { wire, rows, k, .. } => {
                            let f = match wire {
                                Wire::F32 => kernels::oproj_allreduce_f32,
                                Wire::Bf16 => kernels::oproj_allreduce_f32_bf16wire,
                            };
                            f(
                                rk.p,
                                k as i32,
                                rows as i32,
                                a.w.get(),
                                a.input.get(),
                                data,
                                flags,
                                ctr,
                                err,
                                a.out.get(),
                            )
                        }
                        Op::Norm { wire, rows, d, .. } => {
                            let f = match wire {
                                Wire::F32 => kernels::allreduce_add_rmsnorm_f32,
                                Wire::Bf16 => kernels::allreduce_add_rmsnorm_f32_bf16wire,
                            };
                            f(
                                rk.p,
                                rows as i32,
                                d as i32,
                                EPS,
                                data,
                                flags,
                                ctr,
                                err,
                                a.input.get(),
                                a.out.get(),
                                a.weight.get(),
                                a.normed.get(),
                                rk.scratch.get(),
                                rk.gbar.get(),
                            )
                        }
                    }
                }
            };
            std::thread::scope(|s| {
                let handles: Vec<_> = rks
                    .into_iter()
                    .map(|rk| {
                        let call = &call;
                        s.spawn(move || launch(cfg, Blocks::Concurrent, || call(rk)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("rank thread"))
                    .collect()
            })
        }

        /// Launch `op` on every rank with the healthy budget; every launch must succeed and
        /// record no error, and each rank's round counter advance by one on the grid's blocks
        /// only.
        fn launch_all(&mut self, op: Op, args: &[Args]) {
            let ctr0 = self.ctr.clone();
            let all: Vec<usize> = (0..self.world).collect();
            for (r, res) in self.launch(op, &all, BUDGET, args).into_iter().enumerate() {
                res.unwrap_or_else(|e| panic!("{op:?}: rank {r}: {e}"));
            }
            let grid = self.grid(op.n());
            for (r, (err, (ctr, ctr0))) in
                self.err.iter().zip(self.ctr.iter().zip(&ctr0)).enumerate()
            {
                assert_eq!(err, &vec![0; 8], "{op:?}: rank {r} recorded an error");
                for (b, (&got, &was)) in ctr.iter().zip(ctr0).enumerate() {
                    let want = was.wrapping_add((b < grid) as u32);
                    assert_eq!(got, want, "{op:?}: rank {r} ctr[{b}]");
                }
            }
        }
    }

    /// Inputs whose sums depend on the order of addition: magnitudes spread over 2^-6..2^6,
    /// and every 97th element -0.0 on every rank (a sum started from +0.0 instead of rank
    /// 0's value turns it into +0.0).
    fn rank_input(n: usize, seed: u64, rank: usize) -> Vec<f32> {
        let u = rand_f32(
            n,
            seed ^ (rank as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F),
            1.0,
        );
        let e = rand_f32(
            n,
            seed ^ (rank as u64 + 1).wrapping_mul(0xE703_7ED1_A0B4_28DB),
            1.0,
        );
        u.iter()
            .zip(&e)
            .enumerate()
            .map(|(i, (&u, &e))| {
                if i % 97 == 5 {
                    -0.0
                } else {
                    u * 2f32.powi((e * 6.0).round() as i32)
                }
            })
            .collect()
    }

    /// The CPU mirror: every rank's ThreadComm all-reduce of its input (rank-order sums from
    /// rank 0's value, `wire` rounding each contribution); the result, which must be the same
    /// bits on every rank.
    fn mirror(inputs: &[Vec<f32>], wire: Wire) -> Vec<f32> {
        let comms = ThreadComm::group_with_wire(inputs.len(), wire).unwrap();
        let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .zip(inputs)
                .map(|(c, x)| {
                    s.spawn(move || {
                        let mut d = x.clone();
                        c.all_reduce_sum(&mut d).unwrap();
                        d
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &outs[1..] {
            assert_bits(o, &outs[0], "ThreadComm ranks");
        }
        outs.into_iter().next().unwrap()
    }

    /// Element types compared bit for bit.
    trait Bits: Copy + std::fmt::LowerExp {
        fn bits(self) -> u32;
    }
    impl Bits for f32 {
        fn bits(self) -> u32 {
            self.to_bits()
        }
    }
    impl Bits for bf16 {
        fn bits(self) -> u32 {
            self.to_bits().into()
        }
    }

    fn assert_bits<T: Bits>(got: &[T], want: &[T], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
            panic!(
                "{what}: element {i} of {}: got {:e} ({:#x}), want {:e} ({:#x})",
                got.len(),
                got[i],
                got[i].bits(),
                want[i],
                want[i].bits()
            );
        }
    }

    /// The decode GEMV on one rank, at the backend's shape: y (t, rows) = x (t, k) @ W^T.
    fn gemv_ref(t: usize, rows: usize, k: usize, w: &[bf16], x: &[f32]) -> Vec<f32> {
        let mut y = vec![f32::NAN; t * rows];
        let yp = Ptr(y.as_mut_ptr());
        let (p, lc) = gemv::launch_config(t, rows, k);
        launch(lc, Blocks::Sequential, || unsafe {
            kernels::gemv_bf16_f32(p, w.as_ptr(), x.as_ptr(), yp.get())
        })
        .unwrap();
        y
    }

    /// Run `op` once on every rank of `g` with fresh inputs from `seed` and check it: the
    /// all-reduces and the fused o_proj bit for bit against the CPU mirror; the fused norm's
    /// x bit for bit, its normed bit-identical across ranks and close to the CPU RMSNorm,
    /// its grid barrier reset (count 0, generation + 1).
    fn check_op(g: &mut Group, op: Op, seed: u64) {
        let world = g.world;
        let n = op.n();
        assert!(
            n >= 1 && n <= g.capacity,
            "{op:?} in capacity {}",
            g.capacity
        );
        let ins: Vec<Vec<f32>> = (0..world).map(|r| rank_input(n, seed, r)).collect();
        let mut args = vec![Args::default(); world];
        match op {
            Op::Ar {
                kind: kind @ (ArKind::F32 | ArKind::F32Bf16Wire),
                residual,
                ..
            } => {
                // the backend's aliasing: all_reduce(buf) in place (in == out); the fused
                // residual add all_reduce_add(m, x) (in = m, out = residual = x)
                let res: Vec<Vec<f32>> = (0..world)
                    .map(|r| rank_input(n, seed ^ 0x5EED, r + 11))
                    .collect();
                let mut m = ins.clone();
                let mut x = if residual { res.clone() } else { ins.clone() };
                for r in 0..world {
                    let xp = Ptr(x[r].as_mut_ptr());
                    args[r].out = xp;
                    if residual {
                        args[r].input = Ptr(m[r].as_mut_ptr());
                        args[r].resid = xp;
                    } else {
                        args[r].input = xp;
                    }
                }
                g.launch_all(op, &args);
                let wire = if kind == ArKind::F32 {
                    Wire::F32
                } else {
                    Wire::Bf16
                };
                let sum = mirror(&ins, wire);
                for r in 0..world {
                    let want: Vec<f32> = if residual {
                        res[r].iter().zip(&sum).map(|(a, b)| a + b).collect()
                    } else {
                        sum.clone()
                    };
                    assert_bits(&x[r], &want, &format!("{op:?}: rank {r} out"));
                    assert_bits(&m[r], &ins[r], &format!("{op:?}: rank {r} input kept"));
                }
            }
            Op::Ar {
                kind: ArKind::Bf16,
                residual,
                ..
            } => {
                // all_reduce_bf16(buf, residual): in place, the residual a separate buffer
                let to_bf16 = |v: &Vec<f32>| v.iter().map(|&x| bf16::from_f32(x)).collect();
                let inb: Vec<Vec<bf16>> = ins.iter().map(to_bf16).collect();
                let resb: Vec<Vec<bf16>> = (0..world)
                    .map(|r| to_bf16(&rank_input(n, seed ^ 0x5EED, r + 11)))
                    .collect();
                let mut buf = inb.clone();
                let mut resc = resb.clone();
                for r in 0..world {
                    let bp = Ptr(buf[r].as_mut_ptr() as *mut f32);
                    args[r].input = bp;
                    args[r].out = bp;
                    if residual {
                        args[r].resid = Ptr(resc[r].as_mut_ptr() as *mut f32);
                    }
                }
                g.launch_all(op, &args);
                let exact: Vec<Vec<f32>> = inb
                    .iter()
                    .map(|v| v.iter().map(|x| x.to_f32()).collect())
                    .collect();
                let sum = mirror(&exact, Wire::Bf16);
                for r in 0..world {
                    let want: Vec<bf16> = (0..n)
                        .map(|i| {
                            let v = if residual {
                                resb[r][i].to_f32() + sum[i]
                            } else {
                                sum[i]
                            };
                            bf16::from_f32(v)
                        })
                        .collect();
                    assert_bits(&buf[r], &want, &format!("{op:?}: rank {r} out"));
                    assert_bits(&resc[r], &resb[r], &format!("{op:?}: rank {r} residual"));
                }
            }
            Op::Oproj { wire, t, rows, k } => {
                let ws: Vec<Vec<bf16>> = (0..world)
                    .map(|r| {
                        rand_f32(rows * k, seed ^ (r as u64 * 31 + 7), 1.0)
                            .into_iter()
                            .map(bf16::from_f32)
                            .collect()
                    })
                    .collect();
                let mut xs: Vec<Vec<f32>> = (0..world)
                    .map(|r| rank_input(t * k, seed ^ 0x0_9809, r))
                    .collect();
                let mut ws_dev = ws.clone();
                let mut outs = vec![vec![f32::NAN; n]; world];
                for r in 0..world {
                    args[r].w = Ptr(ws_dev[r].as_mut_ptr());
                    args[r].input = Ptr(xs[r].as_mut_ptr());
                    args[r].out = Ptr(outs[r].as_mut_ptr());
                }
                g.launch_all(op, &args);
                let partials: Vec<Vec<f32>> = (0..world)
                    .map(|r| gemv_ref(t, rows, k, &ws[r], &xs[r]))
                    .collect();
                let sum = mirror(&partials, wire);
                for (r, out) in outs.iter().enumerate() {
                    assert_bits(out, &sum, &format!("{op:?}: rank {r} out"));
                }
            }
            Op::Norm { wire, d, .. } => {
                // the residual stream and the norm weight are replicated; deltas per rank
                let x0 = rand_f32(n, seed ^ 0xC0FFEE, 2.0);
                let weight = rand_f32(d, seed ^ 0xBEEF, 1.5);
                let mut xs = vec![x0.clone(); world];
                let mut weights = vec![weight.clone(); world];
                let mut deltas = ins.clone();
                let mut normed = vec![vec![f32::NAN; n]; world];
                for r in 0..world {
                    args[r].input = Ptr(deltas[r].as_mut_ptr());
                    args[r].out = Ptr(xs[r].as_mut_ptr());
                    args[r].weight = Ptr(weights[r].as_mut_ptr());
                    args[r].normed = Ptr(normed[r].as_mut_ptr());
                }
                let gbar0 = g.gbar.clone();
                g.launch_all(op, &args);
                let sum = mirror(&ins, wire);
                let want_x: Vec<f32> = x0.iter().zip(&sum).map(|(a, b)| a + b).collect();
                let mut want_n = vec![0f32; n];
                rmsnorm(&want_x, &weight, EPS, &mut want_n);
                for r in 0..world {
                    assert_bits(&xs[r], &want_x, &format!("{op:?}: rank {r} x"));
                    assert_bits(&deltas[r], &ins[r], &format!("{op:?}: rank {r} delta kept"));
                    assert_bits(&normed[r], &normed[0], &format!("{op:?}: rank {r} normed"));
                    assert_eq!(
                        g.gbar[r],
                        vec![0, gbar0[r][1].wrapping_add(1)],
                        "{op:?}: rank {r} grid barrier {{count, generation}}"
                    );
                }
                for i in 0..n {
                    let (got, want) = (normed[0][i], want_n[i]);
                    assert!(
                        (got - want).abs() <= 1e-5 + 1e-5 * want.abs(),
                        "{op:?}: normed[{i}] (row {}): {got} vs the CPU's {want}",
                        i / d
                    );
                }
            }
        }
    }

    fn ar_kind() -> impl Strategy<Value = ArKind> {
        prop_oneof![
            Just(ArKind::F32),
            Just(ArKind::F32Bf16Wire),
            Just(ArKind::Bf16)
        ]
    }

    fn wire() -> impl Strategy<Value = Wire> {
        prop_oneof![Just(Wire::F32), Just(Wire::Bf16)]
    }

    /// Element counts: small ones (below the world size, a partial pack, a partial chunk)
    /// as often as large ones (several 256-element chunks per block, ragged tails).
    fn count(max: usize) -> impl Strategy<Value = usize> {
        prop_oneof![1usize..=16, 1usize..=max]
    }

    fn ar_op(max_n: usize) -> impl Strategy<Value = Op> {
        (ar_kind(), count(max_n), any::<bool>(), any::<bool>()).prop_map(
            |(kind, n, two_shot, residual)| Op::Ar {
                kind,
                n,
                two_shot,
                residual,
            },
        )
    }

    /// k a multiple of 8 (the GEMV's 16-byte path) or not (its scalar path).
    fn oproj_op(max_t: usize, max_rows: usize) -> impl Strategy<Value = Op> {
        (wire(), 1..=max_t, 1..=max_rows, 1usize..=24, any::<bool>()).prop_map(
            |(wire, t, rows, k8, odd)| Op::Oproj {
                wire,
                t,
                rows,
                k: if odd { k8 * 8 + 3 } else { k8 * 8 },
            },
        )
    }

    fn norm_op(max_d: usize) -> impl Strategy<Value = Op> {
        (wire(), 1..=NORM_MAX_ROWS, 1..=max_d, any::<bool>()).prop_map(
            |(wire, rows, d, two_shot)| Op::Norm {
                wire,
                rows,
                d,
                two_shot,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// allreduce_f32, _bf16wire and allreduce_bf16, one-shot and two-shot, with and
        /// without the fused residual, over a registered capacity larger than n: bit for bit
        /// the CPU mirror's sums on every rank.
        #[test]
        fn allreduce_matches_the_cpu_mirror(world in 2usize..=MAX_WORLD, op in ar_op(3000),
                                            extra in 0usize..300, max_grid in 1usize..=4,
                                            seed in any::<u64>()) {
            let mut g = Group::new(world, op.n() + extra, max_grid);
            check_op(&mut g, op, seed);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// The fused o_proj + all-reduce: each rank's partial is the decode GEMV's bits
        /// (gemv_bf16_f32), the sum the CPU mirror's over those partials.
        #[test]
        fn oproj_allreduce_is_the_gemv_plus_the_mirror(world in 2usize..=MAX_WORLD,
                                                       op in oproj_op(3, 128),
                                                       max_grid in 1usize..=4,
                                                       seed in any::<u64>()) {
            let mut g = Group::new(world, op.n(), max_grid);
            check_op(&mut g, op, seed);
        }

        /// The fused all-reduce + residual add + RMSNorm, launched twice on the same buffers
        /// (the grid barrier must be reset by the first): x exact, normed identical on every
        /// rank and within 1e-5 of the CPU RMSNorm.
        #[test]
        fn allreduce_add_rmsnorm_matches_the_cpu(world in 2usize..=MAX_WORLD, op in norm_op(200),
                                                 max_grid in 2usize..=4, seed in any::<u64>()) {
            let mut g = Group::new(world, op.n(), max_grid);
            check_op(&mut g, op, seed);
            check_op(&mut g, op, seed ^ 1);
        }

        /// Consecutive launches of any of the kernels on one group (they share counters,
        /// flags and data slots; the grid follows each launch's n): every round right, both
        /// slots used, counters advancing.
        #[test]
        fn consecutive_launches_share_slots_and_counters(
            world in 2usize..=MAX_WORLD, max_grid in 1usize..=4,
            ops in prop::collection::vec(prop_oneof![
                3 => ar_op(1500), 1 => oproj_op(3, 160), 1 => norm_op(90)], 3..=6),
            seed in any::<u64>()) {
            let mut g = Group::new(world, 1500, max_grid);
            for (i, op) in ops.into_iter().enumerate() {
                check_op(&mut g, op, seed.wrapping_add(i as u64));
            }
        }
    }

    /// The round counters wrap (u32 equality, no resets): rounds 2^32 - 2 .. 2 of every
    /// kernel family on a group whose flags hold the two previous rounds.
    #[test]
    fn round_counters_wrap_around() {
        let mut g = Group::new(3, 600, 3);
        g.set_round(u32::MAX - 2);
        let ops = [
            Op::Ar {
                kind: ArKind::F32,
                n: 600,
                two_shot: true,
                residual: false,
            },
            Op::Norm {
                wire: Wire::Bf16,
                rows: 3,
                d: 200,
                two_shot: false,
            },
            Op::Oproj {
                wire: Wire::F32,
                t: 2,
                rows: 300,
                k: 16,
            },
            Op::Ar {
                kind: ArKind::Bf16,
                n: 600,
                two_shot: false,
                residual: true,
            },
            Op::Ar {
                kind: ArKind::F32Bf16Wire,
                n: 600,
                two_shot: true,
                residual: true,
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            check_op(&mut g, op, i as u64);
        }
        assert_eq!(g.ctr[0][..4], [2, 2, 2, u32::MAX - 2]);
    }

    /// Element counts at the edges of the packs, the chunks, the two-shot shares and the
    /// grid, every kernel family, both protocols: a deterministic sweep next to the
    /// proptests.
    #[test]
    fn edge_sizes_at_world_3_and_8() {
        for world in [3usize, 8] {
            for n in [1usize, 2, 3, 7, 8, 9, 255, 256, 257, 1023, 1025] {
                let mut g = Group::new(world, n, 4);
                for kind in [ArKind::F32, ArKind::F32Bf16Wire, ArKind::Bf16] {
                    for (two_shot, residual) in [(false, false), (true, true)] {
                        let op = Op::Ar {
                            kind,
                            n,
                            two_shot,
                            residual,
                        };
                        check_op(&mut g, op, n as u64);
                    }
                }
            }
        }
    }

    /// A launch whose peer never arrives returns after its budget with {1, rank, peer, seen,
    /// expected} in err, having written neither its output nor its counters; every later
    /// launch of any kernel returns at once and touches nothing (the error is sticky).
    #[test]
    fn a_missing_peer_times_out_and_the_error_sticks() {
        let d = 100;
        let timing_out = [
            (
                Op::Ar {
                    kind: ArKind::F32,
                    n: 700,
                    two_shot: false,
                    residual: false,
                },
                2,
                1,
            ),
            (
                Op::Ar {
                    kind: ArKind::F32Bf16Wire,
                    n: 700,
                    two_shot: true,
                    residual: true,
                },
                3,
                2,
            ),
            (
                Op::Ar {
                    kind: ArKind::Bf16,
                    n: 700,
                    two_shot: true,
                    residual: false,
                },
                4,
                0,
            ),
            (
                Op::Oproj {
                    wire: Wire::F32,
                    t: 2,
                    rows: 350,
                    k: 16,
                },
                3,
                1,
            ),
            (
                Op::Oproj {
                    wire: Wire::Bf16,
                    t: 2,
                    rows: 350,
                    k: 16,
                },
                2,
                0,
            ),
            (
                Op::Norm {
                    wire: Wire::F32,
                    rows: 7,
                    d,
                    two_shot: false,
                },
                2,
                1,
            ),
            (
                Op::Norm {
                    wire: Wire::Bf16,
                    rows: 7,
                    d,
                    two_shot: true,
                },
                5,
                3,
            ),
        ];
        let later = timing_out.map(|(op, _, _)| op);
        for (op, world, missing) in timing_out {
            let n = op.n();
            let mut g = Group::new(world, n, 3);
            assert_eq!(g.grid(n), 3);
            // two healthy rounds: the next uses slot 1 again, whose flags hold round 1
            check_op(&mut g, op, 1);
            check_op(&mut g, op, 2);
            let present: Vec<usize> = (0..world).filter(|&r| r != missing).collect();
            // buffers big enough for every kernel's arguments
            let mut bufs = Bufs::new(world, n, d);
            let args = bufs.args();
            let before = Snapshot::of(&g, &bufs);
            let budget = if present.len() == 1 {
                SHORT_BUDGET
            } else {
                SHORT_BUDGET_LIVE_PEERS
            };
            let t0 = Instant::now();
            for (r, res) in g
                .launch(op, &present, budget, &args)
                .into_iter()
                .enumerate()
            {
                res.unwrap_or_else(|e| panic!("{op:?}: rank {}: {e}", present[r]));
            }
            let took = t0.elapsed();
            assert!(
                took >= Duration::from_nanos(budget as u64),
                "{op:?}: {took:?}"
            );
            for &r in &present {
                assert_eq!(
                    g.err[r][..5],
                    [1, r as u32, missing as u32, 1, 3],
                    "{op:?}: rank {r}'s error record"
                );
                assert_eq!(g.ctr[r], before.ctr[r], "{op:?}: rank {r}'s counters moved");
                assert_eq!(
                    bufs.outputs(r),
                    before.outputs[r],
                    "{op:?}: rank {r} wrote its output"
                );
            }
            // sticky: each kernel, with a budget it would spend waiting if it ran, returns at
            // once and changes nothing (not even its own registered data)
            let after = Snapshot::of(&g, &bufs);
            for op2 in later {
                let t0 = Instant::now();
                for res in g.launch(op2, &present, BUDGET, &args) {
                    res.unwrap_or_else(|e| panic!("{op2:?} after {op:?}: {e}"));
                }
                let took = t0.elapsed();
                assert!(
                    took < Duration::from_secs(5),
                    "{op2:?} after {op:?} took {took:?}"
                );
                let now = Snapshot::of(&g, &bufs);
                assert!(now == after, "{op2:?} after {op:?} changed state");
            }
        }
    }

    /// Per-rank argument buffers sized for every kernel of the timeout test.
    struct Bufs {
        input: Vec<Vec<f32>>,
        out: Vec<Vec<f32>>,
        resid: Vec<Vec<f32>>,
        w: Vec<Vec<bf16>>,
        weight: Vec<Vec<f32>>,
        normed: Vec<Vec<f32>>,
    }

    impl Bufs {
        fn new(world: usize, n: usize, d: usize) -> Bufs {
            let k = 16;
            let per = |salt: u64, len: usize| -> Vec<Vec<f32>> {
                (0..world).map(|r| rank_input(len, salt, r)).collect()
            };
            Bufs {
                input: per(1, n * k), // also x (t, k) of o_proj
                out: per(2, n),
                resid: per(3, n),
                w: (0..world)
                    .map(|r| {
                        rank_input(n * k, 4, r)
                            .into_iter()
                            .map(bf16::from_f32)
                            .collect()
                    })
                    .collect(),
                weight: per(5, d),
                normed: per(6, n),
            }
        }

        fn args(&mut self) -> Vec<Args> {
            (0..self.input.len())
                .map(|r| Args {
                    input: Ptr(self.input[r].as_mut_ptr()),
                    out: Ptr(self.out[r].as_mut_ptr()),
                    resid: Ptr(self.resid[r].as_mut_ptr()),
                    w: Ptr(self.w[r].as_mut_ptr()),
                    weight: Ptr(self.weight[r].as_mut_ptr()),
                    normed: Ptr(self.normed[r].as_mut_ptr()),
                })
                .collect()
        }

        /// What a launch may write: out (the all-reduces' and o_proj's, the norm's x) and
        /// normed, as bits.
        fn outputs(&self, r: usize) -> Vec<u32> {
            self.out[r]
                .iter()
                .chain(&self.normed[r])
                .map(|x| x.to_bits())
                .collect()
        }
    }

    /// Everything a launch can change, as bits.
    #[derive(PartialEq)]
    struct Snapshot {
        data: Vec<Vec<u32>>,
        flags: Vec<Vec<u32>>,
        ctr: Vec<Vec<u32>>,
        err: Vec<Vec<u32>>,
        scratch: Vec<Vec<u32>>,
        gbar: Vec<Vec<u32>>,
        outputs: Vec<Vec<u32>>,
    }

    impl Snapshot {
        fn of(g: &Group, b: &Bufs) -> Snapshot {
            let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            Snapshot {
                data: g
                    .data
                    .iter()
                    .map(|d| d.iter().flat_map(|p| p.0.map(f32::to_bits)).collect())
                    .collect(),
                flags: g.flags.clone(),
                ctr: g.ctr.clone(),
                err: g.err.clone(),
                scratch: g.scratch.iter().map(bits).collect(),
                gbar: g.gbar.clone(),
                outputs: (0..g.world).map(|r| b.outputs(r)).collect(),
            }
        }
    }
}
