//! x86-64 AVX-512 (F/BW/VL + VNNI) kernels.  Only called after runtime feature detection.

#![allow(unused_unsafe)]

use super::{QuantKind, QuantMatrix, QuantizedActs};
use std::arch::x86_64::*;
use std::cell::RefCell;

const KQ4_0: u8 = 0;
const KQ4_1: u8 = 1;
const KQ8_0: u8 = 2;

#[inline(always)]
fn kind_id(k: QuantKind) -> u8 {
    match k {
        QuantKind::Q4_0 => KQ4_0,
        QuantKind::Q4_1 => KQ4_1,
        QuantKind::Q8_0 => KQ8_0,
    }
}

const fn block_bytes(k: u8) -> usize {
    match k {
        KQ4_0 => 18,
        KQ4_1 => 20,
        _ => 34,
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

/// Quantize one row (`x.len()` multiple of 32) to int8 blocks; round-to-nearest-even like the
/// scalar path.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub(crate) unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / 32;
    debug_assert!(q.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
    let xp = x.as_ptr();
    let qp = q.as_mut_ptr();
    let absmask = _mm512_set1_epi32(0x7fff_ffff);
    for b in 0..nb {
        unsafe {
            let a = _mm512_loadu_ps(xp.add(b * 32));
            let c = _mm512_loadu_ps(xp.add(b * 32 + 16));
            let aa = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), absmask));
            let ca = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(c), absmask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ca));
            let db = amax / 127.0;
            let id = if db > 0.0 { 1.0 / db } else { 0.0 };
            let vid = _mm512_set1_ps(id);
            // cvtps rounds with MXCSR (nearest-even by default).
            let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid));
            let qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, vid));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
            _mm_storeu_si128(qp.add(b * 32) as *mut __m128i, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128(
                qp.add(b * 32 + 16) as *mut __m128i,
                _mm512_cvtepi32_epi8(qc),
            );
            *d.get_unchecked_mut(b) = db;
            *s.get_unchecked_mut(b) = db * sum as f32;
        }
    }
}

/// The sum of a block's 32 quantized values.
#[inline(always)]
unsafe fn sum_i32x32(qi: [__m256i; 4]) -> i32 {
    unsafe {
        let total = _mm256_add_epi32(
            _mm256_add_epi32(qi[0], qi[1]),
            _mm256_add_epi32(qi[2], qi[3]),
        );
        let total = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b01_00_11_10>(total));
        _mm_cvtsi128_si32(_mm_add_epi32(
            total,
            _mm_shuffle_epi32::<0b10_11_00_01>(total),
        ))
    }
}

/// A block's 32 values (each within i8) stored as bytes at `dst`, in order.
#[inline(always)]
unsafe fn store_i8x32(qi: [__m256i; 4], dst: *mut i8) {
    unsafe {
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(qi[0], qi[1]),
            _mm256_packs_epi32(qi[2], qi[3]),
        );
        // packs interleave 128-bit lanes; this puts the 4-byte groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(
            dst as *mut __m256i,
            _mm256_permutevar8x32_epi32(bytes, order),
        );
    }
}

/// [`quantize_row_avx512`] on AVX2: the same blocks, bit for bit.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / 32;
    debug_assert!(q.len() >= nb * 32 && d.len() >= nb && s.len() >= nb);
    let xp = x.as_ptr();
    let qp = q.as_mut_ptr();
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        for b in 0..nb {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xp.add(b * 32 + 8 * i)));
            let mut amax = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *vi));
            }
            let half = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let half = _mm_max_ps(half, _mm_movehl_ps(half, half));
            let amax = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
            let db = amax / 127.0;
            let id = if db > 0.0 { 1.0 / db } else { 0.0 };
            let vid = _mm256_set1_ps(id);
            // cvtps rounds with MXCSR (nearest-even by default), as the scalar path.
            let qi: [__m256i; 4] =
                std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid)));
            let sum = sum_i32x32(qi);
            store_i8x32(qi, qp.add(b * 32));
            *d.get_unchecked_mut(b) = db;
            *s.get_unchecked_mut(b) = db * sum as f32;
        }
    }
}

