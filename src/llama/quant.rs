//! Blockwise 8-bit weights for serving (`generate.isq = "q8_0"` on the native engine): each run of
//! 32 weights of a row keeps one f32 scale and 32 signed bytes (`w ≈ scale · q`, `scale =
//! max|w| / 127`), the layout of GGML's Q8_0 with an f32 scale. A decode step reads 1.125 bytes per
//! weight instead of 4, which is what bounds decoding on a CPU; rows are multiplied straight from
//! the bytes. Prompt chunks (more than a few rows) dequantise the matrix for one product.
//!
//! Serving only: training keeps f32 weights (gradients flow through them).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// Weights per block.
pub const BLOCK: usize = 32;

/// A `(rows, cols)` matrix in blocks of [`BLOCK`] along each row.
#[derive(Debug)]
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / BLOCK`, row-major.
    scales: Vec<f32>,
    /// `rows * cols`, row-major.
    q: Vec<i8>,
}

impl Q8Matrix {
    /// Quantise a row-major f32 matrix whose rows are a multiple of [`BLOCK`] long.
    pub fn quantize(w: &Tensor) -> candle_core::Result<Q8Matrix> {
        let (rows, cols) = w.dims2()?;
        if !cols.is_multiple_of(BLOCK) {
            candle_core::bail!("q8_0 needs rows of a multiple of {BLOCK} weights, not {cols}");
        }
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let blocks = rows * cols / BLOCK;
        let mut scales = vec![0f32; blocks];
        let mut q = vec![0i8; rows * cols];
        scales
            .par_iter_mut()
            .zip(q.par_chunks_mut(BLOCK))
            .zip(data.par_chunks(BLOCK))
            .for_each(|((scale, qs), ws)| {
                let max = ws.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = max / 127.0;
                let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                for (d, v) in qs.iter_mut().zip(ws) {
                    *d = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            });
        Ok(Q8Matrix {
            rows,
            cols,
            scales,
            q,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// The matrix as f32 `(rows, cols)`.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(BLOCK)
            .zip(self.q.par_chunks(BLOCK))
            .zip(self.scales.par_iter())
            .for_each(|((d, qs), s)| {
                for (o, v) in d.iter_mut().zip(qs) {
                    *o = *v as f32 * s;
                }
            });
        Tensor::from_vec(out, (self.rows, self.cols), device)
    }

    /// `x·Wᵀ` for `x` `(m, cols)` on the CPU: a few rows straight from the bytes, more through a
    /// dequantised matrix product.
    pub fn linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!("q8_0 linear: input has {k} columns, weight {}", self.cols);
        }
        if m > super::ops::FEW_ROWS || !x.device().is_cpu() {
            return x.matmul(&self.dequantize(x.device())?.t()?);
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let n = self.rows;
        let out = super::ops::by_weight_rows(m, n, |j, dst, row| {
            let q = &self.q[j * k..(j + 1) * k];
            let s = &self.scales[j * k / BLOCK..(j + 1) * k / BLOCK];
            if m == 1 {
                dst[0] = dot_q8(&xs, q, s);
            } else {
                // Several rows: widen the weight row once, then share it.
                dequantize_row(q, s, row);
                super::simd::dots_rows(row, &xs, dst);
            }
        });
        Tensor::from_vec(out, (m, n), x.device())
    }
}

/// One row's weights as f32 into `out`.
fn dequantize_row(q: &[i8], scales: &[f32], out: &mut Vec<f32>) {
    out.clear();
    for (qb, s) in q.chunks_exact(BLOCK).zip(scales) {
        out.extend(qb.iter().map(|v| *v as f32 * s));
    }
}

/// `Σ x·(scale·q)` over one row, block by block, in 32 independent lanes (vectorised by the
/// compiler: bytes widened to f32, scaled, fused multiply-add).
fn dot_q8(x: &[f32], q: &[i8], scales: &[f32]) -> f32 {
    let mut acc = [0f32; BLOCK];
    for ((xb, qb), s) in x.chunks_exact(BLOCK).zip(q.chunks_exact(BLOCK)).zip(scales) {
        for l in 0..BLOCK {
            acc[l] = (qb[l] as f32 * s).mul_add(xb[l], acc[l]);
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Quantised products stay within the rounding error of 8 bits, for a few rows (the byte
    /// kernel) and many (the dequantised product), and dequantising reproduces the weights.
    #[test]
    fn q8_products_are_close_to_f32() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(4);
        let (n, k) = (70, 96);
        let w: Vec<f32> = (0..n * k).map(|_| rng.uniform() - 0.5).collect();
        let wt = Tensor::from_vec(w, (n, k), &dev)?;
        let q = Q8Matrix::quantize(&wt)?;
        assert_eq!(q.bytes(), n * k + 4 * n * k / BLOCK);
        let back = q.dequantize(&dev)?;
        let err = (&back - &wt)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err <= 0.5 / 127.0 + 1e-6, "{err}");
        for m in [1, 2, 5, 8, 40] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() - 0.5).collect();
            let xt = Tensor::from_vec(x, (m, k), &dev)?;
            let exact = xt.matmul(&wt.t()?)?;
            let ours = q.linear(&xt)?;
            let via_back = xt.matmul(&back.t()?)?;
            let gap = (&ours - &via_back)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(gap < 1e-4, "m={m}: {gap}");
            let err = (&ours - &exact)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 0.05, "m={m}: {err}");
        }
        assert!(
            Q8Matrix::quantize(&Tensor::zeros((2, 33), candle_core::DType::F32, &dev)?).is_err()
        );
        Ok(())
    }
}
