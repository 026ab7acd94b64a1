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

const fn qs_offset(k: u8) -> usize {
    match k {
        KQ4_1 => 4,
        _ => 2,
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

// ---------------------------------------------------------------------------------------------
// Small-m (decode) path: stream weight rows in GGUF layout.
// ---------------------------------------------------------------------------------------------

/// Unpack one block at `blk` into 32 unsigned bytes plus (d, m) of the unified form.
#[inline(always)]
unsafe fn unpack_block<const K: u8>(blk: *const u8) -> (__m256i, f32, f32) {
    unsafe {
        let u = if K == KQ8_0 {
            let v = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            _mm256_xor_si256(v, _mm256_set1_epi8(-128))
        } else {
            let v = _mm_loadu_si128(blk.add(qs_offset(K)) as *const __m128i);
            let hi = _mm_srli_epi16(v, 4);
            let c = _mm256_inserti128_si256(_mm256_castsi128_si256(v), hi, 1);
            _mm256_and_si256(c, _mm256_set1_epi8(0x0f))
        };
        if K == KQ4_1 {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            (u, d, m)
        } else {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (blk as *const u16).read_unaligned() as i32,
            )));
            let m = if K == KQ4_0 { -8.0 * d } else { -128.0 * d };
            (u, d, m)
        }
    }
}

#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Software prefetch distance (bytes) for the weight stream.
const PREFETCH: usize = 1024;

/// Σ over 4-byte groups of `u·x` (u unsigned, x signed) into 8 i32 lanes.  Without VNNI this
/// is `maddubs` + `madd`, exact as long as `2·u·|x| < 2^15`, i.e. for 4-bit `u`; Q8_0 uses
/// [`unpack_q8_signed`] instead.
#[inline(always)]
unsafe fn dot_u8i8<const VNNI: bool>(u: __m256i, x: __m256i) -> __m256i {
    unsafe {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
        }
    }
}

/// One weight row against `MX` activation rows.
#[inline(always)]
unsafe fn gemv_row<const K: u8, const MX: usize, const VNNI: bool>(
    row: *const u8,
    nb: usize,
    xq: [*const i8; MX],
    xd: [*const f32; MX],
    xs: [*const f32; MX],
) -> [f32; MX] {
    unsafe {
        let bb = block_bytes(K);
        // Without VNNI, Q8_0 runs signed: |w| · sign(x, w), and no min term.
        let signed = !VNNI && K == KQ8_0;
        let mut acc0 = [_mm256_setzero_ps(); MX];
        let mut acc1 = [_mm256_setzero_ps(); MX];
        let mut macc = [0.0f32; MX];
        let mut b = 0;
        while b + 2 <= nb {
            _mm_prefetch::<_MM_HINT_T0>(row.add(b * bb + PREFETCH) as *const i8);
            let (u0, d0, m0) = unpack_block::<K>(row.add(b * bb));
            let (u1, d1, m1) = unpack_block::<K>(row.add((b + 1) * bb));
            let (m0, m1) = if signed { (0.0, 0.0) } else { (m0, m1) };
            let (w0, w1) = if signed {
                let flip = _mm256_set1_epi8(-128);
                (_mm256_xor_si256(u0, flip), _mm256_xor_si256(u1, flip))
            } else {
                (u0, u1)
            };
            for i in 0..MX {
                let mut x0 = _mm256_loadu_si256(xq[i].add(b * 32) as *const __m256i);
                let mut x1 = _mm256_loadu_si256(xq[i].add(b * 32 + 32) as *const __m256i);
                let (mut u0, mut u1) = (u0, u1);
                if signed {
                    x0 = _mm256_sign_epi8(x0, w0);
                    x1 = _mm256_sign_epi8(x1, w1);
                    u0 = _mm256_abs_epi8(w0);
                    u1 = _mm256_abs_epi8(w1);
                }
                let p0 = dot_u8i8::<VNNI>(u0, x0);
                let p1 = dot_u8i8::<VNNI>(u1, x1);
                let s0 = d0 * *xd[i].add(b);
                let s1 = d1 * *xd[i].add(b + 1);
                acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0), acc0[i]);
                acc1[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s1), acc1[i]);
                macc[i] += m0 * *xs[i].add(b) + m1 * *xs[i].add(b + 1);
            }
            b += 2;
        }
        if b < nb {
            let (u0, d0, m0) = unpack_block::<K>(row.add(b * bb));
            let m0 = if signed { 0.0 } else { m0 };
            for i in 0..MX {
                let mut x0 = _mm256_loadu_si256(xq[i].add(b * 32) as *const __m256i);
                let mut u0 = u0;
                if signed {
                    let w0 = _mm256_xor_si256(u0, _mm256_set1_epi8(-128));
                    x0 = _mm256_sign_epi8(x0, w0);
                    u0 = _mm256_abs_epi8(w0);
                }
                let p0 = dot_u8i8::<VNNI>(u0, x0);
                let s0 = d0 * *xd[i].add(b);
                acc0[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0), acc0[i]);
                macc[i] += m0 * *xs[i].add(b);
            }
        }
        let mut res = [0.0f32; MX];
        for i in 0..MX {
            res[i] = hsum256(_mm256_add_ps(acc0[i], acc1[i])) + macc[i];
        }
        res
    }
}

