//! Blockwise quantised weights for serving (`generate.isq = "q8_0"` or `"q4_0"` on the native
//! engine), the layouts of GGML's Q8_0 and Q4_0 with an f32 scale: each run of 32 weights of a row
//! keeps one scale and 32 codes, `w ≈ scale · code`; 8-bit codes in -127..=127 (`scale = max|w| /
//! 127`), or 4-bit codes in -8..=7 packed two to a byte (`scale = -m / 8` for the block's `m` of
//! largest magnitude, so `m` itself is exact). A decode step reads 1.125 or 0.625 bytes per weight
//! instead of 4, which is what bounds decoding on a CPU.
//!
//! A few input rows (decode steps) are quantised to 8-bit blocks themselves and multiplied with
//! integer multiply-adds ([`simd::dots_i8_rows`]), one weight row at a time, 4-bit rows widened to
//! bytes once for all input rows. Prompt chunks (more rows) are quantised to 16-bit blocks and
//! multiplied in panels of 16 weight rows by AVX-512 VNNI ([`super::qgemm`]) where the CPU has it,
//! and otherwise dequantise the matrix for one f32 product. Serving only: training keeps f32
//! weights (gradients flow through them).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::simd::{self, QBLOCK as BLOCK, QRow};

/// How a [`QMatrix`] codes its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 8-bit codes.
    Q8_0,
    /// 4-bit codes.
    Q4_0,
}

/// The codes of a matrix, row-major.
#[derive(Debug)]
enum Codes {
    /// One per weight.
    I8(Vec<i8>),
    /// Two per byte: in each block's 16 bytes, byte `i` holds code `i` in its low half and code
    /// `i + 16` in its high half, each stored plus 8.
    Nibbles(Vec<u8>),
}

/// A `(rows, cols)` matrix in blocks of 32 along each row.
#[derive(Debug)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 32`, row-major.
    scales: Vec<f32>,
    codes: Codes,
}

impl QMatrix {
    /// Quantise a row-major f32 matrix whose rows are a multiple of 32 long.
    pub fn quantize(w: &Tensor, format: QFormat) -> candle_core::Result<QMatrix> {
        let (rows, cols) = w.dims2()?;
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!(
                "{format:?} needs rows of a multiple of {BLOCK} weights, not {cols}"
            );
        }
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let mut scales = vec![0f32; rows * cols / BLOCK];
        let codes = match format {
            QFormat::Q8_0 => {
                let mut q = vec![0i8; rows * cols];
                scales
                    .par_iter_mut()
                    .zip(q.par_chunks_mut(BLOCK))
                    .zip(data.par_chunks(BLOCK))
                    .for_each(|((scale, qs), ws)| *scale = quantize_block(ws, 127.0, qs));
                Codes::I8(q)
            }
            QFormat::Q4_0 => {
                let mut q = vec![0u8; rows * cols / 2];
                scales
                    .par_iter_mut()
                    .zip(q.par_chunks_mut(BLOCK / 2))
                    .zip(data.par_chunks(BLOCK))
                    .for_each(|((scale, packed), ws)| {
                        let mut qs = [0i8; BLOCK];
                        *scale = quantize_block(ws, -8.0, &mut qs);
                        for (i, p) in packed.iter_mut().enumerate() {
                            *p = (qs[i] + 8) as u8 | (((qs[i + 16] + 8) as u8) << 4);
                        }
                    });
                Codes::Nibbles(q)
            }
        };
        Ok(QMatrix {
            rows,
            cols,
            scales,
            codes,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let codes = match &self.codes {
            Codes::I8(q) => q.len(),
            Codes::Nibbles(q) => q.len(),
        };
        codes + 4 * self.scales.len()
    }

    /// Row `j`'s scales, one per block.
    pub(super) fn row_scales(&self, j: usize) -> &[f32] {
        let nb = self.cols / BLOCK;
        &self.scales[j * nb..(j + 1) * nb]
    }

    /// Row `j`'s codes, widened to bytes in `scratch` when they are packed.
    pub(super) fn row_codes<'a>(&'a self, j: usize, scratch: &'a mut Vec<i8>) -> &'a [i8] {
        let k = self.cols;
        match &self.codes {
            Codes::I8(q) => &q[j * k..(j + 1) * k],
            Codes::Nibbles(q) => {
                scratch.resize(k, 0);
                simd::unpack_nibbles(&q[j * k / 2..(j + 1) * k / 2], scratch);
                scratch
            }
        }
    }

    /// The matrix as f32 `(rows, cols)`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        let k = self.cols;
        let mut out = vec![0f32; self.rows * k];
        // One widening buffer per task, not one per row (prompt chunks dequantise every row).
        out.par_chunks_mut(k)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (j, row)| {
                let codes = self.row_codes(j, scratch);
                let scales = &self.scales[j * k / BLOCK..(j + 1) * k / BLOCK];
                for ((d, q), s) in row.chunks_mut(BLOCK).zip(codes.chunks(BLOCK)).zip(scales) {
                    for (o, v) in d.iter_mut().zip(q) {
                        *o = *v as f32 * s;
                    }
                }
            });
        Tensor::from_vec(out, (self.rows, k), device)
    }

    /// `x·Wᵀ` for `x` `(m, cols)`: on the CPU a few rows quantised and multiplied straight from
    /// the codes, more too where the CPU has AVX-512 VNNI ([`super::qgemm`]); otherwise through a
    /// dequantised matrix product.
    pub fn linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!(
                "quantised linear: input has {k} columns, weight {}",
                self.cols
            );
        }
        if !x.device().is_cpu() || !from_codes(m) {
            return x.matmul(&self.dequantize(x.device())?.t()?);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let out = stacked(&[self], &xs, m);
        Tensor::from_vec(out, (m, self.rows), x.device())
    }
}

