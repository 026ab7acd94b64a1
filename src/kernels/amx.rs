//! f32 GEMMs of many rows on the AMX tile unit, in "bf16×3" (`MatmulPrecision::High`).
//!
//! Xeons since Sapphire Rapids multiply bf16 tiles (`tdpbf16ps`: 16×32 by 32×16 into 16×16 f32)
//! far faster than AVX-512 FMAs. bf16 alone keeps 8 bits of mantissa, so every f32 operand is
//! split into two bf16 halves, `a = a_hi + a_lo` (16 bits together), and a product is
//! `a_hi·b_hi + a_hi·b_lo + a_lo·b_hi`: three tile products, an error near 2⁻¹⁶ relative per
//! term instead of f32's 2⁻²⁴, sums in f32. Measured (`cargo bench --bench kernels`, MiniLM
//! shapes, 2 threads): 1.6–1.9× the f32 panel kernel from 16 rows up; the tile loads (10 per 12
//! products, all 8 tiles in use) bound it, not the products.
//!
//! Layout. The weights (n × k) are repacked once, lazily, from the f32 panels: for each block of
//! 16 output columns and each k-tile of 32, one 1 KiB tile in the VNNI order `tdpbf16ps` reads
//! (16 rows of k-pairs, each row 16 columns × 2 bf16), hi and lo in two arrays. The activations
//! are split per call into the same 1 KiB tiles (16 rows × 32 k), zero-padded. A task computes
//! 32 × 32 output blocks (four accumulator tiles) over the whole k, then adds the bias on the
//! way out.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::x86::lane_mask;

/// k per tile step (32 bf16 = one 64-byte tile row).
const KT: usize = 32;
/// Output columns per accumulator tile.
const NT: usize = 16;
/// Activation rows per tile.
const MT: usize = 16;
/// Bytes of one 16 × 64-byte tile.
const TILE_BYTES: usize = 1024;
/// bf16 elements of one tile.
const TILE_ELEMS: usize = TILE_BYTES / 2;

/// Whether this CPU and kernel let the process use AMX-BF16 (checked once; the permission
/// request is process-wide).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let cpu = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        cpu && request_tile_permission() && super::features().avx512
    })
}

/// Linux hands out the 8 KiB of tile state only on request: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`; without it the first tile instruction faults.
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain system call; unknown requests return an error code and change nothing.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// f32 → bf16, round to nearest even (NaN stays NaN for the quiet NaNs f32 math produces).
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The two bf16 halves of `x`: `hi = bf16(x)`, `lo = bf16(x - hi)`.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = bf16_bits(x);
    (hi, bf16_bits(x - bf16_to_f32(hi)))
}

/// An (n × k) weight matrix as hi/lo bf16 tiles: `[column block][k-tile]`, 512 u16 each.
pub(crate) struct AmxWeights {
    n: usize,
    k_tiles: usize,
    hi: Vec<u16>,
    lo: Vec<u16>,
}

impl AmxWeights {
    /// From any (n × k) element accessor; columns past n and k past k are zero.
    pub(crate) fn pack(n: usize, k: usize, weight: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let k_tiles = k.div_ceil(KT);
        // Column blocks padded to pairs: a task always computes 32 columns.
        let blocks = n.div_ceil(2 * NT) * 2;
        let per_block = k_tiles * TILE_ELEMS;
        let mut hi = vec![0u16; blocks * per_block];
        let mut lo = vec![0u16; blocks * per_block];
        let (hp, lp) = (SendU16(hi.as_mut_ptr()), SendU16(lo.as_mut_ptr()));
        super::parallel_chunks(blocks, k * NT * 8, |b0, b1| {
            for b in b0..b1 {
                // SAFETY: block b's range is written by this task only.
                let (hb, lb) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(hp.get().add(b * per_block), per_block),
                        std::slice::from_raw_parts_mut(lp.get().add(b * per_block), per_block),
                    )
                };
                for c in 0..NT.min(n.saturating_sub(b * NT)) {
                    for kk in 0..k {
                        let (h, l) = split(weight(b * NT + c, kk));
                        // Tile of k-tile kk/32; row (kk%32)/2; column c; element kk%2.
                        let at = (kk / KT) * TILE_ELEMS + (kk % KT) / 2 * 32 + c * 2 + kk % 2;
                        hb[at] = h;
                        lb[at] = l;
                    }
                }
            }
        });
        AmxWeights { n, k_tiles, hi, lo }
    }
}

