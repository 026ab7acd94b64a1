//! Bidirectional (encoder) attention straight from a fused QKV projection in host memory.
//!
//! For encoder inputs of a few dozen tokens the arithmetic is tiny; what costs is the framework
//! around it (transposes to head-major copies, a GEMM call per head, a mask tensor, softmax as
//! another pass). This walks each (sequence, head) once: dot products, softmax and the weighted
//! sum of values, reading q, k and v where the projection wrote them.

/// `qkv`: (batch × t, 3 × hidden) rows holding [q | k | v]; `lengths[b]` real tokens of sequence
/// b (keys past it are padding). Writes `out`: (batch × t, hidden). q is scaled by 1/√head_dim here.
pub fn bidirectional_attention(
    qkv: &[f32],
    batch: usize,
    t: usize,
    heads: usize,
    head_dim: usize,
    lengths: &[usize],
    out: &mut [f32],
) {
    let hidden = heads * head_dim;
    assert_eq!(qkv.len(), batch * t * 3 * hidden, "qkv shape");
    assert_eq!(out.len(), batch * t * hidden, "out shape");
    assert_eq!(lengths.len(), batch, "one length per sequence");
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row = 3 * hidden;
    let job = |b: usize, h: usize, out_rows: &mut dyn FnMut(usize, &[f32])| {
        let len = lengths[b].min(t);
        let mut scores = vec![0f32; len];
        let mut acc = vec![0f32; head_dim];
        for i in 0..t {
            let q = &qkv[(b * t + i) * row + h * head_dim..][..head_dim];
            for (j, s) in scores.iter_mut().enumerate() {
                let k = &qkv[(b * t + j) * row + hidden + h * head_dim..][..head_dim];
                *s = dot(q, k) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            acc.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let v = &qkv[(b * t + j) * row + 2 * hidden + h * head_dim..][..head_dim];
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += p * x;
                }
            }
            let inv = 1.0 / sum;
            acc.iter_mut().for_each(|a| *a *= inv);
            out_rows(b * t + i, &acc);
        }
    };
    let outp = super::SendPtr(out.as_mut_ptr());
    let tasks = batch * heads;
    let work = |task: usize| {
        let (b, h) = (task / heads, task % heads);
        job(b, h, &mut |r, values| {
            // SAFETY: row r, columns of head h: written by this task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(outp.get().add(r * hidden + h * head_dim), head_dim)
            };
            dst.copy_from_slice(values);
        });
    };
    // ~t² · head_dim · 4 flops per task; below ~100k flops in all, threads cost more than they save.
    if tasks * t * t * head_dim < 25_000 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(work);
    } else {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(work);
    }
}

/// Dot product in 8 independent lanes, so the compiler can keep it in vector registers.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_attention_with_padding() {
        let (batch, t, heads, hd) = (2, 5, 3, 4);
        let hidden = heads * hd;
        let qkv: Vec<f32> = (0..batch * t * 3 * hidden)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let lengths = [5, 3];
        let mut out = vec![0f32; batch * t * hidden];
        bidirectional_attention(&qkv, batch, t, heads, hd, &lengths, &mut out);
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..t {
                    let at = |r: usize, part: usize, d: usize| {
                        qkv[(b * t + r) * 3 * hidden + part * hidden + h * hd + d] as f64
                    };
                    let s: Vec<f64> = (0..lengths[b])
                        .map(|j| {
                            (0..hd).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..lengths[b]).map(|j| e[j] / z * at(j, 2, d)).sum();
                        let got = out[(b * t + i) * hidden + h * hd + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "b{b} h{h} i{i} d{d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