/// What rounding `x` to (`q`, `d`) left over, rounded to int8 at the fixed scale `d / 256`,
/// bit for bit as `quantize_residual_row_scalar`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_residual_row_avx2(
    x: &[f32],
    (q, d): (&[i8], &[f32]),
    (rq, rd, rs): (&mut [i8], &mut [f32], &mut [f32]),
) {
    let nb = x.len() / 32;
    debug_assert!(q.len() >= nb * 32 && rq.len() >= nb * 32 && d.len() >= nb);
    debug_assert!(rd.len() >= nb && rs.len() >= nb);
    let (xp, qp, rp) = (x.as_ptr(), q.as_ptr(), rq.as_mut_ptr());
    unsafe {
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        for b in 0..nb {
            let db = *d.get_unchecked(b);
            let vd = _mm256_set1_ps(db);
            let vid = _mm256_set1_ps(if db > 0.0 { 256.0 / db } else { 0.0 });
            let qi: [__m256i; 4] = std::array::from_fn(|i| {
                let main = _mm_loadl_epi64(qp.add(b * 32 + 8 * i) as *const __m128i);
                let main = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(main));
                // x − d·q as two roundings, like the scalar path (no fused multiply-add).
                let rest = _mm256_sub_ps(
                    _mm256_loadu_ps(xp.add(b * 32 + 8 * i)),
                    _mm256_mul_ps(vd, main),
                );
                let r = _mm256_cvtps_epi32(_mm256_mul_ps(rest, vid));
                _mm256_max_epi32(lo, _mm256_min_epi32(hi, r))
            });
            let sum = sum_i32x32(qi);
            store_i8x32(qi, rp.add(b * 32));
            let scale = db / 256.0;
            *rd.get_unchecked_mut(b) = scale;
            *rs.get_unchecked_mut(b) = scale * sum as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small-m (decode) path: stream the interleaved groups of 16 rows.
// ---------------------------------------------------------------------------------------------

/// 64-byte lines of quant bytes per chunk (16 rows × 16 or 32 bytes).
const fn lines(k: u8) -> usize {
    if k == KQ8_0 {
        8
    } else {
        4
    }
}

/// Bytes of one group-block chunk.
const fn chunk_bytes(k: u8) -> usize {
    16 * block_bytes(k)
}

/// The weight-offset constant `c` of `w = d·(u + c)` (Q4_0, Q8_0).
const fn offset_of(k: u8) -> f32 {
    if k == KQ4_0 {
        -8.0
    } else {
        -128.0
    }
}

/// Software prefetch distance of the group stream, in bytes. Measured on SmolLM2-shaped
/// matrices (benches/kernels.rs, 2 threads): none 15.6 GB/s, 1 KiB 20, 4 KiB ~29, 8 KiB 29.
const PREFETCH: usize = 4096;

/// Four activation bytes broadcast to every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(x: *const i8) -> __m512i {
    unsafe { _mm512_set1_epi32((x as *const i32).read_unaligned()) }
}

#[inline(always)]
unsafe fn bcast4_256(x: *const i8) -> __m256i {
    unsafe { _mm256_set1_epi32((x as *const i32).read_unaligned()) }
}

/// One group of 16 weight rows (chunks from `c0`) against `MX` activation rows: lane `r` of
/// result `i` is row `r`'s dot product with activation row `i`.
#[inline(always)]
unsafe fn group16<const K: u8, const MX: usize>(
    c0: *const u8,
    nb: usize,
    xq: [*const i8; MX],
    xd: [*const f32; MX],
    xs: [*const f32; MX],
) -> [__m512; MX] {
    unsafe {
        let cb = chunk_bytes(K);
        let so = lines(K) * 64;
        let nib = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); MX];
        for b in 0..nb {
            let c = c0.add(b * cb);
            let mut off = 0;
            while off < cb {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(PREFETCH + off) as *const i8);
                off += 64;
            }
            // Two integer chains per activation row halve the dependency on `vpdpbusd`'s latency.
            let mut s0 = [_mm512_setzero_si512(); MX];
            let mut s1 = [_mm512_setzero_si512(); MX];
            if K == KQ8_0 {
                for j in (0..8).step_by(2) {
                    let w0 = _mm512_loadu_si512(c.add(j * 64) as *const _);
                    let w1 = _mm512_loadu_si512(c.add(j * 64 + 64) as *const _);
                    for i in 0..MX {
                        let x = xq[i].add(b * 32 + 4 * j);
                        s0[i] = _mm512_dpbusd_epi32(s0[i], w0, bcast4(x));
                        s1[i] = _mm512_dpbusd_epi32(s1[i], w1, bcast4(x.add(4)));
                    }
                }
            } else {
                for j in 0..4 {
                    let w = _mm512_loadu_si512(c.add(j * 64) as *const _);
                    let lo = _mm512_and_si512(w, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
                    for i in 0..MX {
                        let x = xq[i].add(b * 32 + 4 * j);
                        s0[i] = _mm512_dpbusd_epi32(s0[i], lo, bcast4(x));
                        s1[i] = _mm512_dpbusd_epi32(s1[i], hi, bcast4(x.add(16)));
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(so) as *const __m256i));
            if K == KQ4_1 {
                let mn = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(so + 32) as *const __m256i));
                for i in 0..MX {
                    let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
                    let t = _mm512_mul_ps(s, _mm512_set1_ps(*xd[i].add(b)));
                    acc[i] = _mm512_fmadd_ps(t, d, acc[i]);
                    acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(*xs[i].add(b)), acc[i]);
                }
            } else {
                // Σ w·x = d·(d_x·Σ u·q + c·s_x)
                for i in 0..MX {
                    let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[i], s1[i]));
                    let t = _mm512_fmadd_ps(
                        s,
                        _mm512_set1_ps(*xd[i].add(b)),
                        _mm512_set1_ps(offset_of(K) * *xs[i].add(b)),
                    );
                    acc[i] = _mm512_fmadd_ps(t, d, acc[i]);
                }
            }
        }
        acc
    }
}