/// Four consecutive Q4 weight rows (at `base + j·rb`) against `MX` activation rows: each
/// 128-bit lane of a zmm holds one row's 16 quant bytes, so one pair of `vpdpbusd` covers
/// 4 rows × 32 elements and the block scales are applied as 16-lane vectors.
#[inline(always)]
unsafe fn gemv4_q4<const K: u8, const MX: usize>(
    base: *const u8,
    rb: usize,
    nb: usize,
    xq: [*const i8; MX],
    xd: [*const f32; MX],
    xs: [*const f32; MX],
) -> [[f32; 4]; MX] {
    unsafe {
        let bb = block_bytes(K);
        let qo = qs_offset(K);
        let nib = _mm512_set1_epi8(0x0f);
        let hidx = _mm_setr_epi32(0, rb as i32, 2 * rb as i32, 3 * rb as i32);
        // lanes 4j..4j+3 take element 2j (d of row j) / 2j+1 (m of row j) of the cvtph result.
        let sel_d = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
        let sel_m = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); MX];
        // The next group of 4 rows is contiguous: sweep it with prefetches, 4·bb bytes per block.
        let next = base.wrapping_add(4 * rb * PREFETCH_GROUPS);
        for b in 0..nb {
            let pf = next.wrapping_add(b * 4 * bb);
            _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64) as *const i8);
            let p = base.add(b * bb);
            let q01 = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128(p.add(qo) as *const __m128i)),
                _mm_loadu_si128(p.add(rb + qo) as *const __m128i),
                1,
            );
            let q23 = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128(p.add(2 * rb + qo) as *const __m128i)),
                _mm_loadu_si128(p.add(3 * rb + qo) as *const __m128i),
                1,
            );
            let q = _mm512_inserti64x4(_mm512_castsi256_si512(q01), q23, 1);
            let lo = _mm512_and_si512(q, nib);
            let hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), nib);
            let hdr = _mm_i32gather_epi32::<1>(p as *const i32, hidx);
            let dm = _mm512_castps256_ps512(_mm256_cvtph_ps(hdr));
            let dz = _mm512_permutexvar_ps(sel_d, dm);
            let mz = if K == KQ4_1 {
                _mm512_permutexvar_ps(sel_m, dm)
            } else {
                _mm512_mul_ps(dz, _mm512_set1_ps(-8.0))
            };
            for i in 0..MX {
                let xb = xq[i].add(b * 32);
                let xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(xb as *const __m128i));
                let xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(xb.add(16) as *const __m128i));
                let sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xlo), hi, xhi);
                let sc = _mm512_mul_ps(dz, _mm512_set1_ps(*xd[i].add(b)));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sc, acc[i]);
                // Each row's term is spread over its 4 lanes, hence the exact factor 1/4.
                acc[i] = _mm512_fmadd_ps(mz, _mm512_set1_ps(*xs[i].add(b) * 0.25), acc[i]);
            }
        }
        let mut res = [[0.0f32; 4]; MX];
        for i in 0..MX {
            let mut t = [0.0f32; 16];
            _mm512_storeu_ps(t.as_mut_ptr(), acc[i]);
            for j in 0..4 {
                res[i][j] = (t[4 * j] + t[4 * j + 1]) + (t[4 * j + 2] + t[4 * j + 3]);
            }
        }
        res
    }
}

