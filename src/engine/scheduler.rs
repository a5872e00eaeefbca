//! The scheduler thread: admits queued requests under the KV budget, runs one forward step over
//! every running sequence (decode rows and prompt chunks), samples, streams and finishes them, and
//! drops those whose receiver is gone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use super::step::{KvCache, Segment, StepHooks};
use super::{
    ChatTokenizer, Detokenizer, EngineLimits, GenEvent, GenRequest, Queued, ResidentAdapter,
    Shared, sample,
};
use crate::llama::Weights;
use crate::rng::Rng;

/// A running request.
struct Sequence {
    request: GenRequest,
    events: mpsc::UnboundedSender<GenEvent>,
    cache: KvCache,
    /// Prompt tokens in the cache so far.
    read: usize,
    generated: Vec<u32>,
    detok: Detokenizer,
    rng: Rng,
    /// How it ended (a `Done` or `Error` event), sent once the scheduler has counted it, so a
    /// client that sees its answer end also sees it in the engine's counters.
    outcome: Option<GenEvent>,
}

impl Sequence {
    fn adapter_name(&self) -> &str {
        self.request
            .adapter
            .as_ref()
            .map_or("", |a| a.name.as_str())
    }

    fn reserved(&self) -> usize {
        self.request.kv_tokens()
    }

    /// The rows this sequence feeds the next step (`limit` rows at most for a prompt), and the
    /// position of the first: the next free place of its cache (its adapter's virtual tokens,
    /// if any, hold the first places).
    fn next_rows(&self, limit: usize) -> (Vec<u32>, usize) {
        let prompt = &self.request.prompt;
        let rows = if self.read < prompt.len() {
            let n = (prompt.len() - self.read).min(limit);
            prompt[self.read..self.read + n].to_vec()
        } else {
            vec![*self.generated.last().unwrap_or(&0)]
        };
        (rows, self.cache.len())
    }

    fn done(&self) -> bool {
        self.outcome.is_some()
    }

    fn finish(&mut self, reason: &str) {
        self.outcome = Some(GenEvent::Done {
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.generated.len(),
            finish_reason: reason.to_string(),
        });
    }

    /// Send how it ended.
    fn end(mut self) {
        if let Some(event) = self.outcome.take() {
            let _ = self.events.send(event);
        }
    }

    /// Take the sampled `token`: stream its text, or stop.
    fn accept(&mut self, token: u32, chat: &ChatTokenizer) {
        self.generated.push(token);
        if token == chat.end_of_turn() {
            // Counted as generated (as mistral.rs and OpenAI count it), never shown.
            self.flush(chat);
            self.finish("stop");
            return;
        }
        match self.detok.push(chat, token) {
            Ok(Some(text)) => {
                let _ = self.events.send(GenEvent::Token(text));
            }
            Ok(None) => {}
            Err(e) => {
                self.fail(&e.to_string());
                return;
            }
        }
        if self.generated.len() >= self.request.max_tokens {
            self.flush(chat);
            self.finish("length");
        }
    }

    fn flush(&mut self, chat: &ChatTokenizer) {
        if let Ok(Some(text)) = self.detok.finish(chat) {
            let _ = self.events.send(GenEvent::Token(text));
        }
    }

    fn fail(&mut self, message: &str) {
        self.outcome = Some(GenEvent::Error(message.to_string()));
    }
}

/// The scheduler thread's state.
pub(super) struct Scheduler {
    weights: Arc<Weights>,
    chat: Arc<ChatTokenizer>,
    shared: Arc<Shared>,
    limits: EngineLimits,
    running: Vec<Sequence>,
}

impl Scheduler {
    pub(super) fn new(
        weights: Arc<Weights>,
        chat: Arc<ChatTokenizer>,
        shared: Arc<Shared>,
        limits: EngineLimits,
    ) -> Scheduler {
        Scheduler {
            weights,
            chat,
            shared,
            limits,
            running: Vec::new(),
        }
    }

    pub(super) fn run(mut self) {
        while let Some(admitted) = self.wait_and_admit() {
            for queued in admitted {
                self.start(queued);
            }
            let before = self.running.len();
            self.running.retain(|s| !s.events.is_closed());
            let cancelled = before - self.running.len();
            self.shared
                .counters
                .cancelled
                .fetch_add(cancelled as u64, Ordering::Relaxed);
            // The step runs on a worker of rayon's pool, where the ops' parallel loops start
            // without a hand-over: from this thread each of the ~300 loops of a decode step
            // would wake a worker and sleep until it finished.
            if !self.running.is_empty()
                && let Err(e) = rayon::scope(|_| self.step())
            {
                tracing::error!(error = %e, "generation step failed");
                for s in &mut self.running {
                    s.fail(&format!("generation failed: {e}"));
                }
            }
            let (ended, running) = std::mem::take(&mut self.running)
                .into_iter()
                .partition::<Vec<_>, _>(Sequence::done);
            self.running = running;
            let finished = ended.len();
            self.publish(finished as u64);
            ended.into_iter().for_each(Sequence::end);
            if finished + cancelled > 0 {
                // Hand the finished sequences' caches back to the kernel (see telemetry).
                crate::heap::release_freed_heap();
            }
        }
        for mut s in std::mem::take(&mut self.running) {
            s.fail("the engine has stopped");
            s.end();
        }
    }

