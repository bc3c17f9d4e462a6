//! The layer kernels through the host simulator (feature `host-sim`), at the launch shapes
//! the backend uses, against the CPU reference: attention (prefill and split-K decode, GQA
//! maps, a query offset, the position from the device or the parameters), the fused QKV
//! epilogue (bias, both RoPE styles, the cache rows it writes) and in-place RoPE, SwiGLU,
//! the elementwise kernels (bf16 rounding bit for bit against `half`), the embedding lookup,
//! and the bf16 RMSNorm and GEMV. Without the feature the file says "skipped".
//!
//! Inputs are bf16-exact where the kernel reads bf16, so a reference sees the values the
//! kernel sees; every output buffer starts as NaN (a value the kernel should have written
//! and did not shows up), and cache rows past the used length hold NaN (a key read past the
//! causal limit poisons the result). `__expf` is `expf` on the host, so results that go
//! through it are compared with a tolerance, never bit for bit.

#[cfg(not(feature = "host-sim"))]
#[test]
fn host_sim_layers_skipped_without_the_feature() {
    eprintln!("skipped: built without the `host-sim` feature");
}

#[cfg(feature = "host-sim")]
mod common;

#[cfg(feature = "host-sim")]
mod sim {
    use super::common::xorshift_f32 as rand_f32;
    use half::bf16;
    use proptest::prelude::*;
    use syncdrop::backend::cpu::{attend, rmsnorm, rope_head, rope_tables};
    use syncdrop::backend::cuda::attention::{self, AttnParams};
    use syncdrop::backend::cuda::elementwise::{self, ElemParams};
    use syncdrop::backend::cuda::embedding::{self, EmbedParams};
    use syncdrop::backend::cuda::gemv::{self, GemvParams};
    use syncdrop::backend::cuda::host_sim::{kernels, launch, Blocks, Ptr};
    use syncdrop::backend::cuda::rmsnorm::{self as norm, RmsNormParams};
    use syncdrop::backend::cuda::rope::{self, QkvRopeParams, RopeParams};
    use syncdrop::backend::cuda::swiglu::{self, SwigluParams};
    use syncdrop::RopeStyle;

    /// SMs of an H100 SXM: the backend splits attention keys below 2 * num_sms blocks.
    const H100_SMS: usize = 132;

    fn rand_bf16(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
        rand_f32(n, seed, scale)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    fn f32s(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    fn close(g: f32, e: f32, atol: f32, rtol: f32) -> bool {
        (g - e).abs() <= atol + rtol * e.abs()
    }

    fn style_code(style: RopeStyle) -> i32 {
        match style {
            RopeStyle::Interleaved => 0,
            RopeStyle::Half => 1,
        }
    }

    /// A device position for the kernels that read one (`Pos::Device`), or null.
    fn pos_ptr(pos: &[i32; 1], device: bool) -> Ptr<i32> {
        Ptr(if device {
            pos.as_ptr() as *mut i32
        } else {
            std::ptr::null_mut()
        })
    }

    /// One attention launch as src/backend/cuda/attention.rs makes it: caches
    /// (n_kv, cap, hd), queries at positions pos0..pos0+t (read from a device pointer, with
    /// the parameter 0 as the backend passes it, when `device_pos`), keys cut as `split`.
    struct Attn<'a> {
        t: usize,
        n_q: usize,
        hd: usize,
        cap: usize,
        pos0: usize,
        device_pos: bool,
        split: (usize, usize),
        q: &'a [f32],
        kc: &'a [bf16],
        vc: &'a [bf16],
        q_to_kv: &'a [i32],
    }

    impl Attn<'_> {
        /// The key split the backend picks (src/backend/cuda/backend.rs `attention`): for
        /// the live length on the host, for the whole capacity with a device position.
        fn backend_split(
            t: usize,
            n_q: usize,
            pos0: usize,
            cap: usize,
            dev: bool,
            sms: usize,
        ) -> (usize, usize) {
            let max_len = if dev { cap } else { pos0 + t };
            attention::split_plan(t, n_q, max_len, 2 * sms)
        }

        fn run(&self) -> Result<Vec<f32>, String> {
            let (splits, chunk) = self.split;
            let p = AttnParams {
                t: self.t as i32,
                n_q: self.n_q as i32,
                head_dim: self.hd as i32,
                capacity: self.cap as i32,
                pos0: if self.device_pos { 0 } else { self.pos0 as i32 },
                splits: splits as i32,
                chunk: chunk as i32,
                scale: 1.0 / (self.hd as f32).sqrt(),
            };
            let mut out = vec![f32::NAN; self.t * self.n_q * self.hd];
            let np = attention::partial_len(self.t, self.n_q, self.hd, splits).max(1);
            let mut part = vec![f32::NAN; np];
            let pos = [self.pos0 as i32];
            let pp = pos_ptr(&pos, self.device_pos);
            let (o, pt) = (Ptr(out.as_mut_ptr()), Ptr(part.as_mut_ptr()));
            let (cfg, combine) = attention::launch_configs(self.t, self.n_q, self.hd, splits);
            let (q, kc, vc, map) = (self.q, self.kc, self.vc, self.q_to_kv);
            launch(cfg, Blocks::Sequential, || unsafe {
                kernels::attention_f32(
                    p,
                    pp.get(),
                    q.as_ptr(),
                    kc.as_ptr(),
                    vc.as_ptr(),
                    map.as_ptr(),
                    o.get(),
                    pt.get(),
                )
            })?;
            if splits > 1 {
                launch(combine, Blocks::Sequential, || unsafe {
                    kernels::attention_combine_f32(p, pt.get(), o.get())
                })?;
            }
            Ok(out)
        }
    }

