//! The vector dot products under every CPU decode kernel: one row against one row ([`dot`]), and
//! one weight row against a few input rows ([`dots_rows`]), which loads each piece of the weight
//! row once for four inputs; the same for rows of 8-bit codes in blocks of [`QBLOCK`] with one
//! scale per block ([`dots_i8_rows`], the quantised weights' kernel: integer multiply-adds, one
//! float multiply-add per block). Where the CPU has AVX-512, a few weight rows against a few input
//! rows at once ([`dots_tile`], the batched decode step's kernel), with the same sums.
//!
//! Built for AVX2 + FMA (the project's `.cargo/config.toml` targets x86-64-v3) with explicit
//! intrinsics: written as plain loops, the multi-row product compiled to scalar code with its
//! accumulators spilled to the stack (9x slower in a microbenchmark). Other targets get the plain
//! loops. Each dot product keeps several independent chains of fused multiply-adds so that it
//! waits on arithmetic throughput, not on the multiply-add latency.

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

/// Weight rows per tile of [`dots_tile`].
pub(crate) const TILE_ROWS: usize = 4;

/// Input rows from which [`dots_tile`] multiplies in tiles. Below it a product is bound by
/// reading the weights, and one weight row at a time streams them faster (a microbenchmark of
/// a decode step's products on the demo model, medians of 40: 4 rows 14.4 ms row by row against
/// 16.8 in tiles, 6 rows 16.4 / 16.2, 7 rows 17.4 / 15.9, 8 rows 17.7 / 16.0).
const TILE_MIN_ROWS: usize = 7;

