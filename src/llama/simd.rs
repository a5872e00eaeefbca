//! The vector dot products under every CPU decode kernel: one row against one row ([`dot`]), and
//! one weight row against a few input rows ([`dots_rows`]), which loads each piece of the weight
//! row once for four inputs.
//!
//! Built for AVX2 + FMA (the project's `.cargo/config.toml` targets x86-64-v3) with explicit
//! intrinsics: written as plain loops, the multi-row product compiled to scalar code with its
//! accumulators spilled to the stack (9x slower in a microbenchmark). Other targets get the plain
//! loops. Each dot product keeps several independent chains of fused multiply-adds so that it
//! waits on arithmetic throughput, not on the multiply-add latency.

/// `x · w` for two rows of equal length.
pub(crate) fn dot(x: &[f32], w: &[f32]) -> f32 {
    dots([x], w)[0]
}

/// `dst[i] = x_i · w` for every row `x_i` of `x` (`dst.len()` rows of `w.len()` each), four rows
/// at a time sharing each load of `w`.
pub(crate) fn dots_rows(w: &[f32], x: &[f32], dst: &mut [f32]) {
    let k = w.len();
    assert!(
        x.len() >= dst.len() * k,
        "dots_rows: x is shorter than its rows"
    );
    let row = |i: usize| &x[i * k..(i + 1) * k];
    let mut i = 0;
    while dst.len() - i >= 4 {
        let d = dots([row(i), row(i + 1), row(i + 2), row(i + 3)], w);
        dst[i..i + 4].copy_from_slice(&d);
        i += 4;
    }
    match dst.len() - i {
        3 => dst[i..].copy_from_slice(&dots([row(i), row(i + 1), row(i + 2)], w)),
        2 => dst[i..].copy_from_slice(&dots([row(i), row(i + 1)], w)),
        1 => dst[i] = dots([row(i)], w)[0],
        _ => {}
    }
}

/// `[x · w for x in xs]`; every `x` must be at least as long as `w`. Prefetches the `w.len()`
/// floats after `w`, where the next weight row usually is.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dots<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = w.len();
    for x in &xs {
        assert!(x.len() >= k, "dots: a row is shorter than the weights");
    }
    // Two 8-lane accumulators per row (four for a single row): 2R independent chains.
    const STEP: usize = 16;
    let whole = k / STEP * STEP;
    let mut out = [0f32; R];
    // SAFETY: every load reads 8 floats at an offset below `whole` (<= k <= each row's length),
    // and the avx2 + fma features are enabled at compile time (the cfg above).
    unsafe {
        let mut acc0 = [_mm256_setzero_ps(); R];
        let mut acc1 = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c < whole {
            // The same line of the next row: rows are read in order, and the hardware prefetcher
            // alone left ~20% of a decode step's products waiting on memory. A hint only (never
            // dereferenced), hence the wrapping address.
            _mm_prefetch(w.as_ptr().wrapping_add(c + k) as *const i8, _MM_HINT_T0);
            let w0 = _mm256_loadu_ps(w.as_ptr().add(c));
            let w1 = _mm256_loadu_ps(w.as_ptr().add(c + 8));
            for r in 0..R {
                let p = xs[r].as_ptr().add(c);
                acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p), w0, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), w1, acc1[r]);
            }
            c += STEP;
        }
        for r in 0..R {
            let v = _mm256_add_ps(acc0[r], acc1[r]);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            let mut sum = _mm_cvtss_f32(s);
            for (a, b) in xs[r][whole..k].iter().zip(&w[whole..]) {
                sum = a.mul_add(*b, sum);
            }
            out[r] = sum;
        }
    }
    out
}

/// `[x · w for x in xs]` without AVX2: 16 independent lanes per row.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dots<const R: usize>(xs: [&[f32]; R], w: &[f32]) -> [f32; R] {
    const LANES: usize = 16;
    let mut out = [0f32; R];
    for (o, x) in out.iter_mut().zip(xs) {
        let mut acc = [0f32; LANES];
        let whole = w.len() / LANES * LANES;
        for (cx, cw) in x[..whole].chunks_exact(LANES).zip(w.chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] = cx[l].mul_add(cw[l], acc[l]);
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        for (a, b) in x[whole..w.len()].iter().zip(&w[whole..]) {
            sum = a.mul_add(*b, sum);
        }
        *o = sum;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Against a plain f64 sum, for lengths on both sides of the vector step and row counts that
    /// use every remainder of four.
    #[test]
    fn dot_products_match_a_plain_sum() {
        let mut rng = Rng::new(5);
        for k in [1, 15, 16, 17, 40, 576] {
            for m in 1..=9 {
                let w: Vec<f32> = (0..k).map(|_| rng.uniform() - 0.5).collect();
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
                let mut got = vec![0f32; m];
                dots_rows(&w, &x, &mut got);
                for (i, g) in got.iter().enumerate() {
                    let row = &x[i * k..(i + 1) * k];
                    let want: f64 = row.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
                    assert!((*g as f64 - want).abs() < 1e-4, "k={k} m={m} row {i}");
                    assert!((dot(row, &w) as f64 - want).abs() < 1e-4, "k={k}");
                }
            }
        }
    }
}
