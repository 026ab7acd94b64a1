//! Portable scalar kernels: block (de)quantization and the fallback matmul.

use super::{quant_lines, QuantKind, QuantMatrix, QuantizedActs, GROUP};
use half::f16;

#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Block `b` of row `row` of an interleaved matrix in the unified form `w = u·d + m` (see the
/// module docs): the 32 unsigned quant values into `u`, and `(d, m)`.
#[inline]
pub(crate) fn block_of(w: &QuantMatrix, row: usize, b: usize, u: &mut [u8; 32]) -> (f32, f32) {
    let nb = w.cols / 32;
    let chunk = &w.data[((row / GROUP) * nb + b) * w.chunk_bytes()..][..w.chunk_bytes()];
    let lane = row % GROUP;
    let lines = quant_lines(w.kind);
    for j in 0..lines {
        let bytes = &chunk[j * 64 + lane * 4..][..4];
        for t in 0..4 {
            if w.kind == QuantKind::Q8_0 {
                u[4 * j + t] = bytes[t];
            } else {
                u[4 * j + t] = bytes[t] & 0x0f;
                u[16 + 4 * j + t] = bytes[t] >> 4;
            }
        }
    }
    let scales = w.scales_offset();
    let d = f16_at(chunk, scales + 2 * lane);
    let m = match w.kind {
        QuantKind::Q4_0 => -8.0 * d,
        QuantKind::Q4_1 => f16_at(chunk, scales + 32 + 2 * lane),
        QuantKind::Q8_0 => -128.0 * d,
    };
    (d, m)
}

/// Quantize 32 values into one block appended to `out` (ggml's reference rounding).
pub(crate) fn quantize_block(kind: QuantKind, x: &[f32], out: &mut Vec<u8>) {
    match kind {
        QuantKind::Q4_0 => {
            // ggml: d = max / -8 where max is the signed value of largest magnitude.
            let mut amax = 0.0f32;
            let mut max = 0.0f32;
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for j in 0..16 {
                let a = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                let b = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                out.push(a | (b << 4));
            }
        }
        QuantKind::Q4_1 => {
            let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
            let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
            for j in 0..16 {
                let a = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                let b = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.push(a | (b << 4));
            }
        }
        QuantKind::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
            for &v in x {
                out.push((v * id).round() as i8 as u8);
            }
        }
    }
}

/// Fallback: rows `[r0, r1)` of `out (m × rows) = x · Wᵀ` with quantized activations.
pub(crate) fn gemv_scalar(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    gemv_body(w, acts, m, r0, r1, out)
}

#[inline(always)]
fn gemv_body(w: &QuantMatrix, acts: &QuantizedActs, m: usize, r0: usize, r1: usize, out: *mut f32) {
    let nb = acts.nb;
    let cols = acts.cols;
    let mut u = [0u8; 32];
    let mut acc = vec![0.0f32; m];
    for r in r0..r1 {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for b in 0..nb {
            let (d, mn) = block_of(w, r, b, &mut u);
            for i in 0..m {
                let xq = &acts.q[i * cols + b * 32..i * cols + b * 32 + 32];
                let mut s = 0i32;
                for j in 0..32 {
                    s += u[j] as i32 * xq[j] as i32;
                }
                acc[i] += d * acts.d[i * nb + b] * s as f32 + mn * acts.s[i * nb + b];
            }
        }
        for i in 0..m {
            // SAFETY: the caller hands each task a disjoint row range; i < m, r < rows.
            unsafe { *out.add(i * w.rows + r) = acc[i] };
        }
    }
}
