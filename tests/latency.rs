//! The latency model (src/latency.rs): formulas, SPD and ISO accounting, bounds, monotonicity,
//! the measured-compute schema, and (ignored, run by hand) model vs measurement on this CPU.

use std::path::PathBuf;
use syncdrop::comm::Wire;
use syncdrop::latency::*;

fn nccl() -> LinkProfile {
    LinkProfile::by_name("h100-nvlink-nccl").unwrap()
}

fn h100() -> Compute {
    Compute::Roofline(Device::by_key("h100-sxm").unwrap())
}

#[allow(clippy::too_many_arguments)]
fn scenario<'a>(
    m: &'a ModelShape,
    tp: usize,
    link: &'a LinkProfile,
    compute: &'a Compute,
    phase: Phase,
    tokens: usize,
    f: f64,
    iso: bool,
) -> Scenario<'a> {
    Scenario {
        tokens,
        spd_fraction: f,
        iso,
        ..Scenario::new(m, tp, link, compute, phase)
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn ring_bytes_and_collective_time_follow_the_formula() {
    assert_eq!(ring_bytes(1, 1000.0), 0.0);
    assert_eq!(ring_bytes(2, 1000.0), 1000.0);
    assert_eq!(ring_bytes(4, 1000.0), 1500.0);
    assert_eq!(ring_bytes(8, 800.0), 1400.0);
    let p = nccl();
    assert_eq!(p.all_reduce_us(1, 1e6), 0.0);
    // 8 ranks, 16 MiB: 20 us + 2 * 7/8 * 16 MiB / 370 GB/s
    let size = 16.0 * 1024.0 * 1024.0;
    let want = 20.0 + 1.75 * size / 370e3;
    assert!(close(p.all_reduce_us(8, size), want, 1e-12));
    // one-shot below its threshold, two-shot above it
    let os = LinkProfile::by_name("h100-nvlink-oneshot").unwrap();
    let small = 8192.0 * 2.0;
    assert!(close(
        os.all_reduce_us(8, small),
        8.0 + 7.0 * small / 450e3,
        1e-12
    ));
    assert!(close(
        os.all_reduce_us(8, size),
        12.0 + 1.75 * size / 370e3,
        1e-12
    ));
    // all-gather: (n-1)/n of the result
    assert!(close(
        p.all_gather_us(4, 4000.0),
        20.0 + 3000.0 / 370e3,
        1e-12
    ));
}

#[test]
fn every_profile_and_device_cites_a_source() {
    let profiles = LinkProfile::known();
    assert!(profiles.len() >= 7);
    for p in &profiles {
        assert!(p.source.len() > 40, "{}", p.name);
        assert_eq!(p.label, "modelled");
        assert!(p.alpha_us > 0.0 && p.busbw_gbs > 0.0);
        Device::by_key(&p.device).unwrap();
    }
    for d in Device::known() {
        assert!(d.source.len() > 40, "{}", d.key);
    }
    assert!(LinkProfile::by_name("nvlink9").is_err());
    assert!(ModelShape::by_name("llama2-1t").is_err());
}

#[test]
fn rank_shapes_replicate_kv_heads_and_take_the_largest_rank() {
    let m = ModelShape::llama2_70b();
    let r = m.rank(8).unwrap();
    assert_eq!((r.q_heads, r.kv_heads, r.ffn, r.vocab), (8, 1, 3584, 4000));
    let s = ModelShape::smollm2_135m();
    let r2 = s.rank(2).unwrap();
    assert_eq!((r2.q_heads, r2.kv_heads, r2.ffn), (5, 2, 768));
    // 4 ranks > 3 KV heads, yet rank 2 (query heads 5, 6: groups of 3) holds KV heads 1, 2
    let r4 = s.rank(4).unwrap();
    assert_eq!((r4.q_heads, r4.kv_heads), (3, 2));
    assert!(s.rank(0).is_err());
    assert!(s.rank(10).is_err());
}

/// Uneven splits take the KV heads of the engine's own layout, the largest rank's.
#[test]
fn rank_kv_heads_are_the_layouts_largest() {
    use syncdrop::layout::TpLayout;
    for (m, tp, kv) in [
        // 22/21/21 query heads in groups of 8: rank 1's heads 22..43 use KV heads 2..=5
        (ModelShape::llama2_70b(), 3, 4),
        (ModelShape::smollm2_135m(), 4, 2),
        // even splits keep ceil(kv / n), or 1 when n > kv
        (ModelShape::llama2_70b(), 8, 1),
        (ModelShape::llama2_70b(), 2, 4),
        (ModelShape::llama2_70b(), 16, 1),
        (ModelShape::llama2_7b(), 4, 8),
        (ModelShape::smollm2_135m(), 3, 1),
    ] {
        assert_eq!(m.rank(tp).unwrap().kv_heads, kv, "{} TP {tp}", m.name);
        let layout = TpLayout::new(&m.to_config(), tp).unwrap();
        let most = layout.ranks.iter().map(|r| r.kv_heads.len()).max();
        assert_eq!(most, Some(kv), "{} TP {tp}", m.name);
    }
    let odd = ModelShape {
        kv_heads: 5,
        ..ModelShape::smollm2_135m()
    };
    assert!(odd.rank(3).is_err(), "9 query heads over 5 KV heads");
}

#[test]
fn seventy_b_rank_streams_about_17_5_gb_per_token() {
    // DESIGN section 7: one rank of LLaMA2-70B/TP8 streams ~17.5 GB of bf16 weights per token
    let m = ModelShape::llama2_70b();
    let c = Chunk::decode(1, 0);
    let layer = m.part_work(8, Part::Attn, c, BF16).unwrap().bytes
        + m.part_work(8, Part::Mlp, c, BF16).unwrap().bytes;
    let total = m.layers as f64 * layer + m.lm_head_work(8, 1, BF16).unwrap().bytes;
    // the embedding table (another 0.5 GB over 8 ranks) is not streamed by a decode step
    assert!(total > 16.5e9 && total < 17.6e9, "{total:e}");
    // decode is memory-bound, prefill of 2048 tokens compute-bound on the H100 roofline
    let d = Device::by_key("h100-sxm").unwrap();
    let w = m.part_work(8, Part::Mlp, c, BF16).unwrap();
    assert!(w.bytes / (d.mem_gbs * 1e9) > w.flops / (d.peak_tflops * 1e12));
    let w = m
        .part_work(8, Part::Mlp, Chunk::prefill(2048, 0), BF16)
        .unwrap();
    assert!(w.bytes / (d.mem_gbs * 1e9) < w.flops / (d.peak_tflops * 1e12));
}

#[test]
fn attention_work_counts_the_prefix() {
    let m = ModelShape::llama2_7b();
    let a = m
        .part_work(1, Part::Attn, Chunk::prefill(100, 0), BF16)
        .unwrap();
    let b = m
        .part_work(1, Part::Attn, Chunk::prefill(100, 900), BF16)
        .unwrap();
    // 100 queries see 900 more keys each: 4 * heads*hd * 100 * 900 more FLOPs
    let extra = 4.0 * 4096.0 * 100.0 * 900.0;
    assert!(close(b.flops - a.flops, extra, 1e-9));
    assert!(b.bytes > a.bytes);
}

#[test]
fn spd_removes_exactly_the_attention_all_reduces() {
    let m = ModelShape::llama2_70b();
    let link = nccl();
    let compute = h100();
    let ar = link.all_reduce_us(8, m.message_bytes(1, Wire::Bf16));
    let gather = link.all_gather_us(8, m.vocab as f64 * BF16);
    for (f, k) in [(0.0, 0), (0.5, 40), (0.7, 56), (1.0, 80)] {
        assert_eq!(spd_blocks(80, f).iter().filter(|&&d| d).count(), k);
        let p = project(&scenario(
            &m,
            8,
            &link,
            &compute,
            Phase::Decode,
            1,
            f,
            false,
        ))
        .unwrap();
        assert_eq!(p.spd_blocks, k);
        assert_eq!(p.all_reduces, 160 - k);
        assert!(close(
            p.comm_ms,
            ((160 - k) as f64 * ar + gather) / 1e3,
            1e-9
        ));
        // without ISO nothing overlaps: total = compute + comm, exposed = comm
        assert!(close(p.total_ms, p.compute_ms + p.comm_ms, 1e-9));
        assert!(close(p.exposed_comm_ms, p.comm_ms, 1e-9));
    }
    // compute does not change with SPD; the saving is exactly the dropped all-reduces
    let p0 = project(&scenario(
        &m,
        8,
        &link,
        &compute,
        Phase::Decode,
        1,
        0.0,
        false,
    ))
    .unwrap();
    let p7 = project(&scenario(
        &m,
        8,
        &link,
        &compute,
        Phase::Decode,
        1,
        0.7,
        false,
    ))
    .unwrap();
    assert!(close(p0.compute_ms, p7.compute_ms, 1e-12));
    assert!(close(p0.total_ms - p7.total_ms, 56.0 * ar / 1e3, 1e-9));
    assert!(close(p7.speedup, p0.total_ms / p7.total_ms, 1e-12));
    // at TP 1 there is nothing to drop
    let one = project(&scenario(
        &ModelShape::llama2_7b(),
        1,
        &link,
        &compute,
        Phase::Decode,
        1,
        1.0,
        false,
    ))
    .unwrap();
    assert_eq!(one.all_reduces, 0);
    assert_eq!(one.comm_ms, 0.0);
    assert!(close(one.speedup, 1.0, 1e-12));
    assert!(project(&scenario(
        &m,
        8,
        &link,
        &compute,
        Phase::Decode,
        1,
        1.5,
        false
    ))
    .is_err());
}

#[test]
fn f32_wire_doubles_the_all_reduce_bytes_and_nothing_else() {
    // prefill (ring-sized messages) and decode (one-shot-sized) on a link with a one-shot kernel
    let m = ModelShape::llama2_70b();
    let compute = h100();
    for link in LinkProfile::known() {
        for (phase, tokens) in [(Phase::Prefill, 2048), (Phase::Decode, 1)] {
            let mk = |wire| Scenario {
                wire,
                ..scenario(&m, 8, &link, &compute, phase, tokens, 0.5, false)
            };
            let b = project(&mk(Wire::Bf16)).unwrap();
            let f = project(&mk(Wire::F32)).unwrap();
            assert_eq!((b.wire.as_str(), f.wire.as_str()), ("bf16", "f32"));
            assert_eq!(b.all_reduces, f.all_reduces);
            assert!(close(b.compute_ms, f.compute_ms, 1e-12));
            let rows = if phase == Phase::Prefill { tokens } else { 1 };
            let bytes = m.message_bytes(rows, Wire::Bf16);
            assert_eq!(m.message_bytes(rows, Wire::F32), 2.0 * bytes);
            // every all-reduce costs its f32 time instead of its bf16 time; the gather is unchanged
            let extra = b.all_reduces as f64
                * (link.all_reduce_us(8, 2.0 * bytes) - link.all_reduce_us(8, bytes));
            assert!(extra > 0.0, "{}", link.name);
            assert!(
                close(f.comm_ms, b.comm_ms + extra / 1e3, 1e-9),
                "{}",
                link.name
            );
            assert!(
                close(f.total_ms, b.total_ms + extra / 1e3, 1e-9),
                "{}",
                link.name
            );
        }
    }
    // at TP 1 nothing crosses a wire
    let link = nccl();
    let one = |wire| {
        project(&Scenario {
            wire,
            ..scenario(&m, 1, &link, &compute, Phase::Decode, 1, 0.0, false)
        })
        .unwrap()
        .total_ms
    };
    assert_eq!(one(Wire::Bf16), one(Wire::F32));
}

#[test]
fn simulation_runs_lanes_in_order_and_rejects_forward_dependencies() {
    let ops = vec![
        Op {
            lane: Lane::Compute,
            us: 10.0,
            deps: vec![],
        },
        Op {
            lane: Lane::Comm,
            us: 5.0,
            deps: vec![0],
        },
        Op {
            lane: Lane::Compute,
            us: 10.0,
            deps: vec![],
        },
        Op {
            lane: Lane::Compute,
            us: 1.0,
            deps: vec![1],
        },
    ];
    let t = simulate(&ops).unwrap();
    assert_eq!(
        t,
        vec![(0.0, 10.0), (10.0, 15.0), (10.0, 20.0), (20.0, 21.0)]
    );
    let bad = vec![Op {
        lane: Lane::Comm,
        us: 1.0,
        deps: vec![0],
    }];
    assert!(simulate(&bad).is_err());
}

#[test]
fn iso_pipeline_matches_a_hand_worked_schedule() {
    // one standard block, two chunks: attn 4, mlp 6 per chunk, all-reduce 3, no LM head
    let c = ChunkCost {
        attn_us: 4.0,
        mlp_us: 6.0,
        ar_us: 3.0,
    };
    let ops = forward_ops(&[c, c], &[false], 0.0, 0.0);
    let t = simulate(&ops).unwrap();
    let end = t.iter().fold(0.0f64, |a, x| a.max(x.1));
    // compute: A0 0-4, A1 4-8, M0 waits AR_a0 (4-7) -> 8-14, M1 (AR_a1 8-11) 14-20
    // comm: AR_m0 14-17, AR_m1 20-23
    assert_eq!(end, 23.0);
    // serial (one chunk of twice the work, same all-reduce time) would be 8 + 3 + 12 + 3
    let one = ChunkCost {
        attn_us: 8.0,
        mlp_us: 12.0,
        ar_us: 3.0,
    };
    let s = simulate(&forward_ops(&[one], &[false], 0.0, 0.0)).unwrap();
    assert_eq!(s.iter().fold(0.0f64, |a, x| a.max(x.1)), 26.0);
    // an SPD block: one all-reduce per chunk: A0 0-4, A1 4-8, M0 8-14, M1 14-20, AR 14-17, 20-23
    let t = simulate(&forward_ops(&[c, c], &[true], 0.0, 0.0)).unwrap();
    assert_eq!(t.len(), 6 + 2);
    assert_eq!(t.iter().fold(0.0f64, |a, x| a.max(x.1)), 23.0);
}

#[test]
fn iso_lies_between_ideal_overlap_and_no_overlap() {
    for m in [ModelShape::llama2_70b(), ModelShape::llama2_7b()] {
        for link in LinkProfile::known() {
            let compute = Compute::Roofline(Device::by_key(&link.device).unwrap());
            for t in [128usize, 512, 2048, 8192] {
                for f in [0.0, 0.5, 1.0] {
                    let p = project(&scenario(
                        &m,
                        8,
                        &link,
                        &compute,
                        Phase::Prefill,
                        t,
                        f,
                        true,
                    ))
                    .unwrap();
                    let split = p.iso_split.expect("long enough for ISO");
                    assert!(split > 0 && split < t);
                    // never faster than ideal overlap, never slower than no overlap at all
                    let lo = p.compute_ms.max(p.comm_ms);
                    let hi = p.compute_ms + p.comm_ms;
                    assert!(
                        p.total_ms >= lo * (1.0 - 1e-12) && p.total_ms <= hi * (1.0 + 1e-12),
                        "{} {} {t} {f}: {lo} <= {} <= {hi}",
                        m.name,
                        link.name,
                        p.total_ms
                    );
                    assert!(p.exposed_comm_ms <= p.comm_ms * (1.0 + 1e-12));
                    // twice as many collectives as without ISO
                    let off = project(&scenario(
                        &m,
                        8,
                        &link,
                        &compute,
                        Phase::Prefill,
                        t,
                        f,
                        false,
                    ))
                    .unwrap();
                    assert_eq!(p.all_reduces, 2 * off.all_reduces);
                }
            }
        }
    }
}

#[test]
fn iso_hides_communication_on_a_slow_link_for_long_prompts() {
    let m = ModelShape::llama2_70b();
    let link = LinkProfile::by_name("rtx4090-pcie-nop2p").unwrap();
    let compute = Compute::Roofline(Device::by_key("rtx4090").unwrap());
    let on = project(&scenario(
        &m,
        8,
        &link,
        &compute,
        Phase::Prefill,
        4096,
        0.0,
        true,
    ))
    .unwrap();
    assert!(on.speedup > 1.2, "{on:?}");
    assert!(on.exposed_comm_ms < 0.6 * on.comm_ms);
}

#[test]
fn projection_is_monotone_in_bandwidth_and_latency() {
    let m = ModelShape::llama2_13b();
    let compute = h100();
    for (phase, tokens, iso) in [
        (Phase::Decode, 1, false),
        (Phase::Prefill, 2048, false),
        (Phase::Prefill, 2048, true),
    ] {
        for f in [0.0, 0.7] {
            let mut prev = f64::MAX;
            for bw in [5.0, 10.0, 50.0, 100.0, 300.0, 1000.0] {
                let mut link = nccl();
                link.busbw_gbs = bw;
                let p = project(&scenario(&m, 4, &link, &compute, phase, tokens, f, iso)).unwrap();
                assert!(p.total_ms <= prev * (1.0 + 1e-12), "{phase} bw {bw}");
                prev = p.total_ms;
            }
            let mut prev = f64::MAX;
            for alpha in [200.0, 50.0, 20.0, 5.0, 0.0] {
                let mut link = nccl();
                link.alpha_us = alpha;
                let p = project(&scenario(&m, 4, &link, &compute, phase, tokens, f, iso)).unwrap();
                assert!(p.total_ms <= prev * (1.0 + 1e-12), "{phase} alpha {alpha}");
                prev = p.total_ms;
            }
        }
    }
    // more SPD never hurts
    let link = nccl();
    let mut prev = f64::MAX;
    for i in 0..=10 {
        let p = project(&scenario(
            &m,
            4,
            &link,
            &compute,
            Phase::Decode,
            1,
            i as f64 / 10.0,
            false,
        ))
        .unwrap();
        assert!(p.total_ms <= prev);
        prev = p.total_ms;
    }
}

fn table() -> MeasuredCompute {
    MeasuredCompute {
        schema: 1,
        device: "NVIDIA H100 80GB HBM3".into(),
        date: "2026-12-01".into(),
        command: "hypothetical bench".into(),
        notes: String::new(),
        entries: vec![
            MeasuredEntry {
                model: "llama2-70b".into(),
                tp: 8,
                phase: Phase::Decode,
                tokens: 1,
                batch: 1,
                ctx: 1024,
                layer_us: 100.0,
                attn_us: Some(30.0),
            },
            MeasuredEntry {
                model: "llama2-70b".into(),
                tp: 8,
                phase: Phase::Prefill,
                tokens: 2048,
                batch: 1,
                ctx: 0,
                layer_us: 1000.0,
                attn_us: None,
            },
        ],
    }
}

#[test]
fn measured_compute_round_trips_and_is_used() {
    let t = table();
    let json = serde_json::to_string_pretty(&t).unwrap();
    assert!(json.contains("\"phase\": \"decode\""));
    let back = MeasuredCompute::from_json(&json, "test").unwrap();
    assert_eq!(back, t);
    assert_eq!(device_key_of(&t.device), Some("h100-sxm"));
    assert_eq!(device_key_of("RTX 4090"), Some("rtx4090"));
    assert_eq!(device_key_of("Intel Xeon"), None);

    let m = ModelShape::llama2_70b();
    let split = Device::by_key("h100-sxm").unwrap();
    let c = Compute::Measured {
        table: t,
        split: split.clone(),
    };
    let (a, f, label) = c
        .block_us(&m, 8, Phase::Decode, Chunk::decode(1, 1024))
        .unwrap();
    assert_eq!((a, f, label), (30.0, 70.0, "measured"));
    // no attn_us: the roofline's proportion splits the measured total
    let (a, f, _) = c
        .block_us(&m, 8, Phase::Prefill, Chunk::prefill(2048, 0))
        .unwrap();
    let (ra, rf) = split.block_us(&m, 8, Chunk::prefill(2048, 0)).unwrap();
    assert!(close(a + f, 1000.0, 1e-12));
    assert!(close(a / f, ra / rf, 1e-9));
    // a missing entry is an error naming the key
    let e = c
        .block_us(&m, 8, Phase::Decode, Chunk::decode(4, 1024))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no entry") && e.contains("batch 4"), "{e}");
    // the projection with measured compute is labelled measured and adds the modelled link
    let link = nccl();
    let p = project(&scenario(&m, 8, &link, &c, Phase::Decode, 1, 0.0, false)).unwrap();
    assert_eq!(p.compute_label, "measured");
    assert!(p.compute_ms > 80.0 * 100.0 / 1e3);
}

#[test]
fn malformed_measured_tables_give_clear_errors() {
    let e = MeasuredCompute::from_json("{\"schema\": 1, \"device\": 3}", "x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.json") && e.contains("expected"), "{e}");
    let e = MeasuredCompute::from_json("not json", "y.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("measured compute table y.json"), "{e}");
    let mut t = table();
    t.entries[0].layer_us = -1.0;
    let j = serde_json::to_string(&t).unwrap();
    let e = MeasuredCompute::from_json(&j, "z").unwrap_err().to_string();
    assert!(e.contains("entry 0") && e.contains("layer_us"), "{e}");
    let mut t = table();
    t.schema = 2;
    let e = MeasuredCompute::from_json(&serde_json::to_string(&t).unwrap(), "z")
        .unwrap_err()
        .to_string();
    assert!(e.contains("schema 2"), "{e}");
    let mut t = table();
    t.entries[1].model = "gpt-5".into();
    assert!(MeasuredCompute::from_json(&serde_json::to_string(&t).unwrap(), "z").is_err());
    let mut t = table();
    t.entries[0].attn_us = Some(500.0);
    assert!(MeasuredCompute::from_json(&serde_json::to_string(&t).unwrap(), "z").is_err());
    let mut t = table();
    t.entries[1].batch = 2;
    assert!(MeasuredCompute::from_json(&serde_json::to_string(&t).unwrap(), "z").is_err());
    // a missing file is an I/O error naming the path
    let e = MeasuredCompute::load(std::path::Path::new("/nonexistent/measured.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/measured.json"), "{e}");
}

#[test]
fn fit_recovers_alpha_and_bandwidth() {
    let truth = |n: usize, bytes: f64| 30.0 + ring_bytes(n, bytes) / (5.0 * 1e3);
    let samples: Vec<CommSample> = [1_000usize, 10_000, 100_000]
        .iter()
        .map(|&f| CommSample {
            world: 3,
            floats: f,
            bytes: 4.0 * f as f64,
            us: truth(3, 4.0 * f as f64),
        })
        .collect();
    let p = fit_profile("cpu", &samples, "synthetic").unwrap();
    assert!(close(p.alpha_us, 30.0, 1e-9) && close(p.busbw_gbs, 5.0, 1e-9));
    assert_eq!(p.label, "fitted to measurements");
    assert!(fit_profile("cpu", &samples[..1], "one size").is_err());
}

#[test]
fn thread_all_reduce_can_be_timed() {
    // a smoke run of the measurement (no timing assertion)
    let s = measure_thread_all_reduce(2, &[64, 4096], 5).unwrap();
    assert_eq!(s.len(), 2);
    assert!(s
        .iter()
        .all(|x| x.us > 0.0 && x.bytes == 4.0 * x.floats as f64));
}

#[test]
fn needed_entries_cover_the_iso_chunks_and_make_the_report_measured() {
    let dir = std::env::temp_dir().join(format!("syncdrop-latency-{}", std::process::id()));
    let mut opts = LatencyOptions {
        profiles: vec!["h100-nvlink-nccl".into(), "a800-nvlink-400gbs".into()],
        spd_fractions: vec![0.0, 0.7],
        out_dir: dir.clone(),
        plots: true,
        ..Default::default()
    };
    let mut need = needed_entries(&opts).unwrap();
    // plain prefill, ISO chunk 0, ISO chunk 1 (with prefix), decode
    assert_eq!(need.len(), 4);
    let m = ModelShape::llama2_70b();
    let s = iso_split(&m, 8, 2048).unwrap();
    assert!(need.iter().any(|e| e.tokens == 2048 - s && e.ctx == s));
    for e in need.iter_mut() {
        e.layer_us = 500.0;
    }
    let table = MeasuredCompute {
        schema: 1,
        device: "H100 SXM (synthetic test table)".into(),
        date: "test".into(),
        command: "test".into(),
        notes: String::new(),
        entries: need,
    };
    let path = dir.join("measured.json");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&path, serde_json::to_string(&table).unwrap()).unwrap();
    opts.measured = Some(path);
    let rep = report(&opts).unwrap();
    // 2 profiles x (prefill off + prefill iso + decode) x 2 fractions
    assert_eq!(rep.rows.len(), 12);
    for r in &rep.rows {
        let want = if r.profile.starts_with("h100") {
            "measured"
        } else {
            "modelled"
        };
        assert_eq!(r.compute_label, want, "{r:?}");
    }
    let json = std::fs::read_to_string(dir.join("projection.json")).unwrap();
    let back: LatencyReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rows.len(), rep.rows.len());
    for (a, b) in back.rows.iter().zip(&rep.rows) {
        // JSON floats round-trip to the last ulp or so
        assert_eq!(
            (&a.profile, a.phase, a.iso, a.all_reduces),
            (&b.profile, b.phase, b.iso, b.all_reduces)
        );
        assert!(close(a.total_ms, b.total_ms, 1e-12) && close(a.speedup, b.speedup, 1e-12));
    }
    assert!(dir.join("spd_decode_70b_tp8.svg").exists());
    assert!(dir.join("iso_prefill_70b_tp8.svg").exists());
    assert_eq!(rep.validation.len(), 7);
    std::fs::remove_dir_all(&dir).ok();
    // bad options are errors, not panics
    let bad = LatencyOptions {
        models: vec!["nope".into()],
        out_dir: dir.clone(),
        ..Default::default()
    };
    assert!(report(&bad).is_err());
}