/// `dst[a * m + i] = x_i · ws[a]` for the `m` rows of `x` and up to [`TILE_ROWS`] weight rows
/// `ws` of one length, each result bit for bit the one [`dots_rows`] gives. Where the CPU has
/// AVX-512 (checked at run time), there are four weight rows and at least [`TILE_MIN_ROWS`]
/// input rows, it multiplies tiles of 4 weight rows by 4 input rows with one 16-lane accumulator
/// per product: each load of an input row serves four weight rows (8 loads per 16 multiply-adds,
/// against 10 per 8 in [`dots`]); the 16 lanes are [`dots`]' two 8-lane accumulators side by
/// side, added up in the same order. Otherwise weight row by weight row through [`dots_rows`].
pub(crate) fn dots_tile(ws: &[&[f32]], x: &[f32], m: usize, dst: &mut [f32]) {
    assert!(
        ws.len() <= TILE_ROWS && dst.len() == ws.len() * m,
        "dots_tile: {} weight rows, {} outputs for {m} input rows",
        ws.len(),
        dst.len()
    );
    // Only beside the AVX2 `dots`, whose sums the tiles reproduce.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if m >= TILE_MIN_ROWS && ws.len() == TILE_ROWS && avx512::available() {
        let k = ws[0].len();
        assert!(
            ws.iter().all(|w| w.len() == k) && x.len() >= m * k,
            "dots_tile: rows of different lengths"
        );
        let ws: [&[f32]; TILE_ROWS] = std::array::from_fn(|a| ws[a]);
        let mut i = 0;
        while i < m {
            match m - i {
                1 => avx512::tile::<1>(ws, x, i, m, dst),
                2 => avx512::tile::<2>(ws, x, i, m, dst),
                3 => avx512::tile::<3>(ws, x, i, m, dst),
                _ => avx512::tile::<4>(ws, x, i, m, dst),
            }
            i += 4;
        }
        return;
    }
    for (w, d) in ws.iter().zip(dst.chunks_exact_mut(m)) {
        dots_rows(w, x, d);
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx512 {
    use super::TILE_ROWS;
    use std::arch::x86_64::*;

    /// Whether this CPU runs AVX-512F (the build targets AVX2; the check is a cached load).
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// Rows `first..first + R` of `x` (`m` rows of `ws[0].len()`) against the four weight rows,
    /// into `dst[a * m + first + r]`.
    pub(super) fn tile<const R: usize>(
        ws: [&[f32]; TILE_ROWS],
        x: &[f32],
        first: usize,
        m: usize,
        dst: &mut [f32],
    ) {
        let k = ws[0].len();
        let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(first + r) * k..(first + r + 1) * k]);
        // SAFETY: `available()` was checked by the caller (the only one), and every row is `k`
        // long (checked there too).
        let sums = unsafe { products::<R>(ws, xs) };
        for (a, row) in sums.iter().enumerate() {
            dst[a * m + first..a * m + first + R].copy_from_slice(row);
        }
    }

    /// `[[x · w for x in xs] for w in ws]`, every row `k` long, summed as [`super::dots`] sums.
    #[target_feature(enable = "avx512f")]
    unsafe fn products<const R: usize>(
        ws: [&[f32]; TILE_ROWS],
        xs: [&[f32]; R],
    ) -> [[f32; R]; TILE_ROWS] {
        const STEP: usize = 16;
        let k = ws[0].len();
        let whole = k / STEP * STEP;
        let mut acc = [[_mm512_setzero_ps(); R]; TILE_ROWS];
        let mut c = 0;
        while c < whole {
            let mut wv = [_mm512_setzero_ps(); TILE_ROWS];
            for (v, w) in wv.iter_mut().zip(&ws) {
                // The same line of the next tile's rows (a hint, never dereferenced).
                _mm_prefetch(
                    w.as_ptr().wrapping_add(c + TILE_ROWS * k) as *const i8,
                    _MM_HINT_T0,
                );
                // SAFETY: `c + 16 <= whole <= k`, the row's length.
                *v = unsafe { _mm512_loadu_ps(w.as_ptr().add(c)) };
            }
            for r in 0..R {
                // SAFETY: as above, every input row is `k` long.
                let xv = unsafe { _mm512_loadu_ps(xs[r].as_ptr().add(c)) };
                for a in 0..TILE_ROWS {
                    acc[a][r] = _mm512_fmadd_ps(xv, wv[a], acc[a][r]);
                }
            }
            c += STEP;
        }
        let mut out = [[0f32; R]; TILE_ROWS];
        for a in 0..TILE_ROWS {
            for r in 0..R {
                let z = acc[a][r];
                // Lanes 0-7 and 8-15: `dots`' two accumulators, added as it adds them.
                let lo = _mm512_castps512_ps256(z);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1));
                out[a][r] = super::finish(_mm256_add_ps(lo, hi), &xs[r][whole..k], &ws[a][whole..]);
            }
        }
        out
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
            out[r] = finish(
                _mm256_add_ps(acc0[r], acc1[r]),
                &xs[r][whole..k],
                &w[whole..],
            );
        }
    }
    out
}

/// A dot product's end: the 8 lanes of `v` added up (halves, then pairs, then the last two, in
/// that order), then the tail `x · w` beyond the vector steps, element by element. [`dots`] and
/// the AVX-512 tiles both end here, which is what keeps their sums bit for bit equal.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
fn finish(v: std::arch::x86_64::__m256, x: &[f32], w: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: register arithmetic only; avx2 is enabled at compile time (the cfg above).
    let mut sum = unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    };
    for (a, b) in x.iter().zip(w) {
        sum = a.mul_add(*b, sum);
    }
    sum
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

/// Codes per block of a quantised row.
pub(crate) const QBLOCK: usize = 32;

/// A row of `QBLOCK`-wide blocks of 8-bit codes, each block with its scale (`v ≈ scale · code`).
#[derive(Clone, Copy)]
pub(crate) struct QRow<'a> {
    pub(crate) codes: &'a [i8],
    pub(crate) scales: &'a [f32],
}