#[derive(Clone, Copy)]
struct SendU16(*mut u16);
// SAFETY: tasks write disjoint ranges (see the users).
unsafe impl Send for SendU16 {}
unsafe impl Sync for SendU16 {}
impl SendU16 {
    fn get(self) -> *mut u16 {
        self.0
    }
}

/// Split activations, reused across calls (each call overwrites what it reads).
struct Acts {
    hi: Vec<u16>,
    lo: Vec<u16>,
}

thread_local! {
    static ACTS: RefCell<Acts> = const { RefCell::new(Acts { hi: Vec::new(), lo: Vec::new() }) };
}

/// `out (m × n) = x (m × k) · Wᵀ (+ bias)` on the tile unit. Caller checked [`available`].
pub(crate) fn matmul(
    w: &AmxWeights,
    x: &[f32],
    m: usize,
    k: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let n = w.n;
    let kp = w.k_tiles * KT;
    let mp = m.div_ceil(MT) * MT;
    ACTS.with_borrow_mut(|acts| {
        // Every element is written below (padding with zeros), so old contents may stay.
        acts.hi.resize(mp * kp, 0);
        acts.lo.resize(mp * kp, 0);
        let (hp, lp) = (SendU16(acts.hi.as_mut_ptr()), SendU16(acts.lo.as_mut_ptr()));
        let kt = w.k_tiles;
        super::parallel_chunks(mp, k * 8, |r0, r1| {
            for r in r0..r1 {
                // Row r's 32-wide pieces go to the tiles of its 16-row block: row r % 16 of
                // the tile of each k-tile, so a tile load reads 1 KiB in a row.
                let block = (r / MT * kt) * TILE_ELEMS + (r % MT) * KT;
                for t in 0..kt {
                    let at = block + t * TILE_ELEMS;
                    // SAFETY: this row of this tile is written by this task only.
                    let (h, l) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(hp.get().add(at), KT),
                            std::slice::from_raw_parts_mut(lp.get().add(at), KT),
                        )
                    };
                    // Rows past m and columns past k are zeros: they meet real weights.
                    let (k0, k1) = (t * KT, ((t + 1) * KT).min(k));
                    let used = if r < m { k1 - k0 } else { 0 };
                    h[used..].fill(0);
                    l[used..].fill(0);
                    if used > 0 {
                        let src = &x[r * k + k0..r * k + k1];
                        // SAFETY: AVX-512 is part of `available`.
                        unsafe { split_row(src, &mut h[..used], &mut l[..used]) };
                    }
                }
            }
        });
        let pairs = n.div_ceil(2 * NT);
        let outp = super::SendPtr(out.as_mut_ptr());
        let (ahi, alo) = (&acts.hi[..], &acts.lo[..]);
        // Work per column pair: its weights streamed plus 3 tile products per 16×16×32.
        let per_pair = kp * 2 * NT * 4 + mp * kp * 2 * NT / 64;
        super::parallel_chunks(pairs, per_pair, |p0, p1| {
            // SAFETY: AMX checked by the caller; tasks write disjoint column ranges of out.
            unsafe { tile_gemm(w, ahi, alo, m, bias, p0, p1, outp.get()) };
        });
    });
}

/// [`split`] over a row, 16 floats at a time.
///
/// # Safety
/// AVX-512F/BW available; `hi` and `lo` hold at least `x.len()` elements.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_row(x: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    let round = |v: __m512i| {
        // bits + 0x7fff + ((bits >> 16) & 1), then the top half.
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        _mm512_srli_epi32::<16>(_mm512_add_epi32(
            _mm512_add_epi32(v, _mm512_set1_epi32(0x7fff)),
            odd,
        ))
    };
    let chunks = x.len() / 16;
    unsafe {
        for c in 0..chunks {
            let v = _mm512_loadu_ps(x.as_ptr().add(c * 16));
            let h = round(_mm512_castps_si512(v));
            let back = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h));
            let l = round(_mm512_castps_si512(_mm512_sub_ps(v, back)));
            _mm256_storeu_si256(
                hi.as_mut_ptr().add(c * 16) as *mut __m256i,
                _mm512_cvtepi32_epi16(h),
            );
            _mm256_storeu_si256(
                lo.as_mut_ptr().add(c * 16) as *mut __m256i,
                _mm512_cvtepi32_epi16(l),
            );
        }
    }
    for i in chunks * 16..x.len() {
        (hi[i], lo[i]) = split(x[i]);
    }
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