    fn publish(&self, finished: u64) {
        let c = &self.shared.counters;
        c.finished.fetch_add(finished, Ordering::Relaxed);
        c.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        let reserved: usize = self.running.iter().map(Sequence::reserved).sum();
        c.kv_reserved.store(reserved as u64, Ordering::Relaxed);
    }

    /// Wait until there is work; take the waiting requests that fit the KV budget. `None` once
    /// the engine stops.
    fn wait_and_admit(&mut self) -> Option<Vec<Queued>> {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        while self.running.is_empty() && queue.waiting.is_empty() && !queue.stop {
            queue = self
                .shared
                .wake
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
        if queue.stop {
            for q in queue.waiting.drain(..) {
                let _ = q
                    .events
                    .send(GenEvent::Error("the engine has stopped".into()));
            }
            return None;
        }
        let mut reserved: usize = self.running.iter().map(Sequence::reserved).sum();
        let mut admitted = Vec::new();
        while let Some(next) = queue.waiting.front() {
            let need = next.request.kv_tokens();
            if reserved + need > self.limits.kv_budget_tokens {
                break;
            }
            reserved += need;
            admitted.extend(queue.waiting.pop_front());
        }
        Some(admitted)
    }

    fn start(&mut self, queued: Queued) {
        let Queued { request, events } = queued;
        if events.is_closed() {
            return;
        }
        let prefix = request.adapter.as_ref().and_then(|a| a.kv_prefix());
        match KvCache::new(
            &self.weights.config,
            request.kv_tokens(),
            prefix,
            &self.weights.device,
        ) {
            Ok(cache) => {
                let rng = Rng::new(request.seed);
                self.running.push(Sequence {
                    request,
                    events,
                    cache,
                    read: 0,
                    generated: Vec::new(),
                    detok: Detokenizer::default(),
                    rng,
                    outcome: None,
                });
            }
            Err(e) => {
                let _ = events.send(GenEvent::Error(format!(
                    "cannot allocate the KV cache: {e}"
                )));
            }
        }
    }

    /// One forward pass over every running sequence's next rows.
    fn step(&mut self) -> candle_core::Result<()> {
        // Sequences sharing an adapter sit together, so their rows form one group.
        self.running
            .sort_by(|a, b| a.adapter_name().cmp(b.adapter_name()));
        let decoding = self
            .running
            .iter()
            .filter(|s| s.read >= s.request.prompt.len())
            .count();
        let mut budget = self.limits.step_tokens.saturating_sub(decoding).max(1);
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        // (index in running, rows, whether the segment's last row is sampled)
        let mut plan = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            let prefill = s.read < s.request.prompt.len();
            if prefill && budget == 0 {
                continue;
            }
            let (rows, start) = s.next_rows(budget);
            if prefill {
                budget -= rows.len();
            }
            let first = ids.len();
            positions.extend((start..start + rows.len()).map(|p| p as u32));
            ids.extend_from_slice(&rows);
            let sampled = !prefill || s.read + rows.len() == s.request.prompt.len();
            plan.push((i, first..ids.len(), sampled));
        }
        let started = Instant::now();
        let hidden = {
            let mut groups: Vec<(std::ops::Range<usize>, Arc<ResidentAdapter>)> = Vec::new();
            for (i, rows, _) in &plan {
                let Some(adapter) = &self.running[*i].request.adapter else {
                    continue;
                };
                match groups.last_mut() {
                    Some((range, a)) if Arc::ptr_eq(a, adapter) && range.end == rows.start => {
                        range.end = rows.end;
                    }
                    _ => groups.push((rows.clone(), Arc::clone(adapter))),
                }
            }
            let mut segments = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, s) in self.running.iter_mut().enumerate() {
                if let Some((_, rows, _)) = planned.next_if(|(j, _, _)| *j == i) {
                    segments.push(Segment {
                        rows: rows.clone(),
                        cache: &mut s.cache,
                    });
                }
            }
            let mut hooks = StepHooks { segments, groups };
            self.weights.forward(&ids, &positions, &mut hooks)?
        };
        let sample_rows: Vec<u32> = plan
            .iter()
            .filter(|(_, _, sampled)| *sampled)
            .map(|(_, rows, _)| rows.end as u32 - 1)
            .collect();
        let logits = if sample_rows.is_empty() {
            Vec::new()
        } else {
            self.weights
                .logits_at(&hidden, &sample_rows)?
                .to_vec2::<f32>()?
        };
        let mut logits = logits.into_iter();
        for (i, rows, sampled) in plan {
            let s = &mut self.running[i];
            s.cache.advance(rows.len());
            if s.read < s.request.prompt.len() {
                s.read += rows.len();
            }
            if sampled && let Some(mut row) = logits.next() {
                let token = sample::next_token(
                    &mut row,
                    &s.generated,
                    &s.request.sampling,
                    self.chat.citation_vocab(),
                    &mut s.rng,
                );
                s.accept(token, &self.chat);
            }
        }
        let c = &self.shared.counters;
        c.steps.fetch_add(1, Ordering::Relaxed);
        c.step_rows.fetch_add(ids.len() as u64, Ordering::Relaxed);
        tracing::trace!(
            rows = ids.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        Ok(())
    }
}