/// Half `h` (rows 8h..8h+8) of a group against `MX` activation rows on 256-bit registers,
/// without VNNI: `maddubs` + `madd`.
#[inline(always)]
unsafe fn group8_avx2<const K: u8, const MX: usize>(
    c0: *const u8,
    h: usize,
    nb: usize,
    xq: [*const i8; MX],
    xd: [*const f32; MX],
    xs: [*const f32; MX],
) -> [__m256; MX] {
    unsafe {
        let mut acc = [_mm256_setzero_ps(); MX];
        for b in 0..nb {
            let c = c0.add(b * chunk_bytes(K));
            let sums = block_sums8::<K, MX>(c, h, b, xq);
            for i in 0..MX {
                let sf = _mm256_cvtepi32_ps(sums[i]);
                acc[i] = scale_block8::<K>(c, h, sf, *xd[i].add(b), *xs[i].add(b), acc[i]);
            }
        }
        acc
    }
}

/// Block `b` of half `h` of a group (chunk at `c`) against `MX` activation rows, in integers:
/// lane `r` of result `i` is Σ u·q of weight row 8h + r with activation row `i`. Q8_0 runs
/// signed (|w| · sign(x, w)) so that the i16 pair sums cannot saturate; Q4's nibbles cannot.
#[inline(always)]
unsafe fn block_sums8<const K: u8, const MX: usize>(
    c: *const u8,
    h: usize,
    b: usize,
    xq: [*const i8; MX],
) -> [__m256i; MX] {
    unsafe {
        let nib = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let dot = |u: __m256i, x: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
        let mut s = [_mm256_setzero_si256(); MX];
        if K == KQ8_0 {
            for j in 0..lines(K) {
                let w = _mm256_loadu_si256(c.add(j * 64 + 32 * h) as *const __m256i);
                let signed = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
                let magnitude = _mm256_abs_epi8(signed);
                for i in 0..MX {
                    let x = bcast4_256(xq[i].add(b * 32 + 4 * j));
                    s[i] = _mm256_add_epi32(s[i], dot(magnitude, _mm256_sign_epi8(x, signed)));
                }
            }
        } else {
            // A Q4 block's eight `maddubs` pair sums (each |·| ≤ 2·15·128) add up in 16
            // bits without overflow (≤ 30720): one widening `madd` per block, not eight.
            let mut s16 = [_mm256_setzero_si256(); MX];
            for j in 0..lines(K) {
                let w = _mm256_loadu_si256(c.add(j * 64 + 32 * h) as *const __m256i);
                let lo = _mm256_and_si256(w, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
                for i in 0..MX {
                    let x = xq[i].add(b * 32 + 4 * j);
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast4_256(x)),
                        _mm256_maddubs_epi16(hi, bcast4_256(x.add(16))),
                    );
                    s16[i] = _mm256_add_epi16(s16[i], p);
                }
            }
            for i in 0..MX {
                s[i] = _mm256_madd_epi16(s16[i], ones);
            }
        }
        s
    }
}