/// `dst[i] = x_i · w` for quantised rows: `x` holds `dst.len()` rows laid end to end (codes and
/// scales), four at a time sharing each load of `w`. Codes must lie in -127..=127.
pub(crate) fn dots_i8_rows(w: QRow<'_>, x: QRow<'_>, dst: &mut [f32]) {
    let (k, nb) = (w.codes.len(), w.scales.len());
    assert!(
        nb * QBLOCK == k && x.codes.len() >= dst.len() * k && x.scales.len() >= dst.len() * nb,
        "dots_i8_rows: rows do not match their blocks"
    );
    let row = |i: usize| QRow {
        codes: &x.codes[i * k..(i + 1) * k],
        scales: &x.scales[i * nb..(i + 1) * nb],
    };
    let mut i = 0;
    while dst.len() - i >= 4 {
        let d = dots_i8([row(i), row(i + 1), row(i + 2), row(i + 3)], w);
        dst[i..i + 4].copy_from_slice(&d);
        i += 4;
    }
    match dst.len() - i {
        3 => dst[i..].copy_from_slice(&dots_i8([row(i), row(i + 1), row(i + 2)], w)),
        2 => dst[i..].copy_from_slice(&dots_i8([row(i), row(i + 1)], w)),
        1 => dst[i] = dots_i8([row(i)], w)[0],
        _ => {}
    }
}

/// `[x · w for x in xs]` over blocks: per block, `|w|` times `x` with `w`'s signs as byte pairs
/// summed to 16 bits (`maddubs`, at most 2·127·127, no saturation), then to 32 bits, then one
/// float multiply-add by the two blocks' scales. Prefetches the codes after `w`.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dots_i8<const R: usize>(xs: [QRow<'_>; R], w: QRow<'_>) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = w.codes.len();
    let mut out = [0f32; R];
    // SAFETY: every load reads 32 codes of block `b < scales.len()` of a row of
    // `scales.len() * QBLOCK` codes (checked by `dots_i8_rows`, the only caller); avx2 + fma are
    // enabled at compile time (the cfg above).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, ws) in w.scales.iter().enumerate() {
            let at = b * QBLOCK;
            _mm_prefetch(w.codes.as_ptr().wrapping_add(at + k), _MM_HINT_T0);
            let wv = _mm256_loadu_si256(w.codes.as_ptr().add(at) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            for r in 0..R {
                let xv = _mm256_loadu_si256(xs[r].codes.as_ptr().add(at) as *const __m256i);
                let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(ws * xs[r].scales[b]), acc[r]);
            }
        }
        for r in 0..R {
            out[r] = finish(acc[r], &[], &[]);
        }
    }
    out
}

/// `[x · w for x in xs]` over blocks without AVX2.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn dots_i8<const R: usize>(xs: [QRow<'_>; R], w: QRow<'_>) -> [f32; R] {
    let mut out = [0f32; R];
    for (o, x) in out.iter_mut().zip(xs) {
        for (b, ws) in w.scales.iter().enumerate() {
            let at = b * QBLOCK;
            let sum: i32 = w.codes[at..at + QBLOCK]
                .iter()
                .zip(&x.codes[at..at + QBLOCK])
                .map(|(a, c)| *a as i32 * *c as i32)
                .sum();
            *o += sum as f32 * ws * x.scales[b];
        }
    }
    out
}

