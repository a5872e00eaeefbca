//! One optimiser step's gradients: each sequence's loss and the gradients of the adapter's
//! variables, the batch's sequences spread over worker threads and summed.
//!
//! Two ways through a sequence, the same gradients: plain backpropagation keeps every
//! activation of every layer until the backward pass (with attention's `heads × T × T`
//! probabilities in every layer: ~1.8 GB a 1,300-token sequence on SmolLM2-135M, growing with
//! `T²`); layer checkpointing keeps only each
//! layer's input, and in the backward pass recomputes one layer at a time, with the dropout
//! masks it drew the first time, backpropagating the gradient of its output into its input and
//! the adapter's variables (the memory of one layer, for one more forward pass).
//!
//! Validation losses run the layers without keeping any graph.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::Example;
use super::model::LlamaLora;
use crate::rng::Rng;

/// Summed gradients per variable (in the order of the variables; `None`: none reached it) and
/// each sequence's loss.
pub(crate) type BatchGrads = (Vec<Option<Tensor>>, Vec<f32>);

/// What a training step backpropagates through.
pub(crate) struct Backprop<'a> {
    pub model: &'a LlamaLora,
    pub vars: &'a [Var],
    pub examples: &'a [Example],
    pub seed: u64,
    /// Layer checkpointing instead of plain backpropagation.
    pub checkpoint: bool,
}

impl Backprop<'_> {
    /// Gradients of the mean loss over the examples `chunk` indexes (step `step`), its sequences
    /// spread over `workers` threads (each sequence's own forward and backward; the matrix kernels
    /// share the rayon pool).
    pub(crate) fn batch(
        &self,
        chunk: &[usize],
        workers: usize,
        step: usize,
    ) -> candle_core::Result<BatchGrads> {
        let workers = workers.clamp(1, chunk.len());
        let per = chunk.len().div_ceil(workers);
        let n = chunk.len() as f64;
        let results: Vec<candle_core::Result<BatchGrads>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .chunks(per)
                .enumerate()
                .map(|(w, part)| {
                    scope.spawn(move || {
                        let mut acc = vec![None; self.vars.len()];
                        let mut losses = Vec::new();
                        for (j, &i) in part.iter().enumerate() {
                            // Dropout masks depend on (seed, step, position in batch) only, not
                            // on how the batch is split over threads.
                            let mut rng = Rng::new(
                                self.seed
                                    ^ ((step as u64) << 20)
                                    ^ ((w * per + j) as u64 + 1).wrapping_mul(0x9E37),
                            );
                            let (loss, grads) = self.sequence(&self.examples[i], &mut rng, n)?;
                            losses.push(loss);
                            add_all(&mut acc, grads)?;
                        }
                        Ok((acc, losses))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a training worker panicked"))
                .collect()
        });
        let mut acc = vec![None; self.vars.len()];
        let mut losses = Vec::new();
        for result in results {
            let (grads, worker_losses) = result?;
            add_all(&mut acc, grads)?;
            losses.extend(worker_losses);
        }
        Ok((acc, losses))
    }

    /// The loss of one sequence and the gradients of `loss / n`.
    fn sequence(
        &self,
        ex: &Example,
        rng: &mut Rng,
        n: f64,
    ) -> candle_core::Result<(f32, Vec<Option<Tensor>>)> {
        if self.checkpoint {
            return self.checkpointed(ex, rng, n);
        }
        let loss = self.model.loss(&ex.ids, &ex.positions, Some(rng))?;
        let value = loss.to_scalar::<f32>()?;
        let grads = (loss / n)?.backward()?;
        Ok((value, self.of_vars(&grads)))
    }

    /// [`Backprop::sequence`] with layer checkpointing (the module doc).
    fn checkpointed(
        &self,
        ex: &Example,
        rng: &mut Rng,
        n: f64,
    ) -> candle_core::Result<(f32, Vec<Option<Tensor>>)> {
        let model = self.model;
        let input = model.sequence_input(&ex.ids)?;
        let rope = model.rope(&input)?;
        // Forward: each layer's input, without its graph, and the dropout stream before it.
        let mut kept = Vec::with_capacity(model.layers());
        let mut h = input.embedded.detach();
        for l in 0..model.layers() {
            kept.push((h.clone(), rng.clone()));
            h = model.layer(l, &h, &rope, &input, Some(rng))?.detach();
        }
        let top = Var::from_tensor(&h)?;
        let loss = model.head_loss(top.as_tensor(), &input, &ex.ids, &ex.positions)?;
        let value = loss.to_scalar::<f32>()?;
        let (mut acc, mut upstream) = {
            let grads = (loss / n)?.backward()?;
            (self.of_vars(&grads), gradient(&grads, &top)?)
        };
        // Backward, a layer at a time: the layer again from its input, then the gradient of its
        // output (`upstream`) into its input and the variables.
        for (l, (x, mut layer_rng)) in kept.into_iter().enumerate().rev() {
            let leaf = Var::from_tensor(&x)?;
            // The first layer reads the embeddings themselves: prompt tuning's table is in them.
            let x = if l == 0 {
                input.embedded.clone()
            } else {
                leaf.as_tensor().clone()
            };
            let y = model.layer(l, &x, &rope, &input, Some(&mut layer_rng))?;
            let grads = (y * &upstream)?.sum_all()?.backward()?;
            add_all(&mut acc, self.of_vars(&grads))?;
            if l > 0 {
                upstream = gradient(&grads, &leaf)?;
            }
        }
        Ok((value, acc))
    }

    /// The gradients of the variables in `grads`.
    fn of_vars(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect()
    }
}

/// One sequence's loss and the gradients of [`LlamaLora::vars`] (in that order), as a training
/// step computes them: with dropout masks drawn from `seed`, by plain backpropagation or with
/// layer checkpointing.
pub fn sequence_gradients(
    model: &LlamaLora,
    ex: &Example,
    seed: u64,
    checkpoint: bool,
) -> candle_core::Result<(f32, Vec<Option<Tensor>>)> {
    let vars = model.vars();
    let backprop = Backprop {
        model,
        vars: &vars,
        examples: &[],
        seed,
        checkpoint,
    };
    backprop.sequence(ex, &mut Rng::new(seed), 1.0)
}

/// The mean loss over `examples` without dropout, each layer's graph dropped as soon as the next
/// layer has read its output (validation: nothing is backpropagated).
pub(crate) fn mean_loss(model: &LlamaLora, examples: &[Example]) -> candle_core::Result<f32> {
    let mut sum = 0.0;
    for ex in examples {
        let input = model.sequence_input(&ex.ids)?;
        let rope = model.rope(&input)?;
        let mut h = input.embedded.detach();
        for l in 0..model.layers() {
            h = model.layer(l, &h, &rope, &input, None)?.detach();
        }
        sum += model
            .head_loss(&h, &input, &ex.ids, &ex.positions)?
            .detach()
            .to_scalar::<f32>()?;
    }
    Ok(sum / examples.len().max(1) as f32)
}

/// `var`'s gradient in `grads` (zeros when nothing reached it), without a graph of its own.
fn gradient(grads: &GradStore, var: &Var) -> candle_core::Result<Tensor> {
    match grads.get(var.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => var.zeros_like(),
    }
}

/// `acc[i] += grads[i]` where there is a gradient.
fn add_all(acc: &mut [Option<Tensor>], grads: Vec<Option<Tensor>>) -> candle_core::Result<()> {
    for (slot, g) in acc.iter_mut().zip(grads) {
        if let Some(g) = g {
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    Ok(())
}
