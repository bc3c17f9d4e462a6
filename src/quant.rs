//! Dequantisation of the GGML tensor formats syncdrop reads: F32, F16, BF16, Q4_0, Q4_1, Q8_0,
//! Q4_K and Q6_K. Each format is a run of fixed-size blocks; `dequantize_row` turns the bytes
//! of one row (a whole number of blocks) into f32. Layouts follow ggml's `ggml-common.h`.

#![warn(missing_docs)]

use crate::error::{Error, Result};
use half::{bf16, f16};

/// The GGML element types syncdrop knows by number (`enum ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// Blocks of 32: an f16 scale and 4-bit values offset by -8 (id 2).
    Q4_0,
    /// Blocks of 32: f16 scale and minimum, unsigned 4-bit values (id 3).
    Q4_1,
    /// Blocks of 32: an f16 scale and signed 8-bit values (id 8).
    Q8_0,
    /// Super-blocks of 256 in eight sub-blocks with 6-bit scales and minimums (id 12).
    Q4K,
    /// Super-blocks of 256: 6-bit values in sixteen sub-blocks with 8-bit scales (id 14).
    Q6K,
    /// bfloat16 (id 30).
    BF16,
}

impl GgmlType {
    /// Map ggml's numeric id. Unknown ids return the ggml name so errors can say what it was.
    pub fn from_id(id: u32) -> Result<GgmlType, &'static str> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            6 => return Err("Q5_0"),
            7 => return Err("Q5_1"),
            9 => return Err("Q8_1"),
            10 => return Err("Q2_K"),
            11 => return Err("Q3_K"),
            13 => return Err("Q5_K"),
            15 => return Err("Q8_K"),
            16..=23 => return Err("IQ*"),
            _ => return Err("unknown"),
        })
    }

    /// ggml's numeric id (the inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18, // f16 d, 16 B nibbles
            GgmlType::Q4_1 => 20, // f16 d, f16 m, 16 B nibbles
            GgmlType::Q8_0 => 34, // f16 d, 32 x i8
            GgmlType::Q4K => 144, // f16 d, f16 dmin, 12 B scales, 128 B nibbles
            GgmlType::Q6K => 210, // 128 B ql, 64 B qh, 16 x i8 scales, f16 d
        }
    }

    /// Bytes of a row of `n` elements, or None when `n` is not a whole number of blocks or the
    /// byte count overflows `usize`.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if n % self.block_elems() != 0 {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `out.len()` elements from `src` (exactly `ty.row_bytes(out.len())` bytes).
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    debug_assert_eq!(Some(src.len()), ty.row_bytes(n));
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = d * ((q & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = d * (q & 0x0f) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q4K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(144)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, og) in o.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * g..32 * g + 32];
                    for l in 0..32 {
                        og[l] = d1 * (q[l] & 0x0f) as f32 - mm1;
                        og[l + 32] = d2 * (q[l] >> 4) as f32 - mm2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut o[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// 6-bit scale and min of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// [`try_quantize_row`] for input known to be valid: used by tests and benchmarks to build
/// small model files.
///
/// # Panics
///
/// With the message of [`try_quantize_row`]'s error: a type it cannot write, or a length
/// that is not a whole number of blocks.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    try_quantize_row(ty, x).unwrap_or_else(|e| panic!("{e}"))
}

/// Encode f32 as F32, F16, BF16, Q8_0 or Q4_1 (the reference rounding of ggml), for the GGUF
/// writer. `InvalidArgument` for Q4_0, Q4_K and Q6_K (not written by syncdrop) and for a
/// length that is not a whole number of blocks (32 elements for Q8_0 and Q4_1).
pub fn try_quantize_row(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let n_bytes = ty.row_bytes(x.len()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "cannot quantise {} values to {ty:?}: not a multiple of its {}-element block",
            x.len(),
            ty.block_elems()
        ))
    })?;
    let mut out = Vec::with_capacity(n_bytes);
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        GgmlType::Q4_1 => {
            for b in x.chunks_exact(32) {
                let min = b.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as u8).min(15);
                    let q1 = (((b[j + 16] - min) * id + 0.5) as u8).min(15);
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4K | GgmlType::Q6K => {
            return Err(Error::InvalidArgument(format!(
                "quantising to {ty:?} is not supported (F32, F16, BF16, Q8_0 and Q4_1 are)"
            )))
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_1_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 8.0)
            .collect();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
            let q = quantize_row(ty, &x);
            assert_eq!(Some(q.len()), ty.row_bytes(x.len()));
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &q, &mut y);
            for b in 0..2 {
                let blk = &x[32 * b..32 * b + 32];
                let (lo, hi) = blk
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let step = match ty {
                    GgmlType::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                    _ => (hi - lo) / 15.0,
                };
                for j in 32 * b..32 * b + 32 {
                    assert!((x[j] - y[j]).abs() <= 0.51 * step + 1e-3, "{ty:?} {j}");
                }
            }
        }
    }

    #[test]
    fn q4_k_known_block() {
        // d = 1, dmin = 0.5; sub-block 0 scale 2 min 4; nibbles 0..15 repeating.
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[4] = 2; // scale of sub-block 0
        b[8] = 4; // min of sub-block 0
        for l in 0..128 {
            b[16 + l] = (l % 16) as u8;
        }
        let mut y = vec![0f32; 256];
        dequantize_row(GgmlType::Q4K, &b, &mut y);
        for l in 0..32 {
            assert_eq!(y[l], 2.0 * (l % 16) as f32 - 2.0);
        }
        // sub-block 1 has scale 0 and min 0: the high nibbles are 0 anyway.
        assert!(y[32..64].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn q6_k_known_block() {
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        for s in 0..16 {
            b[192 + s] = (s as i8 - 8) as u8;
        }
        for l in 0..128 {
            b[l] = 0x21; // low nibble 1, high nibble 2
        }
        for l in 0..64 {
            b[128 + l] = 0b1110_0100; // qh pairs 0,1,2,3
        }
        let mut y = vec![0f32; 256];
        dequantize_row(GgmlType::Q6K, &b, &mut y);
        // element 0: ql low nibble 1 | (qh&3=0)<<4 = 1 -> 1-32 = -31, scale sc[0] = -8
        assert_eq!(y[0], 0.25 * -8.0 * -31.0);
        // element 32: ql[32] low 1 | ((qh>>2)&3=1)<<4 = 17 -> -15, scale sc[2] = -6
        assert_eq!(y[32], 0.25 * -6.0 * -15.0);
        // element 64: ql[0] high 2 | ((qh>>4)&3=2)<<4 = 34 -> 2, scale sc[4] = -4
        assert_eq!(y[64], 0.25 * -4.0 * 2.0);
        // element 96: ql[32] high 2 | ((qh>>6)&3=3)<<4 = 50 -> 18, scale sc[6] = -2
        assert_eq!(y[96], 0.25 * -2.0 * 18.0);
    }
}