/// `acc` plus block sums `sf` (of half `h` of the chunk at `c`) scaled to the weights' and the
/// activations' values: the activation block's scale `xd` and sum `xs`.
#[inline(always)]
unsafe fn scale_block8<const K: u8>(
    c: *const u8,
    h: usize,
    sf: __m256,
    xd: f32,
    xs: f32,
    acc: __m256,
) -> __m256 {
    unsafe {
        let so = lines(K) * 64;
        let d = _mm256_cvtph_ps(_mm_loadu_si128(c.add(so + 16 * h) as *const __m128i));
        match K {
            KQ4_1 => {
                let mn =
                    _mm256_cvtph_ps(_mm_loadu_si128(c.add(so + 32 + 16 * h) as *const __m128i));
                let a = _mm256_fmadd_ps(_mm256_mul_ps(sf, _mm256_set1_ps(xd)), d, acc);
                _mm256_fmadd_ps(mn, _mm256_set1_ps(xs), a)
            }
            KQ4_0 => {
                let bias = _mm256_set1_ps(-8.0 * xs);
                _mm256_fmadd_ps(_mm256_fmadd_ps(sf, _mm256_set1_ps(xd), bias), d, acc)
            }
            _ => _mm256_fmadd_ps(_mm256_mul_ps(sf, _mm256_set1_ps(xd)), d, acc),
        }
    }
}

/// [`group8_avx2`] for `T` tokens of precise activations: slots `0..T` hold their int8 rows,
/// slots `T..2T` (`MX = 2T`) their residuals at exactly 1/256 of the main scale, so each
/// token's two integer sums combine as `main · 256 + residual` before one conversion and one
/// scaling (exact: |·| < 2²⁴ for Q4 blocks).
#[inline(always)]
unsafe fn group8_precise_avx2<const K: u8, const MX: usize, const T: usize>(
    c0: *const u8,
    h: usize,
    nb: usize,
    xq: [*const i8; MX],
    xd: [*const f32; MX],
    xs: [*const f32; MX],
) -> [__m256; T] {
    debug_assert_eq!(MX, 2 * T);
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let c = c0.add(b * chunk_bytes(K));
            let sums = block_sums8::<K, MX>(c, h, b, xq);
            for t in 0..T {
                let sum = _mm256_add_epi32(_mm256_slli_epi32::<8>(sums[t]), sums[T + t]);
                let (rd, xs) = (*xd[T + t].add(b), *xs[t].add(b) + *xs[T + t].add(b));
                acc[t] = scale_block8::<K>(c, h, _mm256_cvtepi32_ps(sum), rd, xs, acc[t]);
            }
        }
        acc
    }
}

