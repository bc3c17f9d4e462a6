//! Head grouping: re-assigning heads and MLP shards to ranks changes nothing without SPD
//! (the block computes the same function), raises within-rank dissimilarity, moves whole KV
//! groups when the partition allows, and replays from its record.

mod common;

use common::*;
use std::sync::Arc;
use syncdrop::headgroup::{apply, group_block};
use syncdrop::quant::GgmlType;
use syncdrop::{Engine, EngineOptions, ModelFiles};

fn engine(path: &std::path::Path, tp: usize) -> Engine {
    let files = Arc::new(ModelFiles::open(path).unwrap());
    let opts = EngineOptions {
        tp,
        threads: 1,
        capacity: 64,
        ..Default::default()
    };
    Engine::new(files, &opts).unwrap()
}

fn logits(e: &mut Engine, toks: &[u32]) -> Vec<f32> {
    let mut out = e.forward(toks, 0, 0..toks.len()).unwrap().data;
    out.extend(e.forward(&[9], toks.len(), 0..1).unwrap().data);
    out
}

#[test]
fn grouping_preserves_the_model_without_spd_and_raises_dissimilarity() {
    for (heads, kv, tp) in [(8usize, 2usize, 2usize), (8, 4, 3), (6, 3, 4), (8, 2, 8)] {
        let t = Tiny {
            n_heads: heads,
            n_kv_heads: kv,
            n_layers: 2,
            ..Tiny::small()
        };
        let dir = tmpdir(&format!("hg{heads}{kv}{tp}"));
        let path = dir.join("m.gguf");
        write_gguf(&path, &t, 31, GgmlType::F32, "llama");
        let toks: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 64).collect();
        let calib: Vec<Vec<u32>> = (0..3)
            .map(|s| (0..16).map(|i| (i * 5 + s * 17) % 64).collect())
            .collect();
        let base = logits(&mut engine(&path, tp), &toks);
        let mut e = engine(&path, tp);
        let g = group_block(&mut e, 1, &calib).unwrap();
        assert!(
            g.dissimilarity_after >= g.dissimilarity_before - 1e-9,
            "{g:?}"
        );
        for (r, hs) in g.heads.iter().enumerate() {
            assert_eq!(
                hs.len(),
                e.layout.ranks[r].q_heads.len(),
                "rank {r} head count"
            );
        }
        let after = logits(&mut e, &toks);
        assert!(
            max_abs_diff(&after, &base) < 1e-4,
            "{heads}/{kv} at TP {tp}: grouping changed the model"
        );
        // replay from the record gives the same bits
        let mut e2 = engine(&path, tp);
        apply(&mut e2, 1, g.heads.clone(), g.ffn_order.clone()).unwrap();
        assert_eq!(logits(&mut e2, &toks), after);
        // and with SPD on that block, the grouping matters
        e.set_spd(&[false, true]).unwrap();
        let mut plain = engine(&path, tp);
        plain.set_spd(&[false, true]).unwrap();
        let moved = g.heads
            != plain
                .layout
                .ranks
                .iter()
                .map(|r| r.q_heads.clone())
                .collect::<Vec<_>>()
            || g.ffn_order.iter().enumerate().any(|(r, m)| r != *m);
        if moved {
            assert!(max_abs_diff(&logits(&mut e, &toks), &logits(&mut plain, &toks)) > 1e-6);
        }
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn whole_kv_groups_move_when_the_partition_allows() {
    // 6 heads, 3 KV groups of 2, TP 3 (2/2/2): every rank holds exactly one whole KV group.
    let t = Tiny {
        n_heads: 6,
        n_kv_heads: 3,
        ..Tiny::small()
    };
    let dir = tmpdir("hgkv");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 3, GgmlType::F32, "llama");
    let mut e = engine(&path, 3);
    let calib: Vec<Vec<u32>> = (0..2)
        .map(|s| (0..10).map(|i| (i * 3 + s) % 64).collect())
        .collect();
    let g = group_block(&mut e, 0, &calib).unwrap();
    for hs in &g.heads {
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0] / 2, hs[1] / 2, "heads {hs:?} split a KV group");
    }
    assert!(e.block_shards(0).iter().all(|s| s.kv_heads.len() == 1));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_groupings_are_rejected() {
    let dir = tmpdir("hgbad");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 3, GgmlType::F32, "llama");
    let mut e = engine(&path, 2);
    // 3 + 1 heads: rank 0 has buffers for 2
    assert!(apply(&mut e, 0, vec![vec![0, 1, 2], vec![3]], vec![0, 1]).is_err());
    // head 1 twice
    assert!(apply(&mut e, 0, vec![vec![0, 1], vec![1, 3]], vec![0, 1]).is_err());
    // MLP order not a permutation
    assert!(apply(&mut e, 0, vec![vec![0, 1], vec![2, 3]], vec![1, 1]).is_err());
    assert!(apply(&mut e, 0, vec![vec![0, 1], vec![2, 3]], vec![0]).is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// After a rank has failed (here: a forward past the KV cache), loading weights is refused
/// like every other command, with the same error, instead of going to the ranks.
#[test]
fn a_failed_engine_refuses_to_load_weights() {
    let dir = tmpdir("hgfail");
    let path = dir.join("m.gguf");
    write_gguf(&path, &Tiny::small(), 3, GgmlType::F32, "llama");
    let mut e = engine(&path, 2);
    let shards = e.block_shards(0);
    let w: Vec<_> = shards
        .iter()
        .map(|s| syncdrop::model::load_block(&e.files, &e.cfg, s, 0).unwrap())
        .collect();
    // (a bad argument is refused on the driver and leaves the engine usable: fail a rank)
    assert!(e.fail_ranks("injected rank failure").is_err());
    let refused = e.forward(&[1], 0, 0..1).unwrap_err().to_string();
    assert!(refused.contains("earlier failure"), "{refused}");
    let got = e.load_layer(0, w).unwrap_err().to_string();
    assert_eq!(got, refused, "load_layer");
    let got = e.set_block_shards(0, shards).unwrap_err().to_string();
    assert_eq!(got, refused, "set_block_shards");
    std::fs::remove_dir_all(dir).ok();
}

/// Head distances computed one passage at a time are those of the concatenated patterns, bit
/// for bit (the memory-light path head grouping uses).
#[test]
fn streamed_head_distances_equal_the_whole_patterns() {
    use syncdrop::headgroup::{distances, head_distances, head_patterns};
    let t = Tiny {
        n_heads: 6,
        n_kv_heads: 3,
        n_layers: 2,
        ..Tiny::small()
    };
    let dir = tmpdir("hgdist");
    let path = dir.join("m.gguf");
    write_gguf(&path, &t, 7, GgmlType::F32, "llama");
    let e = engine(&path, 2);
    let d = e.cfg.hidden;
    let xs: Vec<Vec<f32>> = [5usize, 9, 3]
        .iter()
        .enumerate()
        .map(|(s, len)| {
            (0..len * d)
                .map(|i| ((i * 7 + s * 13) % 17) as f32 / 9.0 - 0.9)
                .collect()
        })
        .collect();
    let whole = distances(&head_patterns(&e, 1, &xs).unwrap());
    let streamed = head_distances(&e, 1, &xs).unwrap();
    assert_eq!(whole, streamed);
    assert!(whole[0][1] > 0.0 && whole[1][0] == whole[0][1] && whole[2][2] == 0.0);
}