    /// softmax(q K^T / sqrt(hd)) V over the first `len` rows of one head's K and V, in f64.
    fn attend_f64(q: &[f32], k: &[bf16], v: &[bf16], len: usize) -> Vec<f64> {
        let hd = q.len();
        let scale = 1.0 / (hd as f64).sqrt();
        let s: Vec<f64> = (0..len)
            .map(|j| {
                let dot: f64 = (0..hd).map(|d| q[d] as f64 * k[j * hd + d].to_f64()).sum();
                dot * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = w.iter().sum();
        (0..hd)
            .map(|d| (0..len).map(|j| w[j] * v[j * hd + d].to_f64()).sum::<f64>() / sum)
            .collect()
    }

    /// Caches (n_kv, cap, hd): random bf16 up to `used` rows, NaN past it.
    fn caches(
        n_kv: usize,
        cap: usize,
        hd: usize,
        used: usize,
        seed: u64,
    ) -> (Vec<bf16>, Vec<bf16>) {
        let mut k = rand_bf16(n_kv * cap * hd, seed, 1.0);
        let mut v = rand_bf16(n_kv * cap * hd, seed ^ 0x77, 1.0);
        for kh in 0..n_kv {
            for r in used..cap {
                let row = (kh * cap + r) * hd..(kh * cap + r + 1) * hd;
                k[row.clone()].fill(bf16::NAN);
                v[row].fill(bf16::NAN);
            }
        }
        (k, v)
    }

    /// A query -> KV head map: grouped (h / group, as for Llama) or scattered (what a head
    /// grouping plan may load: any KV head for any query head).
    fn q_to_kv(n_q: usize, n_kv: usize, group: usize, scattered: bool, seed: u64) -> Vec<i32> {
        (0..n_q)
            .map(|h| {
                if scattered {
                    ((h * 5 + 3 + seed as usize % 7) % n_kv) as i32
                } else {
                    (h / group) as i32
                }
            })
            .collect()
    }

    /// The fused QKV epilogue as the backend launches it (src/backend/cuda/rope.rs).
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_cache(
        (t, n_q, n_kv, hd): (usize, usize, usize, usize),
        (cap, style, theta): (usize, RopeStyle, f32),
        (pos0, device_pos): (usize, bool),
        qkv: &[f32],
        bias: Option<&[f32]>,
        q_out: &mut [f32],
        kc: &mut [bf16],
        vc: &mut [bf16],
    ) -> Result<(), String> {
        let p = QkvRopeParams {
            t: t as i32,
            n_q: n_q as i32,
            n_kv: n_kv as i32,
            head_dim: hd as i32,
            capacity: cap as i32,
            pos0: if device_pos { 0 } else { pos0 as i32 },
            style: style_code(style),
            has_bias: bias.is_some() as i32,
            theta,
            pad: [0; 3],
        };
        let pos = [pos0 as i32];
        let pp = pos_ptr(&pos, device_pos);
        let b = Ptr(bias.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut f32));
        let (qo, kp, vp) = (
            Ptr(q_out.as_mut_ptr()),
            Ptr(kc.as_mut_ptr()),
            Ptr(vc.as_mut_ptr()),
        );
        launch(
            rope::qkv_launch_config(t, n_q, n_kv, hd),
            Blocks::Sequential,
            || unsafe {
                kernels::qkv_rope_cache(
                    p,
                    pp.get(),
                    qkv.as_ptr(),
                    b.get(),
                    qo.get(),
                    kp.get(),
                    vp.get(),
                )
            },
        )
    }

    /// The CPU backend's attn_in after its QKV product (src/backend/cpu.rs): bias, RoPE on
    /// the Q and K heads from the f64 tables, Q out, K/V into the cache rows at pos0.. (here
    /// rounded to bf16, as the CUDA cache holds them). Returns Q and the rotated K/V rows
    /// before rounding, (t, n_kv * hd) each.
    #[allow(clippy::too_many_arguments)]
    fn cpu_attn_in(
        (t, n_q, n_kv, hd): (usize, usize, usize, usize),
        (cap, style, theta): (usize, RopeStyle, f32),
        pos0: usize,
        qkv: &[f32],
        bias: Option<&[f32]>,
        kc: &mut [bf16],
        vc: &mut [bf16],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (qn, kvn) = (n_q * hd, n_kv * hd);
        let width = qn + 2 * kvn;
        let half = hd / 2;
        let (cos, sin) = rope_tables(theta, hd, pos0 + t);
        let (mut q, mut k, mut v) = (vec![0f32; t * qn], vec![0f32; t * kvn], vec![0f32; t * kvn]);
        for ti in 0..t {
            let mut row = qkv[ti * width..(ti + 1) * width].to_vec();
            if let Some(b) = bias {
                row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
            }
            let p = pos0 + ti;
            let (c, s) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for h in row[..qn + kvn].chunks_exact_mut(hd) {
                rope_head(h, c, s, style);
            }
            q[ti * qn..(ti + 1) * qn].copy_from_slice(&row[..qn]);
            k[ti * kvn..(ti + 1) * kvn].copy_from_slice(&row[qn..qn + kvn]);
            v[ti * kvn..(ti + 1) * kvn].copy_from_slice(&row[qn + kvn..]);
            for kh in 0..n_kv {
                for i in 0..hd {
                    let dst = (kh * cap + p) * hd + i;
                    kc[dst] = bf16::from_f32(row[qn + kh * hd + i]);
                    vc[dst] = bf16::from_f32(row[qn + kvn + kh * hd + i]);
                }
            }
        }
        (q, k, v)
    }

    /// One epilogue launch for t rows at `pos`, checked against [`cpu_attn_in`]: Q within
    /// f32 rounding (an FMA on the GPU), K within a bf16 step of the CPU's rotated row, V
    /// exactly bf16(qkv + bias), every other cache row unchanged, bit for bit. Returns Q.
    #[allow(clippy::too_many_arguments)]
    fn epilogue_checked(
        (t, n_q, n_kv, hd): (usize, usize, usize, usize),
        (cap, style, theta): (usize, RopeStyle, f32),
        (pos, device_pos): (usize, bool),
        qkv: &[f32],
        bias: Option<&[f32]>,
        kc: &mut [bf16],
        vc: &mut [bf16],
    ) -> Result<Vec<f32>, TestCaseError> {
        let dims = (t, n_q, n_kv, hd);
        let (mut kw, mut vw) = (kc.to_vec(), vc.to_vec());
        let (q_ref, k_ref, v_ref) =
            cpu_attn_in(dims, (cap, style, theta), pos, qkv, bias, &mut kw, &mut vw);
        let mut q = vec![f32::NAN; t * n_q * hd];
        qkv_rope_cache(
            dims,
            (cap, style, theta),
            (pos, device_pos),
            qkv,
            bias,
            &mut q,
            kc,
            vc,
        )
        .map_err(TestCaseError::fail)?;
        for i in 0..q.len() {
            prop_assert!(
                close(q[i], q_ref[i], 2e-6, 2e-6),
                "q[{}] = {} vs {}",
                i,
                q[i],
                q_ref[i]
            );
        }
        for kh in 0..n_kv {
            for r in 0..cap {
                for i in 0..hd {
                    let at = (kh * cap + r) * hd + i;
                    if (pos..pos + t).contains(&r) {
                        let src = (r - pos) * n_kv * hd + kh * hd + i;
                        prop_assert!(
                            within_a_bf16_step(kc[at], k_ref[src]),
                            "k head {} pos {} [{}] = {} vs {}",
                            kh,
                            r,
                            i,
                            kc[at],
                            k_ref[src]
                        );
                        prop_assert_eq!(
                            vc[at].to_bits(),
                            bf16::from_f32(v_ref[src]).to_bits(),
                            "v head {} pos {} [{}]",
                            kh,
                            r,
                            i
                        );
                    } else {
                        prop_assert_eq!(
                            kc[at].to_bits(),
                            kw[at].to_bits(),
                            "k head {} pos {} [{}] changed",
                            kh,
                            r,
                            i
                        );
                        prop_assert_eq!(
                            vc[at].to_bits(),
                            vw[at].to_bits(),
                            "v head {} pos {} [{}] changed",
                            kh,
                            r,
                            i
                        );
                    }
                }
            }
        }
        Ok(q)
    }

    /// |got - want| within one bf16 step of `want` (a rounding boundary the f32 values sit
    /// on either side of, e.g. with an FMA on the GPU, may flip the last bit).
    fn within_a_bf16_step(got: bf16, want: f32) -> bool {
        (got.to_f32() - want).abs() <= want.abs() * (1.0 / 128.0) + 1e-30
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// attention_f32 (+ attention_combine_f32 for split keys) against an f64 softmax on
        /// the same bf16 K/V: prefill (t > 1) and decode, a query offset (a second ISO
        /// chunk attends to a prefix), the backend's split choice on an H100 (2 x 132 SMs),
        /// on a one-SM device (never split) and on an unbounded one (always split past 64
        /// keys), the position from a device pointer (split over the whole capacity, chunks
        /// past the live length empty) or the parameters, grouped and scattered GQA maps,
        /// head_dim from 1 to the maximum, capacity past the used rows (NaN there).
        #[test]
        fn attention_matches_an_f64_softmax(
            t in 1usize..6,
            pos0 in prop::sample::select(vec![0usize, 1, 3, 60, 63, 64, 65, 127]),
            extra in 0usize..140,
            n_kv in 1usize..3,
            group in 1usize..4,
            hd in prop::sample::select(vec![1usize, 8, 17, 32, 64, 80, 96, 128, 200, 256]),
            sms in prop::sample::select(vec![1usize, H100_SMS, usize::MAX / 4]),
            device_pos in any::<bool>(),
            scattered in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let n_q = n_kv * group;
            let cap = pos0 + t + extra;
            let q = rand_f32(t * n_q * hd, seed, 4.0);
            let (kc, vc) = caches(n_kv, cap, hd, pos0 + t, seed ^ 1);
            let map = q_to_kv(n_q, n_kv, group, scattered, seed);
            let split = Attn::backend_split(t, n_q, pos0, cap, device_pos, sms);
            let got = Attn { t, n_q, hd, cap, pos0, device_pos, split, q: &q, kc: &kc, vc: &vc, q_to_kv: &map }
                .run()
                .unwrap();
            for ti in 0..t {
                for (h, &kv) in map.iter().enumerate() {
                    let base = kv as usize * cap * hd;
                    let len = pos0 + ti + 1;
                    let o = (ti * n_q + h) * hd;
                    let want = attend_f64(&q[o..o + hd], &kc[base..base + len * hd], &vc[base..base + len * hd], len);
                    for d in 0..hd {
                        prop_assert!(close(got[o + d], want[d] as f32, 5e-5, 2e-4),
                            "row {} head {} dim {}: {} vs {} (split {:?}, device pos {})",
                            ti, h, d, got[o + d], want[d], split, device_pos);
                    }
                }
            }
            // decode-sized launches (where a captured graph reads the position on the
            // device): the device position gives the parameter's bits, for the same split
            if t <= 2 {
                let other = Attn { t, n_q, hd, cap, pos0, device_pos: !device_pos, split, q: &q, kc: &kc, vc: &vc, q_to_kv: &map }
                    .run()
                    .unwrap();
                prop_assert!(got.iter().zip(&other).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "device and parameter positions differ (split {:?})", split);
            }
        }

        /// The fused QKV epilogue and then attention, chunk after chunk as ISO runs a prompt
        /// (the second chunk's queries attend to the first chunk's K/V, which the kernel
        /// wrote), against the CPU backend's attn_in (bias, RoPE from the f64 tables, cache
        /// rows at pos0..) and cpu::attend on the same bf16 caches, at the backend's split.
        /// The epilogue's own checks (Q, K, V, untouched rows) are those of
        /// `qkv_epilogue_matches_the_cpu` at short positions: attention costs the simulator
        /// about a millisecond per 2 keys.
        #[test]
        fn qkv_epilogue_and_attention_match_the_cpu_chunk_by_chunk(
            chunks in prop::collection::vec(1usize..4, 1..3),
            pos0 in prop::sample::select(vec![0usize, 1, 63, 64]),
            extra in 0usize..70,
            n_kv in 1usize..3,
            group in 1usize..3,
            hd in prop::sample::select(vec![2usize, 8, 64, 96, 128, 256]),
            half_style in any::<bool>(),
            with_bias in any::<bool>(),
            device_pos in any::<bool>(),
            sms in prop::sample::select(vec![1usize, H100_SMS]),
            seed in any::<u64>(),
        ) {
            let theta = 10_000f32;
            let style = if half_style { RopeStyle::Half } else { RopeStyle::Interleaved };
            let n_q = n_kv * group;
            let total: usize = chunks.iter().sum();
            let cap = pos0 + total + extra;
            let width = (n_q + 2 * n_kv) * hd;
            let map = q_to_kv(n_q, n_kv, group, false, seed);
            // the prefix before pos0 holds earlier K/V; rows past the prompt hold NaN
            let (mut kc, mut vc) = caches(n_kv, cap, hd, pos0, seed ^ 2);
            for kh in 0..n_kv {
                for r in pos0..pos0 + total {
                    let row = (kh * cap + r) * hd..(kh * cap + r + 1) * hd;
                    kc[row.clone()].fill(bf16::from_f32(7.0));
                    vc[row].fill(bf16::from_f32(-7.0));
                }
            }
            let bias = rand_f32(width, seed ^ 3, 0.5);
            let bias = with_bias.then_some(&bias[..]);
            let mut p = pos0;
            for (c, &t) in chunks.iter().enumerate() {
                let qkv = rand_f32(t * width, seed ^ (10 + c as u64), 1.5);
                let q = epilogue_checked((t, n_q, n_kv, hd), (cap, style, theta), (p, device_pos), &qkv, bias, &mut kc, &mut vc)
                    .map_err(|e| TestCaseError::fail(format!("chunk {c}: {e}")))?;
                let split = Attn::backend_split(t, n_q, p, cap, device_pos, sms);
                let got = Attn { t, n_q, hd, cap, pos0: p, device_pos, split, q: &q, kc: &kc, vc: &vc, q_to_kv: &map }
                    .run()
                    .unwrap();
                let (kf, vf) = (f32s(&kc), f32s(&vc));
                let mut scores = Vec::new();
                let mut want = vec![0f32; hd];
                for ti in 0..t {
                    for (h, &kv) in map.iter().enumerate() {
                        let base = kv as usize * cap * hd;
                        let len = p + ti + 1;
                        let o = (ti * n_q + h) * hd;
                        attend(&q[o..o + hd], &kf[base..base + len * hd], &vf[base..base + len * hd], len, &mut scores, &mut want);
                        for d in 0..hd {
                            prop_assert!(close(got[o + d], want[d], 5e-5, 2e-4),
                                "chunk {} row {} head {} dim {}: {} vs {} (split {:?}, device pos {})",
                                c, ti, h, d, got[o + d], want[d], split, device_pos);
                        }
                    }
                }
                p += t;
            }
        }
    }

    /// f32 values at the bf16 rounding boundaries: ties to even both ways, just past a tie,
    /// the largest finite f32 (rounds to inf), the largest value that rounds to bf16::MAX,
    /// subnormals, signed zeros, infinities, NaNs.
    fn edge_values() -> Vec<f32> {
        let mut v: Vec<f32> = [
            0x3F80_8000u32, // 1 + 2^-8: a tie, to even (1.0)
            0x3F81_8000,    // a tie to even upwards
            0x3F80_8001,    // just past a tie: up
            0x3F80_7FFF,    // just below a tie: down
            0xBF80_8000,
            0xBF81_8000,
            0x7F7F_FFFF, // f32::MAX: inf
            0x7F7F_7FFF, // rounds to bf16::MAX
            0x7F7F_8000, // a tie at the top: to even (inf)
            0x0000_0001, // the smallest subnormal
            0x0000_8000,
            0x0001_8000,
            0x007F_FFFF,
            0x8000_0001,
            0x0000_0000,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001, // a signalling NaN whose payload sits in the low half
            0xFFFF_FFFF,
        ]
        .iter()
        .map(|b| f32::from_bits(*b))
        .collect();
        v.extend([1.0f32, -1.5, 3.140625, 1e-40, 65504.0, 1e38]);
        v
    }

    fn check_elementwise(x: &[f32], n: usize, seed: u64) -> Result<(), TestCaseError> {
        let p = ElemParams { n: n as i64 };
        let cfg = elementwise::launch_config(n);
        // past n: sentinels the kernels must leave alone
        let sentinel = -12288.0f32; // bf16-exact
        let mut y = vec![bf16::from_f32(sentinel); n + 300];
        let yp = Ptr(y.as_mut_ptr());
        launch(cfg, Blocks::Sequential, || unsafe {
            kernels::f32_to_bf16(p, x.as_ptr(), yp.get())
        })
        .unwrap();
        let mut r: Vec<f32> = x.iter().copied().chain([sentinel; 300]).collect();
        let rp = Ptr(r.as_mut_ptr());
        launch(cfg, Blocks::Sequential, || unsafe {
            kernels::round_bf16_f32(p, rp.get())
        })
        .unwrap();
        for i in 0..n {
            let want = bf16::from_f32(x[i]);
            if x[i].is_nan() {
                // a GPU gives the canonical NaN; the simulator, like half, the payload made quiet
                prop_assert!(
                    y[i].is_nan() && r[i].is_nan(),
                    "NaN {:#x} -> {} / {}",
                    x[i].to_bits(),
                    y[i],
                    r[i]
                );
            } else {
                prop_assert_eq!(
                    y[i].to_bits(),
                    want.to_bits(),
                    "f32_to_bf16({:#x})",
                    x[i].to_bits()
                );
                prop_assert_eq!(
                    r[i].to_bits(),
                    want.to_f32().to_bits(),
                    "round_bf16_f32({:#x})",
                    x[i].to_bits()
                );
            }
        }
        prop_assert!(y[n..].iter().all(|v| v.to_f32() == sentinel));
        prop_assert!(r[n..].iter().all(|v| *v == sentinel));
        // add_f32: acc += x, bit for bit, on finite values
        let a = rand_f32(n, seed, 100.0);
        let b = rand_f32(n, seed ^ 9, 1.0);
        let mut acc: Vec<f32> = a.iter().copied().chain([sentinel; 300]).collect();
        let ap = Ptr(acc.as_mut_ptr());
        launch(cfg, Blocks::Sequential, || unsafe {
            kernels::add_f32(p, ap.get(), b.as_ptr())
        })
        .unwrap();
        for i in 0..n {
            prop_assert_eq!(acc[i].to_bits(), (a[i] + b[i]).to_bits(), "add_f32 [{}]", i);
        }
        prop_assert!(acc[n..].iter().all(|v| *v == sentinel));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// qkv_rope_cache against the CPU backend's attn_in after its QKV product, up to
        /// long positions (the angles are f64, as the CPU tables': Q matches to f32
        /// rounding at any position): GQA widths, head_dim 2 to 256, bias on and off, both
        /// RoPE styles, rope thetas of Llama 2 / 3, the position from a device pointer (the
        /// parameter 0, as the backend passes it) or the parameters, only rows pos0..pos0+t
        /// of each KV head written.
        #[test]
        fn qkv_epilogue_matches_the_cpu(
            t in 1usize..6,
            pos0 in prop::sample::select(vec![0usize, 1, 63, 64, 1000, 4095, 8000]),
            extra in 0usize..4,
            n_kv in 1usize..4,
            group in 1usize..5,
            hd in prop::sample::select(vec![2usize, 8, 64, 96, 128, 256]),
            half_style in any::<bool>(),
            with_bias in any::<bool>(),
            device_pos in any::<bool>(),
            theta in prop::sample::select(vec![10_000f32, 100_000.0, 500_000.0]),
            seed in any::<u64>(),
        ) {
            let style = if half_style { RopeStyle::Half } else { RopeStyle::Interleaved };
            let n_q = n_kv * group;
            let cap = pos0 + t + extra;
            let width = (n_q + 2 * n_kv) * hd;
            let (mut kc, mut vc) = caches(n_kv, cap, hd, pos0, seed ^ 2);
            let qkv = rand_f32(t * width, seed, 1.5);
            let bias = rand_f32(width, seed ^ 3, 0.5);
            let bias = with_bias.then_some(&bias[..]);
            epilogue_checked((t, n_q, n_kv, hd), (cap, style, theta), (pos0, device_pos), &qkv, bias, &mut kc, &mut vc)?;
        }

        /// rope_bf16 in place against the CPU's rope_head on the same bf16 values: the
        /// kernel's f32 angles (exp2f of the log2-scaled frequency, sincosf) differ from the
        /// f64 tables by about position x 1e-6 rad; the tail of each row past the rotated
        /// heads is untouched.
        #[test]
        fn rope_bf16_matches_the_cpu(
            t in 1usize..6,
            heads in 1usize..5,
            hd in prop::sample::select(vec![2usize, 8, 64, 128, 256]),
            tail in 0usize..4,
            pos0 in prop::sample::select(vec![0usize, 1, 17, 500, 3000]),
            half_style in any::<bool>(),
            theta in prop::sample::select(vec![10_000f32, 500_000.0]),
            seed in any::<u64>(),
        ) {
            let style = if half_style { RopeStyle::Half } else { RopeStyle::Interleaved };
            let stride = heads * hd + tail;
            let x0 = rand_bf16(t * stride, seed, 2.0);
            let mut want = f32s(&x0);
            let (cos, sin) = rope_tables(theta, hd, pos0 + t);
            let half = hd / 2;
            for r in 0..t {
                let p = pos0 + r;
                for h in 0..heads {
                    let v = &mut want[r * stride + h * hd..r * stride + (h + 1) * hd];
                    rope_head(v, &cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half], style);
                }
            }
            let mut x = x0.clone();
            let p = RopeParams {
                t: t as i32,
                heads: heads as i32,
                head_dim: hd as i32,
                stride: stride as i32,
                pos0: pos0 as i32,
                style: style_code(style),
                theta,
                pad: 0,
            };
            let xp = Ptr(x.as_mut_ptr());
            launch(rope::rope_launch_config(t, heads, hd), Blocks::Sequential, || unsafe {
                kernels::rope_bf16(p, xp.get())
            }).unwrap();
            for r in 0..t {
                for c in 0..stride {
                    let i = r * stride + c;
                    if c >= heads * hd {
                        prop_assert_eq!(x[i].to_bits(), x0[i].to_bits(), "tail [{}] changed", i);
                        continue;
                    }
                    let angle_err = 4e-6 * (pos0 + r + 1) as f32;
                    prop_assert!(close(x[i].to_f32(), want[i], angle_err + 1e-6, 1.0 / 128.0),
                        "row {} col {} (pos {}): {} vs {}", r, c, pos0 + r, x[i], want[i]);
                }
            }
        }

        /// swiglu_bf16 and swiglu_f32 against the CPU's silu(gate) * up, with saturating
        /// gates (exp overflows to inf: silu goes to 0 or to the gate).
        #[test]
        fn swiglu_matches_the_cpu(
            t in 1usize..5,
            f in prop::sample::select(vec![1usize, 7, 8, 9, 255, 384, 1025]),
            seed in any::<u64>(),
        ) {
            let mut gu = rand_f32(t * 2 * f, seed, 6.0);
            for (i, x) in [-200.0f32, 200.0, -90.0, 90.0, 0.0, -0.0].into_iter().enumerate() {
                if i < f {
                    gu[i] = x;
                }
            }
            let gb: Vec<bf16> = gu.iter().map(|x| bf16::from_f32(*x)).collect();
            let gu = f32s(&gb);
            let want = syncdrop::distill::swiglu(&gu, t, f);
            let p = SwigluParams { t: t as i32, f: f as i32 };
            let mut h = vec![f32::NAN; t * f];
            let hp = Ptr(h.as_mut_ptr());
            launch(swiglu::launch_config_f32(t, f), Blocks::Sequential, || unsafe {
                kernels::swiglu_f32(p, gu.as_ptr(), hp.get())
            }).unwrap();
            let mut hb = vec![bf16::NAN; t * f];
            let hbp = Ptr(hb.as_mut_ptr());
            launch(swiglu::launch_config_bf16(t, f), Blocks::Sequential, || unsafe {
                kernels::swiglu_bf16(p, gb.as_ptr(), hbp.get())
            }).unwrap();
            for i in 0..t * f {
                prop_assert!(close(h[i], want[i], 1e-6, 1e-5), "f32 h[{}] = {} vs {}", i, h[i], want[i]);
                prop_assert!(within_a_bf16_step(hb[i], want[i]) || close(hb[i].to_f32(), want[i], 1e-6, 0.0),
                    "bf16 h[{}] = {} vs {}", i, hb[i], want[i]);
            }
        }

        /// add_f32 is exact; f32_to_bf16 and round_bf16_f32 give half::bf16::from_f32's bits
        /// (round to nearest even, overflow to inf, subnormals kept) for any f32 bit pattern,
        /// NaN staying NaN; nothing past n is touched.
        #[test]
        fn elementwise_kernels_are_exact(
            bits in prop::collection::vec(any::<u32>(), 1..3000),
            seed in any::<u64>(),
        ) {
            let mut x: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
            x.extend(edge_values());
            let n = x.len();
            check_elementwise(&x, n, seed)?;
        }

        /// embedding_f32: each output row is the bf16 table row of its id, exactly.
        #[test]
        fn embedding_copies_the_table_rows(
            t in 1usize..8,
            d in prop::sample::select(vec![1usize, 8, 255, 576, 1000]),
            vocab in 1usize..60,
            seed in any::<u64>(),
        ) {
            let table = rand_bf16(vocab * d, seed, 3.0);
            let mut ids: Vec<u32> = rand_f32(t, seed ^ 5, 1.0).iter()
                .map(|u| ((u + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
                .collect();
            ids[0] = vocab as u32 - 1; // the last row
            let p = EmbedParams { t: t as i32, d: d as i32 };
            let mut out = vec![f32::NAN; t * d];
            let op = Ptr(out.as_mut_ptr());
            launch(embedding::launch_config(t, d), Blocks::Sequential, || unsafe {
                kernels::embedding_f32(p, ids.as_ptr(), table.as_ptr(), op.get())
            }).unwrap();
            for (r, id) in ids.iter().enumerate() {
                for c in 0..d {
                    prop_assert_eq!(out[r * d + c].to_bits(), table[*id as usize * d + c].to_f32().to_bits(),
                        "row {} (id {}) col {}", r, id, c);
                }
            }
        }

        /// add_rmsnorm_bf16: the residual becomes bf16(x + delta) exactly (untouched without
        /// a delta, whose pointer is then not read), the output the CPU's RMSNorm of that
        /// residual within a bf16 step. d past 1024 strides a block of 1024 threads.
        #[test]
        fn add_rmsnorm_bf16_matches_the_cpu(
            rows in 1usize..5,
            d in prop::sample::select(vec![1usize, 7, 8, 9, 63, 64, 65, 576, 1000, 1500, 2049]),
            with_delta in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let x0 = rand_bf16(rows * d, seed, 2.0);
            let dx = if with_delta { rand_bf16(rows * d, seed ^ 1, 1.0) } else { vec![bf16::NAN; rows * d] };
            let w = rand_bf16(d, seed ^ 2, 1.5);
            let eps = 1e-5f32;
            let resid: Vec<f32> = x0.iter().zip(&dx).map(|(a, b)| {
                if with_delta { bf16::from_f32(a.to_f32() + b.to_f32()).to_f32() } else { a.to_f32() }
            }).collect();
            let mut want = vec![0f32; rows * d];
            rmsnorm(&resid, &f32s(&w), eps, &mut want);
            let p = RmsNormParams { rows: rows as i32, d: d as i32, eps, has_delta: with_delta as i32 };
            let mut x = x0.clone();
            let mut y = vec![bf16::NAN; rows * d];
            let (xp, yp) = (Ptr(x.as_mut_ptr()), Ptr(y.as_mut_ptr()));
            launch(norm::launch_config(rows, d), Blocks::Sequential, || unsafe {
                kernels::add_rmsnorm_bf16(p, xp.get(), dx.as_ptr(), w.as_ptr(), yp.get())
            }).unwrap();
            for i in 0..rows * d {
                prop_assert_eq!(x[i].to_f32().to_bits(), resid[i].to_bits(), "residual[{}]", i);
                prop_assert!(within_a_bf16_step(y[i], want[i]) || close(y[i].to_f32(), want[i], 1e-6, 0.0),
                    "out[{}] = {} vs {}", i, y[i], want[i]);
            }
        }

        /// gemv_bf16 (bf16 x and y) against an f64 dot product of the same bf16 values, on
        /// the 16-byte vector path (k % 8 == 0, both bases aligned) and the scalar one (k odd,
        /// or a base 2 bytes off); each token's row does not depend on t.
        #[test]
        fn gemv_bf16_matches_a_dot_product(
            t in 1usize..5,
            n in prop::sample::select(vec![1usize, 7, 8, 9, 33]),
            k in prop::sample::select(vec![1usize, 7, 8, 9, 64, 256, 264, 576, 1000, 2048]),
            misalign in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let w = rand_bf16(n * k, seed, 1.0);
            let x = rand_bf16(t * k, seed ^ 7, 1.0);
            let (wb, wo) = aligned(&w, misalign);
            let (xb, xo) = aligned(&x, false);
            let (wv, xv) = (&wb[wo..wo + n * k], &xb[xo..xo + t * k]);
            let (p, cfg) = gemv::launch_config(t, n, k);
            let mut y = vec![bf16::NAN; t * n];
            let yp = Ptr(y.as_mut_ptr());
            launch(cfg, Blocks::Sequential, || unsafe {
                kernels::gemv_bf16(p, wv.as_ptr(), xv.as_ptr(), yp.get())
            }).unwrap();
            for ti in 0..t {
                for r in 0..n {
                    let terms = (0..k).map(|c| w[r * k + c].to_f64() * x[ti * k + c].to_f64());
                    let (want, mag) = terms.fold((0f64, 0f64), |(s, m), v| (s + v, m + v.abs()));
                    let got = y[ti * n + r].to_f64();
                    let tol = want.abs() / 128.0 + 1e-6 * mag + 1e-30;
                    prop_assert!((got - want).abs() <= tol, "t {} row {}: {} vs {}", ti, r, got, want);
                }
            }
            let mut y1 = vec![bf16::NAN; n];
            let y1p = Ptr(y1.as_mut_ptr());
            let p1 = GemvParams { t: 1, ..p };
            let last = &xv[(t - 1) * k..];
            launch(cfg, Blocks::Sequential, || unsafe {
                kernels::gemv_bf16(p1, wv.as_ptr(), last.as_ptr(), y1p.get())
            }).unwrap();
            for r in 0..n {
                prop_assert_eq!(y1[r].to_bits(), y[(t - 1) * n + r].to_bits(), "row {} alone", r);
            }
        }
    }

    /// `v` copied into a fresh buffer at a 16-byte aligned offset, or 2 bytes past one.
    fn aligned(v: &[bf16], misalign: bool) -> (Vec<bf16>, usize) {
        let mut buf = vec![bf16::NAN; v.len() + 16];
        let addr = buf.as_ptr() as usize;
        let off = (16 - addr % 16) % 16 / 2 + misalign as usize;
        buf[off..off + v.len()].copy_from_slice(v);
        (buf, off)
    }

    /// Attention at the backend's H100 shapes (2 x 132 SMs) for Llama 3 8B on one rank
    /// (32 query heads on 8 KV heads, head_dim 128): decode splits into 64-key chunks for
    /// the live length, or, as a captured graph does, for the whole capacity with the
    /// position read on the device (the same bits as the host position at that split); a
    /// prefill with t x n_q >= 264 runs unsplit. Each against the f64 softmax.
    #[test]
    fn attention_at_the_backends_h100_shapes() {
        let (n_kv, group, hd) = (8usize, 4usize, 128usize);
        let n_q = n_kv * group;
        let map = q_to_kv(n_q, n_kv, group, false, 0);
        // decode on the first 8 query heads (a rank's share at TP 4)
        for (t, heads, pos0, cap, dev) in [
            (1usize, 8usize, 300usize, 512usize, false),
            (1, 8, 300, 512, true),
            (1, 8, 64, 200, true),
            (9, 32, 0, 16, false),
        ] {
            let split = Attn::backend_split(t, heads, pos0, cap, dev, H100_SMS);
            let expect_splits = if t * heads >= 2 * H100_SMS {
                1
            } else if dev {
                cap.div_ceil(64)
            } else {
                (pos0 + t).div_ceil(64)
            };
            assert_eq!(
                split.0, expect_splits,
                "t {t} pos0 {pos0} cap {cap} dev {dev}"
            );
            let q = rand_f32(t * heads * hd, pos0 as u64, 4.0);
            let (kc, vc) = caches(n_kv, cap, hd, pos0 + t, 99);
            let attn = Attn {
                t,
                n_q: heads,
                hd,
                cap,
                pos0,
                device_pos: dev,
                split,
                q: &q,
                kc: &kc,
                vc: &vc,
                q_to_kv: &map[..heads],
            };
            let got = attn.run().unwrap();
            for ti in 0..t {
                for (h, &kv) in map[..heads].iter().enumerate() {
                    let base = kv as usize * cap * hd;
                    let len = pos0 + ti + 1;
                    let o = (ti * heads + h) * hd;
                    let want = attend_f64(
                        &q[o..o + hd],
                        &kc[base..base + len * hd],
                        &vc[base..base + len * hd],
                        len,
                    );
                    for d in 0..hd {
                        assert!(
                            close(got[o + d], want[d] as f32, 5e-5, 2e-4),
                            "t {t} pos0 {pos0} dev {dev}: row {ti} head {h} dim {d}: {} vs {}",
                            got[o + d],
                            want[d]
                        );
                    }
                }
            }
            if dev {
                let host = Attn {
                    device_pos: false,
                    ..attn
                };
                let other = host.run().unwrap();
                assert!(
                    got.iter()
                        .zip(&other)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "pos0 {pos0}: device and parameter positions differ"
                );
            }
        }
    }

    /// The bf16 rounding cases by name, so a failure says which one.
    #[test]
    fn bf16_rounding_edge_cases() {
        let x = edge_values();
        check_elementwise(&x, x.len(), 1).unwrap();
        // and a launch of exactly one block, and of one element past it
        for n in [256usize, 257] {
            let x: Vec<f32> = (0..n)
                .map(|i| f32::from_bits(0x3F80_8000 + i as u32 * 0x1_0000))
                .collect();
            check_elementwise(&x, n, 2).unwrap();
        }
    }
}