/// Groups `[r0, r1)/16` against all `m` activation rows, four at a time per group while its
/// weights are in L1, so the weights stream from memory once whatever `m`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn gemv_kind<const K: u8>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    #[inline(always)]
    unsafe fn quad<const K: u8, const MX: usize>(
        c0: *const u8,
        acts: &QuantizedActs,
        i0: usize,
        out: *mut f32,
        stride: usize,
        mask: __mmask16,
    ) {
        unsafe {
            let (xq, xd, xs) = act_rows::<MX>(acts, i0);
            let acc = group16::<K, MX>(c0, acts.nb, xq, xd, xs);
            for i in 0..MX {
                _mm512_mask_storeu_ps(out.add((i0 + i) * stride), mask, acc[i]);
            }
        }
    }
    unsafe {
        let group_bytes = acts.nb * chunk_bytes(K);
        let mut g = r0 / 16;
        while g * 16 < r1 {
            let c0 = w.data.as_ptr().add(g * group_bytes);
            let mask = lane_mask(r1 - g * 16);
            let o = out.add(g * 16);
            let mut i0 = 0;
            while i0 < m {
                match m - i0 {
                    1 => quad::<K, 1>(c0, acts, i0, o, w.rows, mask),
                    2 => quad::<K, 2>(c0, acts, i0, o, w.rows, mask),
                    3 => quad::<K, 3>(c0, acts, i0, o, w.rows, mask),
                    _ => quad::<K, 4>(c0, acts, i0, o, w.rows, mask),
                }
                i0 += 4;
            }
            g += 1;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_kind_avx2<const K: u8, const MX: usize>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    i0: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    unsafe {
        let (xq, xd, xs) = act_rows::<MX>(acts, i0);
        let group_bytes = acts.nb * chunk_bytes(K);
        let mut r = r0;
        while r < r1 {
            let c0 = w.data.as_ptr().add((r / 16) * group_bytes);
            let acc = group8_avx2::<K, MX>(c0, (r / 8) % 2, acts.nb, xq, xd, xs);
            for i in 0..MX {
                store_rows8(out.add((i0 + i) * w.rows + r), acc[i], r1 - r);
            }
            r += 8;
        }
    }
}

/// Rows `[r0, r1)` (`r0` a multiple of 16) of `out (m × rows)` from precise activations:
/// `acts` rows `0..m` and their int8 residuals `m..2m` (see `quant_matmul_precise`). A token's
/// two rows go through the weights side by side and their integer block sums combine before
/// one scaling and the one store: no `2m`-row product is written and summed afterwards.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `out` must hold `m × w.rows` floats and no other
/// thread may write the touched elements concurrently.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemv_precise_avx2(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    debug_assert_eq!(r0 % 16, 0);
    unsafe fn tokens<const K: u8>(
        w: &QuantMatrix,
        acts: &QuantizedActs,
        m: usize,
        r0: usize,
        r1: usize,
        out: *mut f32,
    ) {
        // Two tokens per pass: three spilled accumulators to the stack and ran ~10% slower.
        let mut t0 = 0;
        while t0 < m {
            unsafe {
                if m - t0 >= 2 {
                    gemv_tokens_avx2::<K, 4, 2>(w, acts, m, t0, r0, r1, out);
                } else {
                    gemv_tokens_avx2::<K, 2, 1>(w, acts, m, t0, r0, r1, out);
                }
            }
            t0 += 2;
        }
    }
    unsafe {
        match kind_id(w.kind) {
            KQ4_0 => tokens::<KQ4_0>(w, acts, m, r0, r1, out),
            KQ4_1 => tokens::<KQ4_1>(w, acts, m, r0, r1, out),
            _ => tokens::<KQ8_0>(w, acts, m, r0, r1, out),
        }
    }
}

/// Tokens `t0..t0 + T`, each as its (main, residual) pair of activation rows (`MX = 2T`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_tokens_avx2<const K: u8, const MX: usize, const T: usize>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    t0: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    unsafe {
        // Slots 0..T: the tokens' rows; T..2T: their residuals, m rows further.
        let (xq, xd, xs) = act_rows_at::<MX>(acts, |i| t0 + i % T + (i / T) * m);
        let group_bytes = acts.nb * chunk_bytes(K);
        let mut r = r0;
        while r < r1 {
            let c0 = w.data.as_ptr().add((r / 16) * group_bytes);
            let acc = group8_precise_avx2::<K, MX, T>(c0, (r / 8) % 2, acts.nb, xq, xd, xs);
            for (t, sum) in acc.into_iter().enumerate() {
                store_rows8(out.add((t0 + t) * w.rows + r), sum, r1 - r);
            }
            r += 8;
        }
    }
}