/// Eight 16 × 64-byte tiles: tmm0–3 accumulate a 32 × 32 block, tmm4–5 hold weights, tmm6–7
/// activations.
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    reserved2: [0; 16],
};

/// Column pairs `[p0, p1)` (32 output columns each) of the product, all rows.
///
/// # Safety
/// AMX-BF16 usable by this process; `a_hi`/`a_lo` hold the row blocks' tiles (m rounded up to
/// 16 rows); `out` is m × w.n and its columns of these pairs belong to this call.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile_gemm(
    w: &AmxWeights,
    a_hi: &[u16],
    a_lo: &[u16],
    m: usize,
    bias: Option<&[f32]>,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let n = w.n;
    let block_elems = w.k_tiles * TILE_ELEMS;
    let mut scratch = [0f32; 4 * MT * NT];
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        // Rows outer: a 32-row block of activations stays in L1/L2 while this task's column
        // pairs stream past it (measured faster than pairs outer at 704 rows).
        let mut r0 = 0;
        while r0 < m {
            // Two row tiles, or one for a last block of at most 16 rows.
            let two = m - r0 > MT;
            let ah = a_hi.as_ptr().add(r0 / MT * w.k_tiles * TILE_ELEMS);
            let al = a_lo.as_ptr().add(r0 / MT * w.k_tiles * TILE_ELEMS);
            for pair in p0..p1 {
                let b0_hi = w.hi.as_ptr().add(2 * pair * block_elems);
                let b0_lo = w.lo.as_ptr().add(2 * pair * block_elems);
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for t in 0..w.k_tiles {
                    let bh = b0_hi.add(t * TILE_ELEMS);
                    let bl = b0_lo.add(t * TILE_ELEMS);
                    let (ah, al) = (ah.add(t * TILE_ELEMS), al.add(t * TILE_ELEMS));
                    if two {
                        step_two(bh, bl, block_elems, ah, al, block_elems);
                    } else {
                        step_one(bh, bl, block_elems, ah, al);
                    }
                }
                let s = scratch.as_mut_ptr();
                asm!(
                    "tilestored [{s} + {ld}], tmm0",
                    "tilestored [{s1} + {ld}], tmm1",
                    "tilestored [{s2} + {ld}], tmm2",
                    "tilestored [{s3} + {ld}], tmm3",
                    s = in(reg) s,
                    s1 = in(reg) s.add(MT * NT),
                    s2 = in(reg) s.add(2 * MT * NT),
                    s3 = in(reg) s.add(3 * MT * NT),
                    ld = in(reg) 64usize,
                    options(nostack)
                );
                // tmm0: rows r0.., columns 0..16 of the pair; tmm1: columns 16..32; tmm2/3:
                // the same for rows r0 + 16.. (none past m are written).
                for (tile, (dr, dc)) in [(0, 0), (0, NT), (MT, 0), (MT, NT)].into_iter().enumerate()
                {
                    let col0 = pair * 2 * NT + dc;
                    let cols = NT.min(n.saturating_sub(col0));
                    let rows = MT.min(m.saturating_sub(r0 + dr));
                    let mask = lane_mask(cols);
                    let b = match bias {
                        Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(col0)),
                        None => _mm512_setzero_ps(),
                    };
                    for r in 0..rows {
                        let v = _mm512_loadu_ps(scratch.as_ptr().add(tile * MT * NT + r * NT));
                        let dst = out.add((r0 + dr + r) * n + col0);
                        _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(v, b));
                    }
                }
            }
            r0 += 2 * MT;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// One k-tile of a 32 × 32 block: `C += A_hi·B_hi + A_hi·B_lo + A_lo·B_hi`. `block`: elements