#[test]
fn validation_points_are_finite_and_in_the_papers_direction() {
    let v = validate().unwrap();
    for p in &v {
        assert!(p.model_pct.is_finite(), "{p:?}");
        assert!(p.model_pct > 0.0, "{p:?}");
        assert!(!p.source.is_empty() && !p.setting.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Model vs measurement on this CPU (run by hand; writes docs/latency/cpu_validation.json)
//
//   CARGO_TARGET_DIR=/work/target-latency cargo test --release --test latency -- \
//       --ignored --nocapture cpu_model_vs_measured

/// Read bandwidth (GB/s) of summing a 512 MiB f32 buffer on `threads` threads, best of 3.
fn read_gbs(threads: usize) -> f64 {
    let n = 1usize << 27;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let s: f32 = std::thread::scope(|sc| {
            data.chunks(n.div_ceil(threads))
                .map(|c| {
                    sc.spawn(move || {
                        let mut acc = [0f32; 16];
                        for blk in c.chunks_exact(16) {
                            for (a, v) in acc.iter_mut().zip(blk) {
                                *a += *v;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum()
        });
        std::hint::black_box(s);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    4.0 * n as f64 / best / 1e9
}

#[derive(serde::Serialize)]
struct CpuRow {
    tp: usize,
    phase: String,
    measured_ms: f64,
    measured_comm_ms: f64,
    model_ms: f64,
    model_comm_ms: f64,
    model_compute_label: String,
}

#[test]
#[ignore]
fn cpu_model_vs_measured() {
    use std::sync::Arc;
    use syncdrop::{assets, Engine, EngineOptions, ModelFiles};
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bw = read_gbs(threads);
    println!("read bandwidth {bw:.1} GB/s on {threads} threads (measured)");
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load0.trim());
    // 1) thread all-reduce at SmolLM2 message sizes (decode: 576 floats; prefill: t * 576)
    let sizes = [576usize, 576 * 8, 576 * 32, 576 * 128];
    let mut samples = Vec::new();
    let mut fits = Vec::new();
    for world in [2usize, 3] {
        let s = measure_thread_all_reduce(world, &sizes, 200).unwrap();
        for x in &s {
            println!(
                "thread all-reduce world {world}: {} floats -> {:.1} us (measured)",
                x.floats, x.us
            );
        }
        let fit = fit_profile(
            &format!("cpu-threads-tp{world}"),
            &s,
            "fitted to ThreadComm timings on this machine (tests/latency.rs)",
        )
        .unwrap();
        println!(
            "fit world {world}: alpha {:.1} us, busbw {:.2} GB/s",
            fit.alpha_us, fit.busbw_gbs
        );
        samples.extend(s);
        fits.push(fit);
    }
    // 2) SmolLM2 on the engine: TP 1 calibrates the CPU's achieved FLOP rate (prefill) and
    //    bandwidth (decode); TP 2/3 are predicted with the fitted links.
    let files = Arc::new(ModelFiles::open(assets::smollm2().unwrap()).unwrap());
    let m = ModelShape::smollm2_135m();
    let (plen, steps) = (128usize, 32usize);
    let prompt: Vec<u32> = (0..plen as u32).map(|i| 100 + (i * 37) % 4000).collect();
    let mut rows = Vec::new();
    let mut peak_tflops = 0.0;
    for tp in [1usize, 2, 3] {
        let mut e = Engine::new(
            files.clone(),
            &EngineOptions {
                tp,
                threads,
                capacity: plen + steps + 1,
                ..Default::default()
            },
        )
        .unwrap();
        e.forward(&prompt[..4], 0, 3..4).unwrap();
        let (mut pre, mut pre_comm, mut dec, mut dec_comm) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            e.reset_comm_stats().unwrap();
            let t0 = std::time::Instant::now();
            e.forward(&prompt, 0, plen - 1..plen).unwrap();
            pre.push(t0.elapsed().as_secs_f64() * 1e3);
            pre_comm.push(e.comm_stats().unwrap()[0].seconds() * 1e3);
            e.reset_comm_stats().unwrap();
            let t0 = std::time::Instant::now();
            for (s, &tok) in prompt.iter().take(steps).enumerate() {
                e.forward(&[tok], plen + s, 0..1).unwrap();
            }
            dec.push(t0.elapsed().as_secs_f64() * 1e3 / steps as f64);
            dec_comm.push(e.comm_stats().unwrap()[0].seconds() * 1e3 / steps as f64);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (pre, pre_comm, dec, dec_comm) = (med(pre), med(pre_comm), med(dec), med(dec_comm));
        // the CPU as a roofline: n ranks share the cores and the memory bus, so each rank
        // gets 1/n of the bandwidth and of the FLOP rate; f32 weights
        let mut flops = 0.0;
        for part in [Part::Attn, Part::Mlp] {
            flops += m.layers as f64
                * m.part_work(1, part, Chunk::prefill(plen, 0), 4.0)
                    .unwrap()
                    .flops;
        }
        flops += m.lm_head_work(1, 1, 4.0).unwrap().flops;
        if tp == 1 {
            peak_tflops = flops / (pre * 1e-3) / 1e12; // calibrated on TP 1 prefill
        }
        let dev = Device {
            key: "cpu".into(),
            mem_gbs: bw / tp as f64,
            peak_tflops: peak_tflops / tp as f64,
            mem_eff: 1.0,
            flop_eff: 1.0,
            layer_overhead_us: 0.0,
            elem_bytes: 4.0,
            source: "measured on this machine: read bandwidth (this test) and the TP 1 \
                     prefill FLOP rate"
                .into(),
        };
        let link = if tp == 1 {
            fits[0].clone()
        } else {
            fits[tp - 2].clone()
        };
        let compute = Compute::Roofline(dev);
        for (phase, meas, meas_comm) in [
            (Phase::Prefill, pre, pre_comm),
            (Phase::Decode, dec, dec_comm),
        ] {
            let p = project(&Scenario {
                tokens: plen,
                ctx: plen + steps / 2,
                wire: Wire::F32, // the CPU backend's default: exact f32 sums
                ..Scenario::new(&m, tp, &link, &compute, phase)
            })
            .unwrap();
            // the engine gathers logits on the driver, not by an all-gather: compare the
            // block all-reduces only
            let model_comm = p.all_reduces as f64
                * link.all_reduce_us(
                    tp,
                    m.message_bytes(if phase == Phase::Prefill { plen } else { 1 }, Wire::F32),
                )
                / 1e3;
            let model_total = p.compute_ms + model_comm;
            println!(
                "TP {tp} {phase}: measured {meas:.2} ms (comm {meas_comm:.2}, rest {:.2}) | model {model_total:.2} ms (comm {model_comm:.2}, compute {:.2}) -> model/measured total {:.2}, compute {:.2}",
                meas - meas_comm,
                p.compute_ms,
                model_total / meas,
                p.compute_ms / (meas - meas_comm)
            );
            rows.push(CpuRow {
                tp,
                phase: phase.to_string(),
                measured_ms: meas,
                measured_comm_ms: meas_comm,
                model_ms: model_total,
                model_comm_ms: model_comm,
                model_compute_label: if tp == 1 && phase == Phase::Prefill {
                    "calibration point".into()
                } else {
                    "modelled (roofline from measured BW and TP 1 FLOP rate)".into()
                },
            });
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average during the run: {}", load.trim());
    let out = serde_json::json!({
        "loadavg_at_start": load0.trim(),
        "loadavg_at_end": load.trim(),
        "what": "SmolLM2-135M on the CPU thread backend: latency model vs measurement",
        "machine": format!("this CPU machine, {threads} threads, no GPU"),
        "command": "CARGO_TARGET_DIR=/work/target-latency cargo test --release --test latency -- --ignored --nocapture cpu_model_vs_measured",
        "read_bandwidth_gbs_measured": bw,
        "cpu_peak_tflops_calibrated_tp1_prefill": peak_tflops,
        "prefill_tokens": plen,
        "decode_steps": steps,
        "all_reduce_samples_measured": samples,
        "fitted_profiles": fits,
        "rows": rows,
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/latency");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("cpu_validation.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}

/// Regenerates docs/latency/projection.json and the two SVG plots (the table in
/// docs/LATENCY.md comes from its stdout):
///
///   CARGO_TARGET_DIR=/work/target-latency cargo test --release --test latency -- \
///       --ignored --nocapture write_docs_projection
#[test]
#[ignore]
fn write_docs_projection() {
    let opts = LatencyOptions {
        models: vec!["llama2-7b".into(), "llama2-13b".into(), "llama2-70b".into()],
        tp: vec![2, 4, 8],
        spd_fractions: vec![0.0, 0.7],
        prefill_tokens: vec![512, 4096],
        decode_batch: vec![1, 16],
        out_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/latency"),
        ..Default::default()
    };
    let rep = report(&opts).unwrap();
    assert!(!rep.rows.is_empty());
}