/// Eight outputs of one row at `dst`, of which the first `left` (if under 8) are the matrix's
/// (a copy of a runtime length was a `memmove` call per store, 2% of a prefill).
#[inline(always)]
unsafe fn store_rows8(dst: *mut f32, v: __m256, left: usize) {
    unsafe {
        if left >= 8 {
            _mm256_storeu_ps(dst, v);
        } else {
            _mm256_maskstore_ps(dst, super::activation::x86::avx2::mask8(left), v);
        }
    }
}

/// Pointers to activation rows `i0..i0 + MX`.
#[inline(always)]
fn act_rows<const MX: usize>(
    acts: &QuantizedActs,
    i0: usize,
) -> ([*const i8; MX], [*const f32; MX], [*const f32; MX]) {
    act_rows_at::<MX>(acts, |i| i0 + i)
}

/// Pointers to activation rows `row(0)..row(MX - 1)`.
#[inline(always)]
fn act_rows_at<const MX: usize>(
    acts: &QuantizedActs,
    row: impl Fn(usize) -> usize,
) -> ([*const i8; MX], [*const f32; MX], [*const f32; MX]) {
    let (cols, nb) = (acts.cols, acts.nb);
    let mut xq = [std::ptr::null::<i8>(); MX];
    let mut xd = [std::ptr::null::<f32>(); MX];
    let mut xs = [std::ptr::null::<f32>(); MX];
    for i in 0..MX {
        xq[i] = acts.q[row(i) * cols..].as_ptr();
        xd[i] = acts.d[row(i) * nb..].as_ptr();
        xs[i] = acts.s[row(i) * nb..].as_ptr();
    }
    (xq, xd, xs)
}

unsafe fn gemv_group<const K: u8, const VNNI: bool>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    if VNNI {
        return unsafe { gemv_kind::<K>(w, acts, m, r0, r1, out) };
    }
    let mut i0 = 0;
    while i0 < m {
        let left = m - i0;
        unsafe {
            match left {
                1 => gemv_kind_avx2::<K, 1>(w, acts, i0, r0, r1, out),
                2 => gemv_kind_avx2::<K, 2>(w, acts, i0, r0, r1, out),
                3 => gemv_kind_avx2::<K, 3>(w, acts, i0, r0, r1, out),
                _ => gemv_kind_avx2::<K, 4>(w, acts, i0, r0, r1, out),
            }
        }
        i0 += left.min(4);
    }
}