/// Prefetch distance of the 4-row kernel, in groups of 4 rows.
const PREFETCH_GROUPS: usize = 1;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn gemv_kind<const K: u8, const MX: usize>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    i0: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    unsafe { gemv_kind_body::<K, MX, true>(w, acts, i0, r0, r1, out) }
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
    unsafe { gemv_kind_body::<K, MX, false>(w, acts, i0, r0, r1, out) }
}

#[inline(always)]
unsafe fn gemv_kind_body<const K: u8, const MX: usize, const VNNI: bool>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    i0: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    let nb = acts.nb;
    let cols = acts.cols;
    let rb = w.row_bytes();
    let mut xq = [std::ptr::null::<i8>(); MX];
    let mut xd = [std::ptr::null::<f32>(); MX];
    let mut xs = [std::ptr::null::<f32>(); MX];
    for i in 0..MX {
        xq[i] = acts.q[(i0 + i) * cols..].as_ptr();
        xd[i] = acts.d[(i0 + i) * nb..].as_ptr();
        xs[i] = acts.s[(i0 + i) * nb..].as_ptr();
    }
    let base = w.data.as_ptr();
    let mut r0 = r0;
    if K != KQ8_0 && VNNI {
        while r0 + 4 <= r1 {
            unsafe {
                let res = gemv4_q4::<K, MX>(base.add(r0 * rb), rb, nb, xq, xd, xs);
                for i in 0..MX {
                    for j in 0..4 {
                        *out.add((i0 + i) * w.rows + r0 + j) = res[i][j];
                    }
                }
            }
            r0 += 4;
        }
    }
    for r in r0..r1 {
        unsafe {
            let res = gemv_row::<K, MX, VNNI>(base.add(r * rb), nb, xq, xd, xs);
            for i in 0..MX {
                *out.add((i0 + i) * w.rows + r) = res[i];
            }
        }
    }
}

unsafe fn gemv_group<const K: u8, const VNNI: bool>(
    w: &QuantMatrix,
    acts: &QuantizedActs,
    m: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
) {
    let mut i0 = 0;
    while i0 < m {
        let left = m - i0;
        unsafe {
            if VNNI {
                match left {
                    1 => gemv_kind::<K, 1>(w, acts, i0, r0, r1, out),
                    2 => gemv_kind::<K, 2>(w, acts, i0, r0, r1, out),
                    3 => gemv_kind::<K, 3>(w, acts, i0, r0, r1, out),
                    _ => gemv_kind::<K, 4>(w, acts, i0, r0, r1, out),
                }
            } else {
                match left {
                    1 => gemv_kind_avx2::<K, 1>(w, acts, i0, r0, r1, out),
                    2 => gemv_kind_avx2::<K, 2>(w, acts, i0, r0, r1, out),
                    3 => gemv_kind_avx2::<K, 3>(w, acts, i0, r0, r1, out),
                    _ => gemv_kind_avx2::<K, 4>(w, acts, i0, r0, r1, out),
                }
            }
        }
        i0 += left.min(4);
    }
}