/// from one 16-column block's tiles to the next; `next_rows`: from one 16-row block's to the next.
#[inline(always)]
unsafe fn step_two(
    bh: *const u16,
    bl: *const u16,
    block: usize,
    ah: *const u16,
    al: *const u16,
    next_rows: usize,
) {
    unsafe {
        asm!(
            "tileloadd tmm4, [{bh0} + {s64}]",
            "tileloadd tmm6, [{ah0} + {s64}]",
            "tdpbf16ps tmm0, tmm6, tmm4",
            "tileloadd tmm5, [{bh1} + {s64}]",
            "tdpbf16ps tmm1, tmm6, tmm5",
            "tileloadd tmm7, [{ah1} + {s64}]",
            "tdpbf16ps tmm2, tmm7, tmm4",
            "tdpbf16ps tmm3, tmm7, tmm5",
            "tileloadd tmm4, [{bl0} + {s64}]",
            "tdpbf16ps tmm0, tmm6, tmm4",
            "tileloadd tmm5, [{bl1} + {s64}]",
            "tdpbf16ps tmm1, tmm6, tmm5",
            "tdpbf16ps tmm2, tmm7, tmm4",
            "tdpbf16ps tmm3, tmm7, tmm5",
            "tileloadd tmm6, [{al0} + {s64}]",
            "tileloadd tmm4, [{bh0} + {s64}]",
            "tdpbf16ps tmm0, tmm6, tmm4",
            "tileloadd tmm5, [{bh1} + {s64}]",
            "tdpbf16ps tmm1, tmm6, tmm5",
            "tileloadd tmm7, [{al1} + {s64}]",
            "tdpbf16ps tmm2, tmm7, tmm4",
            "tdpbf16ps tmm3, tmm7, tmm5",
            bh0 = in(reg) bh,
            bh1 = in(reg) bh.add(block),
            bl0 = in(reg) bl,
            bl1 = in(reg) bl.add(block),
            ah0 = in(reg) ah,
            ah1 = in(reg) ah.add(next_rows),
            al0 = in(reg) al,
            al1 = in(reg) al.add(next_rows),
            s64 = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
}

/// The same for the last 16 rows alone (tmm2/3 stay zero).
#[inline(always)]
unsafe fn step_one(bh: *const u16, bl: *const u16, block: usize, ah: *const u16, al: *const u16) {
    unsafe {
        asm!(
            "tileloadd tmm4, [{bh0} + {s64}]",
            "tileloadd tmm5, [{bh1} + {s64}]",
            "tileloadd tmm6, [{ah0} + {s64}]",
            "tdpbf16ps tmm0, tmm6, tmm4",
            "tdpbf16ps tmm1, tmm6, tmm5",
            "tileloadd tmm7, [{al0} + {s64}]",
            "tdpbf16ps tmm0, tmm7, tmm4",
            "tdpbf16ps tmm1, tmm7, tmm5",
            "tileloadd tmm4, [{bl0} + {s64}]",
            "tileloadd tmm5, [{bl1} + {s64}]",
            "tdpbf16ps tmm0, tmm6, tmm4",
            "tdpbf16ps tmm1, tmm6, tmm5",
            bh0 = in(reg) bh,
            bh1 = in(reg) bh.add(block),
            bl0 = in(reg) bl,
            bl1 = in(reg) bl.add(block),
            ah0 = in(reg) ah,
            al0 = in(reg) al,
            s64 = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_carry_sixteen_bits() {
        for x in [1.0f32, -2.718_281_7, 1e-20, 6.5e4, 0.1, -7.3e-3] {
            let (h, l) = split(x);
            let back = bf16_to_f32(h) + bf16_to_f32(l);
            assert!(((back - x) / x).abs() < 1.0 / 65536.0, "{x}: {back}");
        }
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // Round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
    }

    #[test]
    fn tiles_match_a_plain_matmul_on_ragged_shapes() {
        if !available() {
            eprintln!("no AMX-BF16 on this machine: tile GEMM not exercised");
            return;
        }
        let mut seed = 11u32;
        let mut rand = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, n, k) in &[
            (1, 3, 5),
            (16, 32, 32),
            (17, 70, 300),
            (33, 64, 513),
            (64, 33, 17),
            (100, 384, 384),
        ] {
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rand() * 10.0).collect();
            let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
            let packed = AmxWeights::pack(n, k, |j, i| w[j * k + i]);
            let mut got = vec![f32::NAN; m * n];
            matmul(&packed, &x, m, k, Some(&bias), &mut got);
            for r in 0..m {
                for j in 0..n {
                    let (dot, size) = (0..k).fold((0f64, 0f64), |(d, s), i| {
                        let p = x[r * k + i] as f64 * w[j * k + i] as f64;
                        (d + p, s + p.abs())
                    });
                    let want = dot + bias[j] as f64;
                    let g = got[r * n + j] as f64;
                    // bf16×3 keeps ~2^-16 per term: bounded by the sum of |terms|.
                    assert!(
                        (g - want).abs() <= 1e-5 * size + 1e-6,
                        "({m},{n},{k}) [{r},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}