/// Widen packed 4-bit codes to bytes: in each block's 16 bytes of `packed`, byte `i` holds code
/// `i` in its low half and code `i + 16` in its high half, each stored plus 8; `out` gets the
/// block's 32 codes in order, in -8..=7.
pub(crate) fn unpack_nibbles(packed: &[u8], out: &mut [i8]) {
    assert_eq!(out.len(), packed.len() * 2, "unpack_nibbles: output length");
    unpack_nibbles_impl(packed, out);
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn unpack_nibbles_impl(packed: &[u8], out: &mut [i8]) {
    use std::arch::x86_64::*;
    let half = QBLOCK / 2;
    // SAFETY: block `b` reads 16 bytes at `b * 16` of `packed` and writes 32 at `b * 32` of `out`,
    // in bounds for `b < packed.len() / 16` (`out` is twice as long, asserted by the caller);
    // avx2 is enabled at compile time (the cfg above).
    unsafe {
        let low = _mm_set1_epi8(0x0f);
        let eight = _mm256_set1_epi8(8);
        for b in 0..packed.len() / half {
            // The next row's codes (a hint, never dereferenced).
            let ahead = packed.as_ptr().wrapping_add(b * half + packed.len());
            _mm_prefetch(ahead as *const i8, _MM_HINT_T0);
            let v = _mm_loadu_si128(packed.as_ptr().add(b * half) as *const __m128i);
            let lo = _mm_and_si128(v, low);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
            let codes = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);
            _mm256_storeu_si256(out.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, codes);
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn unpack_nibbles_impl(packed: &[u8], out: &mut [i8]) {
    for (block, dst) in packed
        .chunks_exact(QBLOCK / 2)
        .zip(out.chunks_exact_mut(QBLOCK))
    {
        for (i, byte) in block.iter().enumerate() {
            dst[i] = (byte & 15) as i8 - 8;
            dst[i + QBLOCK / 2] = (byte >> 4) as i8 - 8;
        }
    }
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
                    assert!((dots([row], &w)[0] as f64 - want).abs() < 1e-4, "k={k}");
                }
            }
        }
    }

    /// Tiles give every product bit for bit as `dots_rows` does, for weight-row counts below and
    /// at the tile, input-row counts with every remainder of four, and lengths off the step.
    #[test]
    fn tiles_equal_row_by_row_products() {
        let mut rng = Rng::new(7);
        for k in [15, 16, 40, 576] {
            for n in 1..=TILE_ROWS {
                for m in 1..=9 {
                    let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() - 0.5).collect();
                    let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
                    let ws: Vec<&[f32]> = w.chunks_exact(k).collect();
                    let mut got = vec![0f32; n * m];
                    dots_tile(&ws, &x, m, &mut got);
                    let mut want = vec![0f32; n * m];
                    for (a, row) in ws.iter().enumerate() {
                        dots_rows(row, &x, &mut want[a * m..(a + 1) * m]);
                    }
                    assert_eq!(got, want, "k={k} n={n} m={m}");
                }
            }
        }
    }

    #[test]
    fn nibbles_unpack_in_block_order() {
        let packed: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37)).collect();
        let mut out = vec![0i8; 64];
        unpack_nibbles(&packed, &mut out);
        for (b, block) in packed.chunks(16).enumerate() {
            for (i, byte) in block.iter().enumerate() {
                assert_eq!(out[b * 32 + i], (byte & 15) as i8 - 8);
                assert_eq!(out[b * 32 + i + 16], (byte >> 4) as i8 - 8);
            }
        }
    }

    /// Quantised rows against the exact sum of their decoded values, every remainder of four.
    #[test]
    fn quantised_dot_products_match_a_plain_sum() {
        let mut rng = Rng::new(6);
        let code = |rng: &mut Rng| ((rng.uniform() - 0.5) * 254.0).round() as i8;
        for nb in [1, 3, 18] {
            let k = nb * QBLOCK;
            for m in 1..=9 {
                let wc: Vec<i8> = (0..k).map(|_| code(&mut rng)).collect();
                let ws: Vec<f32> = (0..nb).map(|_| rng.uniform()).collect();
                let xc: Vec<i8> = (0..m * k).map(|_| code(&mut rng)).collect();
                let xs: Vec<f32> = (0..m * nb).map(|_| rng.uniform()).collect();
                let mut got = vec![0f32; m];
                let w = QRow {
                    codes: &wc,
                    scales: &ws,
                };
                dots_i8_rows(
                    w,
                    QRow {
                        codes: &xc,
                        scales: &xs,
                    },
                    &mut got,
                );
                for (i, g) in got.iter().enumerate() {
                    let want: f64 = (0..k)
                        .map(|c| {
                            let b = c / QBLOCK;
                            wc[c] as f64
                                * ws[b] as f64
                                * xc[i * k + c] as f64
                                * xs[i * nb + b] as f64
                        })
                        .sum();
                    assert!(
                        (*g as f64 - want).abs() < 1e-3 * want.abs().max(1.0),
                        "nb={nb} m={m}"
                    );
                }
            }
        }
    }
}