/// Rows `[r0, r1)` (`r0` a multiple of 16) of `out (m × rows) = x · Wᵀ`, streaming the
/// interleaved groups: with AVX-512 VNNI (`VNNI = true`) or with AVX2 `maddubs` for machines
/// without it.
///
/// # Safety
/// With `VNNI`, AVX-512 F/BW/VL/VNNI, FMA and F16C must be available, otherwise AVX2, FMA and
/// F16C; `out` must hold `m × w.rows` floats and no other thread may write the touched elements
/// concurrently.
pub(crate) unsafe fn gemv<const VNNI: bool>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    debug_assert_eq!(r0 % 16, 0);
    unsafe {
        match kind_id(w.kind) {
            KQ4_0 => gemv_group::<KQ4_0, VNNI>(w, acts, m, r0, r1, out),
            KQ4_1 => gemv_group::<KQ4_1, VNNI>(w, acts, m, r0, r1, out),
            _ => gemv_group::<KQ8_0, VNNI>(w, acts, m, r0, r1, out),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Large-m (prefill) path: repack a panel of NR weight rows, register-blocked int8 GEMM.
// ---------------------------------------------------------------------------------------------

/// Weight rows per panel (two 16-lane registers).
pub(crate) const NR: usize = 32;
/// Activation rows per micro-kernel call.
const MR: usize = 6;
/// Repacked bytes per block per panel: 8 groups of 4 k × 32 rows.
const PANEL_BLOCK_BYTES: usize = 8 * NR * 4;

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

struct Panel {
    /// `nb × 8 (k/4) × 2 (row halves) × 16 lanes × 4 bytes`.
    wq: Vec<Line>,
    /// `nb × [d(32), m(32)]`.
    dm: Vec<f32>,
}

thread_local! {
    static PANEL: RefCell<Panel> = const { RefCell::new(Panel { wq: Vec::new(), dm: Vec::new() }) };
}

/// Unpack rows `[p0, p0 + NR)` (`p0` a multiple of NR, so two interleaved groups; a group past
/// the matrix's end is zero) into the panel: one byte per weight and f32 scales.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn repack_panel<const K: u8>(w: &QuantMatrix, p0: usize, nb: usize, panel: &mut Panel) {
    let lines_needed = nb * PANEL_BLOCK_BYTES / 64;
    if panel.wq.len() < lines_needed {
        panel.wq.resize(lines_needed, Line([0; 64]));
    }
    if panel.dm.len() < nb * 64 {
        panel.dm.resize(nb * 64, 0.0);
    }
    let wq = panel.wq.as_mut_ptr() as *mut u8;
    let dm = panel.dm.as_mut_ptr();
    let nib = _mm512_set1_epi8(0x0f);
    let cb = chunk_bytes(K);
    let so = lines(K) * 64;
    let groups = w.rows.div_ceil(16);
    for g in 0..2 {
        let group = p0 / 16 + g;
        for b in 0..nb {
            unsafe {
                let dst = wq.add(b * PANEL_BLOCK_BYTES + g * 64);
                if group >= groups {
                    for k4 in 0..8 {
                        _mm512_store_si512(dst.add(k4 * 128) as *mut _, _mm512_setzero_si512());
                    }
                    _mm512_storeu_ps(dm.add(b * 64 + g * 16), _mm512_setzero_ps());
                    _mm512_storeu_ps(dm.add(b * 64 + 32 + g * 16), _mm512_setzero_ps());
                    continue;
                }
                let c = w.data.as_ptr().add((group * nb + b) * cb);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(so) as *const __m256i));
                let m = if K == KQ4_1 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(c.add(so + 32) as *const __m256i))
                } else {
                    _mm512_mul_ps(d, _mm512_set1_ps(offset_of(K)))
                };
                _mm512_storeu_ps(dm.add(b * 64 + g * 16), d);
                _mm512_storeu_ps(dm.add(b * 64 + 32 + g * 16), m);
                if K == KQ8_0 {
                    for k4 in 0..8 {
                        let v = _mm512_loadu_si512(c.add(k4 * 64) as *const _);
                        _mm512_store_si512(dst.add(k4 * 128) as *mut _, v);
                    }
                } else {
                    for k4 in 0..4 {
                        let v = _mm512_loadu_si512(c.add(k4 * 64) as *const _);
                        _mm512_store_si512(dst.add(k4 * 128) as *mut _, _mm512_and_si512(v, nib));
                        let h = _mm512_and_si512(_mm512_srli_epi32(v, 4), nib);
                        _mm512_store_si512(dst.add((k4 + 4) * 128) as *mut _, h);
                    }
                }
            }
        }
    }
}