/// Rows `[r0, r1)` of `out (m × rows) = x · Wᵀ`, streaming the weights in place: with AVX-512
/// VNNI (`VNNI = true`) or with AVX2 `maddubs` for machines without it.
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

/// Repack rows `[p0, p0 + nvalid)` (nvalid ≤ NR) into the panel; missing rows are zero.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn repack_panel<const K: u8>(
    w: &QuantMatrix,
    p0: usize,
    nvalid: usize,
    nb: usize,
    panel: &mut Panel,
) {
    let rb = w.row_bytes();
    let bb = block_bytes(K);
    let lines = nb * PANEL_BLOCK_BYTES / 64;
    if panel.wq.len() < lines {
        panel.wq.resize(lines, Line([0; 64]));
    }
    if panel.dm.len() < nb * 64 {
        panel.dm.resize(nb * 64, 0.0);
    }
    let wq = panel.wq.as_mut_ptr() as *mut u8;
    let dm = panel.dm.as_mut_ptr();
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let offs = _mm512_mullo_epi32(lane, _mm512_set1_epi32(rb as i32));
    let nib = _mm512_set1_epi8(0x0f);
    for g in 0..2 {
        let rows_here = nvalid.saturating_sub(g * 16).min(16);
        let mask: __mmask16 = if rows_here >= 16 {
            0xffff
        } else {
            ((1u32 << rows_here) - 1) as u16
        };
        if mask == 0 {
            for b in 0..nb {
                unsafe {
                    for k4 in 0..8 {
                        _mm512_store_si512(
                            wq.add(b * PANEL_BLOCK_BYTES + k4 * 128 + g * 64) as *mut _,
                            _mm512_setzero_si512(),
                        );
                    }
                    _mm512_storeu_ps(dm.add(b * 64 + g * 16), _mm512_setzero_ps());
                    _mm512_storeu_ps(dm.add(b * 64 + 32 + g * 16), _mm512_setzero_ps());
                }
            }
            continue;
        }
        let base = unsafe { w.data.as_ptr().add((p0 + g * 16) * rb) };
        // The next panel (NR·rb contiguous bytes) is swept by prefetches: 16·bb bytes per step.
        let next = w.data.as_ptr().wrapping_add((p0 + NR) * rb + g * 16 * rb);
        for b in 0..nb {
            let pf = next.wrapping_add(b * 16 * bb);
            let mut off = 0;
            while off < 16 * bb {
                _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(off) as *const i8);
                off += 64;
            }
            unsafe {
                let blk = base.add(b * bb) as *const i32;
                let z = _mm512_setzero_si512();
                let hdr = _mm512_mask_i32gather_epi32::<1>(z, mask, offs, blk);
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hdr));
                let m = if K == KQ4_1 {
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hdr, 16)))
                } else if K == KQ4_0 {
                    _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
                } else {
                    _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
                };
                _mm512_storeu_ps(dm.add(b * 64 + g * 16), d);
                _mm512_storeu_ps(dm.add(b * 64 + 32 + g * 16), m);
                let dst = wq.add(b * PANEL_BLOCK_BYTES + g * 64);
                let qs = (blk as *const u8).add(qs_offset(K)) as *const i32;
                if K == KQ8_0 {
                    let flip = _mm512_set1_epi8(-128);
                    for k4 in 0..8 {
                        let v = _mm512_mask_i32gather_epi32::<1>(z, mask, offs, qs.add(k4));
                        let v = _mm512_maskz_xor_epi32(mask, v, flip);
                        _mm512_store_si512(dst.add(k4 * 128) as *mut _, v);
                    }
                } else {
                    for k4 in 0..4 {
                        let v = _mm512_mask_i32gather_epi32::<1>(z, mask, offs, qs.add(k4));
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
            unsafe { repack_panel::<K>(w, p0, nvalid, nb, panel) };
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