/// Whether [`stacked`] multiplies `m` input rows on this CPU: a few rows always, more where
/// [`super::qgemm`] runs; otherwise the caller dequantises.
pub(crate) fn from_codes(m: usize) -> bool {
    m <= super::ops::FEW_ROWS || super::qgemm::available()
}

/// `x·Wᵢᵀ` on the CPU for `x` `(m, cols)` (row-major f32) and matrices of `cols` columns read by
/// the same rows, as if stacked into one, `(m, Σ rows)`: a few rows through
/// [`few_rows_stacked`], more through [`super::qgemm`] (the caller checks [`from_codes`]).
pub(crate) fn stacked(mats: &[&QMatrix], x: &[f32], m: usize) -> Vec<f32> {
    if m > super::ops::FEW_ROWS {
        super::qgemm::stacked(mats, x, m)
    } else {
        few_rows_stacked(mats, x, m)
    }
}

/// `x·Wᵢᵀ` for a few rows `x` `(m, cols)` (row-major f32) and matrices of `cols` columns read by
/// the same rows, as if stacked into one: `x` quantised to 8-bit blocks once, one parallel pass
/// over all the matrices' rows; `(m, Σ rows)`.
pub(crate) fn few_rows_stacked(mats: &[&QMatrix], x: &[f32], m: usize) -> Vec<f32> {
    let k = mats[0].cols;
    debug_assert!(mats.iter().all(|q| q.cols == k) && x.len() == m * k);
    let mut x_codes = vec![0i8; m * k];
    let x_scales: Vec<f32> = x
        .chunks_exact(BLOCK)
        .zip(x_codes.chunks_exact_mut(BLOCK))
        .map(|(v, q)| quantize_block(v, 127.0, q))
        .collect();
    let xq = QRow {
        codes: &x_codes,
        scales: &x_scales,
    };
    let stack = super::ops::Stacked::new(mats.iter().map(|q| q.rows));
    super::ops::by_weight_rows(m, stack.rows(), |j, dst, scratch: &mut Vec<i8>| {
        let (i, r) = stack.locate(j);
        let q = mats[i];
        let w = QRow {
            codes: q.row_codes(r, scratch),
            scales: &q.scales[r * k / BLOCK..(r + 1) * k / BLOCK],
        };
        simd::dots_i8_rows(w, xq, dst);
    })
}

/// Quantise one block `ws` into `qs` and return its scale: the value of largest magnitude maps
/// to code `top` (127 for 8 bits; -8 for 4 bits, whose codes run -8..=7), the rest round to the
/// nearest code within range.
fn quantize_block(ws: &[f32], top: f32, qs: &mut [i8]) -> f32 {
    let m = ws
        .iter()
        .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
    let scale = if top > 0.0 { m.abs() / top } else { m / top };
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let (lo, hi) = if top > 0.0 {
        (-top, top)
    } else {
        (top, -top - 1.0)
    };
    for (d, v) in qs.iter_mut().zip(ws) {
        *d = (v * inv).round().clamp(lo, hi) as i8;
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn max_gap(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Both formats: dequantising stays within half a step of each block's scale (and keeps each
    /// block's largest weight exact), and products for a few rows (the integer kernel, which
    /// also quantises its input) and many (the chunk kernel, or the dequantised product without
    /// it) stay near the f32 product.
    #[test]
    fn quantised_products_are_close_to_f32() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(4);
        let (n, k) = (70, 96);
        let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() - 0.5).collect();
        let wt = Tensor::from_vec(w.clone(), (n, k), &dev)?;
        // (format, bytes per weight times 32, largest dequantisation error, product error)
        for (format, bytes32, step, tolerance) in [
            (QFormat::Q8_0, 32 + 4, 0.5 / 127.0, 0.08),
            (QFormat::Q4_0, 16 + 4, 0.5 / 8.0, 0.4),
        ] {
            let q = QMatrix::quantize(&wt, format)?;
            assert_eq!(q.bytes(), n * k / BLOCK * bytes32, "{format:?}");
            let back = q.dequantize(&dev)?;
            assert!(max_gap(&back, &wt)? <= step + 1e-6, "{format:?}");
            let back_v = back.flatten_all()?.to_vec1::<f32>()?;
            for (b, block) in w.chunks(BLOCK).enumerate() {
                let (i, _) = block
                    .iter()
                    .enumerate()
                    .fold((0, 0f32), |(bi, bm), (i, v)| {
                        if v.abs() > bm { (i, v.abs()) } else { (bi, bm) }
                    });
                assert!(
                    (back_v[b * BLOCK + i] - block[i]).abs() < 1e-6,
                    "{format:?}"
                );
            }
            for m in [1, 2, 5, 8, 40] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
                let xt = Tensor::from_vec(x, (m, k), &dev)?;
                let exact = xt.matmul(&wt.t()?)?;
                let ours = q.linear(&xt)?;
                let err = max_gap(&ours, &exact)?;
                assert!(err < tolerance, "{format:?} m={m}: {err}");
                if m > crate::llama::ops::FEW_ROWS && !crate::llama::qgemm::available() {
                    let via_back = xt.matmul(&back.t()?)?;
                    assert!(max_gap(&ours, &via_back)? < 1e-4, "{format:?} m={m}");
                }
            }
            let bad = Tensor::zeros((2, 33), candle_core::DType::F32, &dev)?;
            assert!(QMatrix::quantize(&bad, format).is_err());
        }
        Ok(())
    }
}