/// `MR'` activation rows × NR weight rows over all `nb` blocks.
#[inline(always)]
unsafe fn micro<const R: usize>(
    wq: *const u8,
    dm: *const f32,
    nb: usize,
    xq: *const i8,
    cols: usize,
    xd: *const f32,
    xs: *const f32,
    out: *mut f32,
    out_stride: usize,
    m0: __mmask16,
    m1: __mmask16,
) {
    unsafe {
        let mut fa0 = [_mm512_setzero_ps(); R];
        let mut fa1 = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let mut ia0 = [_mm512_setzero_si512(); R];
            let mut ia1 = [_mm512_setzero_si512(); R];
            let wb = wq.add(b * PANEL_BLOCK_BYTES);
            let xb = xq.add(b * 32);
            for k4 in 0..8 {
                let w0 = _mm512_load_si512(wb.add(k4 * 128) as *const _);
                let w1 = _mm512_load_si512(wb.add(k4 * 128 + 64) as *const _);
                for r in 0..R {
                    let xv = _mm512_set1_epi32(
                        (xb.add(r * cols + k4 * 4) as *const i32).read_unaligned(),
                    );
                    ia0[r] = _mm512_dpbusd_epi32(ia0[r], w0, xv);
                    ia1[r] = _mm512_dpbusd_epi32(ia1[r], w1, xv);
                }
            }
            let d0 = _mm512_loadu_ps(dm.add(b * 64));
            let d1 = _mm512_loadu_ps(dm.add(b * 64 + 16));
            let mn0 = _mm512_loadu_ps(dm.add(b * 64 + 32));
            let mn1 = _mm512_loadu_ps(dm.add(b * 64 + 48));
            for r in 0..R {
                let sd = _mm512_set1_ps(*xd.add(r * (cols / 32) + b));
                let ss = _mm512_set1_ps(*xs.add(r * (cols / 32) + b));
                fa0[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ia0[r]), d0), sd, fa0[r]);
                fa1[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ia1[r]), d1), sd, fa1[r]);
                fa0[r] = _mm512_fmadd_ps(mn0, ss, fa0[r]);
                fa1[r] = _mm512_fmadd_ps(mn1, ss, fa1[r]);
            }
        }
        for r in 0..R {
            _mm512_mask_storeu_ps(out.add(r * out_stride), m0, fa0[r]);
            _mm512_mask_storeu_ps(out.add(r * out_stride + 16), m1, fa1[r]);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn gemm_kind<const K: u8>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
    panel: &mut Panel,
) {
    let nb = acts.nb;
    let cols = acts.cols;
    {
        let mut p0 = r0;
        while p0 < r1 {
            let nvalid = (r1 - p0).min(NR);
            unsafe { repack_panel::<K>(w, p0, nb, panel) };
            let mk0 = lane_mask(nvalid);
            let mk1 = lane_mask(nvalid.saturating_sub(16));
            let wq = panel.wq.as_ptr() as *const u8;
            let dm = panel.dm.as_ptr();
            let mut i0 = 0;
            while i0 < m {
                let left = (m - i0).min(MR);
                unsafe {
                    let xq = acts.q.as_ptr().add(i0 * cols);
                    let xd = acts.d.as_ptr().add(i0 * nb);
                    let xs = acts.s.as_ptr().add(i0 * nb);
                    let o = out.add(i0 * w.rows + p0);
                    let st = w.rows;
                    match left {
                        1 => micro::<1>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                        2 => micro::<2>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                        3 => micro::<3>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                        4 => micro::<4>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                        5 => micro::<5>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                        _ => micro::<MR>(wq, dm, nb, xq, cols, xd, xs, o, st, mk0, mk1),
                    }
                }
                i0 += left;
            }
            p0 += nvalid;
        }
    }
}

/// A mask of the first `n` (≤ 16 used) lanes of a 16-lane register.
#[inline(always)]
pub(crate) fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Rows `[r0, r1)` of `out (m × rows) = x · Wᵀ` via repacked panels.
///
/// # Safety
/// As [`gemv`] with `VNNI`.
pub(crate) unsafe fn gemm_avx512(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    let run = |panel: &mut Panel| unsafe {
        match kind_id(w.kind) {
            KQ4_0 => gemm_kind::<KQ4_0>(w, acts, m, r0, r1, out, panel),
            KQ4_1 => gemm_kind::<KQ4_1>(w, acts, m, r0, r1, out, panel),
            _ => gemm_kind::<KQ8_0>(w, acts, m, r0, r1, out, panel),
        }
    };
    PANEL.with(|p| match p.try_borrow_mut() {
        Ok(mut panel) => run(&mut panel),
        // Not expected (nothing here re-enters rayon), but never panic on a busy scratch.
        Err(_) => run(&mut Panel {
            wq: Vec::new(),
            dm: Vec::new(),
        }),
    })
}
