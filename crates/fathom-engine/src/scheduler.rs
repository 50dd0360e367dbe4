//! Continuous batching: one engine thread owns the model and runs a loop of steps. Each step packs
//! one row for every decoding sequence plus up to `prefill_chunk` prompt rows of sequences still
//! prefilling (chunked prefill: a long prompt advances a chunk per step, so running streams keep
//! getting a token every step) into a single forward pass ([`CausalLm::forward_packed`]), samples
//! each sequence's next token, and streams it out. New requests are admitted between steps.
//!
//! Bounded, never out of memory: at admission a sequence reserves KV memory for its whole budget
//! (prompt + max_tokens, buffers pre-sized), and admission waits while the reservations plus the
//! prefix cache would pass `max_kv_bytes` (the prefix cache is evicted first). At most `max_seqs`
//! run at once; at most `max_queue` wait, beyond which `submit` refuses. A request whose event
//! receiver is dropped (client gone) is freed at the next step.

use crate::generate::{FinishReason, TextStream};
use crate::prefix_cache::PrefixCache;
use crate::sampler::{token_logprobs, Sampler, SamplingParams};
use crate::speculative::{pick_draft, verify, Draft, Drafter};
use candle_core::Tensor;
use fathom_core::TextTokenizer;
use fathom_model::{packed_attention, CausalLm, KvCache, Segment};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Bound on KV memory: reservations of running sequences plus the prefix cache.
    pub max_kv_bytes: usize,
    /// Prompt rows per step at most (chunked prefill).
    pub prefill_chunk: usize,
    /// Requests waiting for admission at most; more are refused.
    pub max_queue: usize,
    /// Keep and reuse the KV of shared prompt prefixes.
    pub prefix_cache: bool,
    /// Tokens per prefix-cache block.
    pub block_size: usize,
    /// MTP speculative decoding: drafts per step for each sequence (0 = off; models without MTP
    /// modules and sequences that started from a prefix-cache hit decode plainly).
    pub draft_tokens: usize,
    /// Speculate only in steps where at most this many sequences decode (vLLM's
    /// `speculative_disable_by_batch_size`): a batch already reuses each weight across its rows,
    /// so verification rows stop paying. Beyond it every sequence decodes one token a step and its
    /// drafter takes the skipped rows in when drafting resumes.
    pub spec_max_batch: usize,
}

/// `SchedulerConfig::spec_max_batch`'s default (measured in docs/speculative.md).
pub const DEFAULT_SPEC_MAX_BATCH: usize = 4;

/// Paused steps in a row a sequence's drafter may fall behind before the sequence stops
/// speculating (their hidden states are held until drafting resumes: 256 × hidden_size floats).
const MAX_WAITING_ROWS: usize = 256;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_seqs: 16,
            max_kv_bytes: 1 << 30,
            prefill_chunk: 256,
            max_queue: 256,
            prefix_cache: true,
            block_size: 16,
            draft_tokens: 0,
            spec_max_batch: DEFAULT_SPEC_MAX_BATCH,
        }
    }
}

impl SchedulerConfig {
    /// [`generate_batch`] over `requests` at once: every request admitted in the first step and
    /// every prompt prefilled in it, no KV bound beyond the requests' own, and no prefix cache
    /// (requests that run together have nothing cached to share).
    pub fn whole_batch(requests: &[Request], draft_tokens: usize) -> Self {
        SchedulerConfig {
            max_seqs: requests.len().max(1),
            max_kv_bytes: usize::MAX / 2,
            prefill_chunk: requests
                .iter()
                .map(|r| r.prompt.len())
                .sum::<usize>()
                .max(1),
            prefix_cache: false,
            draft_tokens,
            ..SchedulerConfig::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Ids that end generation (besides stop strings), unless `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Report log-probabilities with this many alternatives (OpenAI `logprobs`/`top_logprobs`).
    pub logprobs: Option<usize>,
}

impl Request {
    /// A request that runs until one of `eos_ids` or `max_tokens`, without stop strings or
    /// log-probabilities (offline generation: rollouts, teacher traces).
    pub fn until_eos(
        prompt: Vec<u32>,
        params: SamplingParams,
        max_tokens: usize,
        eos_ids: &[u32],
    ) -> Self {
        Request {
            prompt,
            params,
            max_tokens,
            stop: vec![],
            eos_ids: eos_ids.to_vec(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Admitted; `cached_tokens` of the prompt came from the prefix cache.
    Started {
        cached_tokens: usize,
    },
    /// A generated token and the text that became final with it (may be empty: held back until
    /// a multi-byte character or a possible stop string resolves).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end; `text` is whatever was still held back (e.g. a partial stop string that never
    /// completed before eos).
    Finished {
        reason: FinishReason,
        completion_tokens: usize,
        text: String,
    },
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters the server exports at /metrics.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_reserved_bytes: AtomicUsize,
    pub prefix_cache_bytes: AtomicUsize,
    /// Speculative decoding: drafts offered and accepted.
    pub draft_tokens: AtomicU64,
    pub accepted_draft_tokens: AtomicU64,
    /// Steps in which speculating sequences decoded plainly (more than `spec_max_batch` decoding).
    pub spec_paused_steps: AtomicU64,
}

struct Submission {
    req: Request,
    tx: UnboundedSender<Event>,
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Submission>,
    pub metrics: Arc<EngineMetrics>,
    pub config: SchedulerConfig,
    /// The model's context length (positions).
    pub context_len: usize,
    pub vocab_size: usize,
    pub kv_bytes_per_token: usize,
}

impl Engine {
    /// Start the engine thread. It stops once every handle is dropped and its work is done.
    pub fn start(
        model: Arc<CausalLm>,
        tok: Option<Arc<TextTokenizer>>,
        config: SchedulerConfig,
    ) -> candle_core::Result<Engine> {
        let kv_bytes_per_token = kv_bytes_per_token(&model)?;
        let (tx, rx) = mpsc::channel();
        let metrics = Arc::new(EngineMetrics::default());
        let engine = Engine {
            tx,
            metrics: metrics.clone(),
            config: config.clone(),
            context_len: model.rope.max_positions(),
            vocab_size: model.cfg.vocab_size,
            kv_bytes_per_token,
        };
        std::thread::Builder::new()
            .name("fathom-engine".into())
            .spawn(move || {
                let mut state =
                    Loop::new(&model, tok.as_deref(), config, metrics, kv_bytes_per_token);
                state.run(rx);
            })
            .map_err(|e| candle_core::Error::Msg(format!("cannot start the engine thread: {e}")))?;
        Ok(engine)
    }

    /// Queue a request; events arrive on the returned receiver. Dropping the receiver cancels.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, SubmitError> {
        check_request(
            &req,
            self.context_len,
            self.vocab_size,
            self.kv_bytes_per_token,
            self.config.max_kv_bytes,
        )
        .map_err(SubmitError::Invalid)?;
        let waiting = self.metrics.waiting.load(Ordering::Relaxed);
        if waiting >= self.config.max_queue {
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull(waiting));
        }
        let (tx, rx) = unbounded_channel();
        self.metrics.waiting.fetch_add(1, Ordering::Relaxed);
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Submission { req, tx }).map_err(|_| {
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            SubmitError::Stopped
        })?;
        Ok(rx)
    }
}

/// Exact bytes per cached token: one token through a cache of the kind the model uses.
fn kv_bytes_per_token(model: &CausalLm) -> candle_core::Result<usize> {
    let mut probe = model.new_cache();
    model.forward(&Tensor::new(&[[0u32]], &model.device)?, 0, Some(&mut probe))?;
    Ok(probe.bytes().max(1))
}

/// Why a request cannot run on this model under this KV bound, if it cannot.
fn check_request(
    req: &Request,
    context_len: usize,
    vocab_size: usize,
    kv_bytes_per_token: usize,
    max_kv_bytes: usize,
) -> Result<(), String> {
    if req.prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(format!(
            "token id {bad} is out of range: the vocabulary has {vocab_size} entries"
        ));
    }
    if req.max_tokens == 0 {
        return Err("max_tokens must be at least 1".into());
    }
    if req.prompt.len() + req.max_tokens > context_len {
        return Err(format!(
            "this model's maximum context length is {context_len} tokens; the request has {} \
             prompt tokens and asks for {} more",
            req.prompt.len(),
            req.max_tokens
        ));
    }
    let need = reservation(req, context_len, kv_bytes_per_token);
    if need > max_kv_bytes {
        return Err(format!(
            "the request needs {need} bytes of KV cache ({} prompt + {} new tokens); the \
             server's bound is {max_kv_bytes} bytes",
            req.prompt.len(),
            req.max_tokens
        ));
    }
    req.params.validate()
}

/// One request's result from [`generate_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// Generated ids (an ending eos is not among them: see `finish`).
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Generate every request to its end in the calling thread, batched as the engine thread batches
/// (continuous batching over `config.max_seqs` sequences, chunked prefill, MTP speculation per
/// `config.draft_tokens`). All requests are queued, in order, before the first step, so the
/// batches and therefore the results are a function of the inputs alone: offline work such as
/// GRPO rollouts gets the engine's batching and stays reproducible. Requests must each fit
/// `config.max_kv_bytes`; the error names the first that does not.
pub fn generate_batch(
    model: &CausalLm,
    tok: Option<&TextTokenizer>,
    config: SchedulerConfig,
    requests: Vec<Request>,
) -> candle_core::Result<Vec<BatchOutput>> {
    let kv_bytes_per_token = kv_bytes_per_token(model)?;
    let context = model.rope.max_positions();
    let mut receivers = Vec::with_capacity(requests.len());
    let mut lp = Loop::new(
        model,
        tok,
        config,
        Arc::new(EngineMetrics::default()),
        kv_bytes_per_token,
    );
    for (i, req) in requests.into_iter().enumerate() {
        check_request(
            &req,
            context,
            model.cfg.vocab_size,
            kv_bytes_per_token,
            lp.cfg.max_kv_bytes,
        )
        .map_err(|why| candle_core::Error::Msg(format!("batch request {i}: {why}")))?;
        let (tx, rx) = unbounded_channel();
        lp.waiting.push_back(Submission { req, tx });
        receivers.push(rx);
    }
    loop {
        lp.admit();
        if lp.running.is_empty() {
            if lp.waiting.is_empty() {
                break;
            }
            // With nothing running every request fits (checked above), so admit() takes one
            // unless no sequence may run at all: stop instead of spinning.
            return Err(candle_core::Error::Msg(format!(
                "generate_batch: {} requests wait but max_seqs is {}",
                lp.waiting.len(),
                lp.cfg.max_seqs
            )));
        }
        lp.step()?;
    }
    receivers
        .into_iter()
        .enumerate()
        .map(|(i, mut rx)| {
            let (mut token_ids, mut text) = (vec![], String::new());
            while let Ok(event) = rx.try_recv() {
                match event {
                    Event::Started { .. } => {}
                    Event::Token { id, text: t, .. } => {
                        token_ids.push(id);
                        text.push_str(&t);
                    }
                    Event::Finished {
                        reason, text: t, ..
                    } => {
                        text.push_str(&t);
                        return Ok(BatchOutput {
                            token_ids,
                            text,
                            finish: reason,
                        });
                    }
                    Event::Error(e) => {
                        return Err(candle_core::Error::Msg(format!("batch request {i}: {e}")))
                    }
                }
            }
            Err(candle_core::Error::Msg(format!(
                "batch request {i} ended without finishing"
            )))
        })
        .collect()
}

/// KV bytes a request reserves at admission: its whole budget of positions.
fn reservation(req: &Request, context_len: usize, kv_bytes_per_token: usize) -> usize {
    (req.prompt.len() + req.max_tokens).min(context_len) * kv_bytes_per_token
}

/// A running sequence.
struct Sequence<'t> {
    req: Request,
    tx: UnboundedSender<Event>,
    cache: KvCache,
    /// Prompt then generated ids.
    tokens: Vec<u32>,
    /// Positions fed through the model (= cache length).
    fed: usize,
    sampler: Sampler,
    stream: TextStream<'t>,
    reserved: usize,
    generated: usize,
    spec: Option<SpecState>,
}

/// A sequence's speculative-decoding state: the MTP drafter, the verified rows it has not seen
/// (hidden states from `offset` on, and the token after each as far as known), this step's drafts.
struct SpecState {
    drafter: Drafter,
    hidden: Vec<Tensor>,
    next: Vec<u32>,
    offset: usize,
    drafts: Vec<Draft>,
    /// Steps decoded without drafting since the last draft.
    paused: usize,
}

impl Sequence<'_> {
    fn prefilling(&self) -> bool {
        self.fed < self.req.prompt.len()
    }
}

struct Loop<'m> {
    model: &'m CausalLm,
    tok: Option<&'m TextTokenizer>,
    cfg: SchedulerConfig,
    metrics: Arc<EngineMetrics>,
    kv_bytes_per_token: usize,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence<'m>>,
    prefix: PrefixCache,
    reserved: usize,
}

impl<'m> Loop<'m> {
    fn new(
        model: &'m CausalLm,
        tok: Option<&'m TextTokenizer>,
        cfg: SchedulerConfig,
        metrics: Arc<EngineMetrics>,
        kv_bytes_per_token: usize,
    ) -> Self {
        Loop {
            model,
            tok,
            prefix: PrefixCache::new(cfg.block_size),
            cfg,
            metrics,
            kv_bytes_per_token,
            waiting: VecDeque::new(),
            running: vec![],
            reserved: 0,
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                if let Err(e) = self.step() {
                    // The batch failed as a whole: every sequence in it gets the error.
                    for s in std::mem::take(&mut self.running) {
                        let _ = s.tx.send(Event::Error(e.to_string()));
                        self.release(s, false);
                    }
                }
            } else if !self.waiting.is_empty() {
                // Nothing runs yet the head of the queue does not fit: only possible while the
                // prefix cache holds the memory, which admit() evicts; avoid a busy loop anyway.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.store(self.running.len(), Ordering::Relaxed);
        m.kv_reserved_bytes.store(self.reserved, Ordering::Relaxed);
        m.prefix_cache_bytes
            .store(self.prefix.bytes(), Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.tx.is_closed());
        let gone = before - self.waiting.len();
        self.metrics.waiting.fetch_sub(gone, Ordering::Relaxed);
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let s = self.running.swap_remove(i);
                self.release(s, false);
            } else {
                i += 1;
            }
        }
    }

    /// Free a sequence's reservation; keep its KV blocks in the prefix cache when it completed.
    fn release(&mut self, s: Sequence<'m>, cache_it: bool) {
        self.reserved -= s.reserved;
        if cache_it && self.cfg.prefix_cache {
            let _ = self.prefix.insert(&s.tokens[..s.fed], &s.cache);
            self.prefix
                .evict_to(self.cfg.max_kv_bytes.saturating_sub(self.reserved));
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_seqs {
            let Some(front) = self.waiting.front() else {
                return;
            };
            let need = reservation(
                &front.req,
                self.model.rope.max_positions(),
                self.kv_bytes_per_token,
            );
            let free = self.cfg.max_kv_bytes.saturating_sub(self.reserved);
            if need > free {
                return; // wait for running sequences to finish
            }
            self.prefix.evict_to(free - need);
            let sub = self.waiting.pop_front().expect("front exists");
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            let mut cache = self.model.new_cache();
            cache.reserve(sub.req.prompt.len() + sub.req.max_tokens);
            let hit = if self.cfg.prefix_cache {
                self.prefix.lookup(&sub.req.prompt)
            } else {
                vec![]
            };
            let hit_refs: Vec<_> = hit.iter().map(|b| &**b).collect();
            if let Err(e) = cache.append_rows(&hit_refs) {
                let _ = sub.tx.send(Event::Error(e.to_string()));
                continue;
            }
            let cached = cache.seq_len();
            self.metrics
                .prompt_tokens
                .fetch_add(sub.req.prompt.len() as u64, Ordering::Relaxed);
            self.metrics
                .cached_prompt_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
            let _ = sub.tx.send(Event::Started {
                cached_tokens: cached,
            });
            self.reserved += need;
            // Rows from the prefix cache have no hidden states for the MTP module to start from.
            let spec = (self.cfg.draft_tokens > 0 && cached == 0)
                .then(|| Drafter::new(self.model))
                .flatten()
                .map(|drafter| SpecState {
                    drafter,
                    hidden: vec![],
                    next: vec![],
                    offset: 0,
                    paused: 0,
                    drafts: vec![],
                });
            self.running.push(Sequence {
                spec,
                sampler: Sampler::new(sub.req.params.clone()),
                stream: TextStream::new(self.tok, &sub.req.stop),
                tokens: sub.req.prompt.clone(),
                fed: cached,
                cache,
                reserved: need,
                generated: 0,
                tx: sub.tx,
                req: sub.req,
            });
        }
    }

    /// One forward pass over every running sequence's next rows, then sampling.
    fn step(&mut self) -> candle_core::Result<()> {
        let mut ids = vec![];
        let mut segments = vec![];
        let mut rows = vec![];
        // (index into running, rows fed, rows whose logits are read)
        let mut members = vec![];
        // Decoding sequences first (one row each, or the last token and its drafts), then prompt
        // chunks under the budget.
        let mut budget = self.cfg.prefill_chunk.max(1);
        let order: Vec<usize> = (0..self.running.len())
            .filter(|&i| !self.running[i].prefilling())
            .chain((0..self.running.len()).filter(|&i| self.running[i].prefilling()))
            .collect();
        let context = self.model.rope.max_positions();
        let decoding = self.running.iter().filter(|s| !s.prefilling()).count();
        let speculate = decoding <= self.cfg.spec_max_batch;
        if !speculate && self.running.iter().any(|s| s.spec.is_some()) {
            self.metrics
                .spec_paused_steps
                .fetch_add(1, Ordering::Relaxed);
        }
        for i in order {
            let s = &mut self.running[i];
            let n = if s.prefilling() {
                if budget == 0 {
                    continue;
                }
                let n = (s.req.prompt.len() - s.fed).min(budget);
                budget -= n;
                n
            } else {
                1 + if speculate {
                    Self::draft(self.model, s, self.cfg.draft_tokens, context)?
                } else {
                    Self::skip_draft(s)
                }
            };
            segments.push(Segment {
                start: ids.len(),
                len: n,
                offset: s.fed,
            });
            // A prompt chunk, or the last sampled token and this step's drafts (every row read).
            let read = if s.prefilling() {
                ids.extend_from_slice(&s.tokens[s.fed..s.fed + n]);
                usize::from(s.fed + n >= s.req.prompt.len())
            } else {
                ids.push(s.tokens[s.fed]);
                ids.extend(
                    s.spec
                        .iter()
                        .flat_map(|st| st.drafts.iter().map(|d| d.token)),
                );
                n
            };
            rows.extend((ids.len() - read..ids.len()).map(|r| r as u32));
            members.push((i, n, read));
        }
        // One sequence decoding one row without a drafter: the runtime's planned step (the
        // packed path otherwise; its hidden states feed the drafter).
        let lone = match members.as_slice() {
            [(i, 1, 1)] => {
                let s = &self.running[*i];
                !s.prefilling() && s.spec.is_none()
            }
            _ => false,
        };
        let planned = if lone {
            let s = &mut self.running[members[0].0];
            self.model
                .decode_planned(ids[0], segments[0].offset, &mut s.cache)?
        } else {
            None
        };
        let (hidden, logits) = match planned {
            Some(l) => (None, vec![l]),
            None => {
                // Disjoint &mut caches in the batch's order.
                let hidden = {
                    let mut slots: Vec<Option<&mut KvCache>> = self
                        .running
                        .iter_mut()
                        .map(|s| Some(&mut s.cache))
                        .collect();
                    let mut caches: Vec<&mut KvCache> = members
                        .iter()
                        .map(|&(i, _, _)| slots[i].take().expect("each sequence once"))
                        .collect();
                    self.model
                        .forward_packed_hidden(&ids, &segments, &mut caches)?
                };
                let logits = self
                    .model
                    .logits(
                        &hidden
                            .index_select(&Tensor::new(rows.as_slice(), &self.model.device)?, 0)?,
                    )?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec2::<f32>()?;
                (Some(hidden), logits)
            }
        };
        // Only the packed path's rows reach the drafter (a planned step has no drafter).
        let hidden = || {
            hidden
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("no hidden states for the drafter".into()))
        };
        self.metrics.steps.fetch_add(1, Ordering::Relaxed);
        let mut finished = vec![];
        let mut row = 0;
        let mut generated = 0;
        for (&(i, n, read), seg) in members.iter().zip(&segments) {
            let s = &mut self.running[i];
            let was_prefilling = s.prefilling();
            let rows_logits = &logits[row..row + read];
            row += read;
            if was_prefilling {
                s.fed += n;
                if let Some(st) = &mut s.spec {
                    // Prompt rows wait for the drafter with the token after each, where known.
                    st.hidden.push(hidden()?.narrow(0, seg.start, n)?);
                    let end = (seg.offset + n + 1).min(s.req.prompt.len());
                    st.next
                        .extend_from_slice(&s.req.prompt[seg.offset + 1..end]);
                }
                if !s.prefilling() && self.cfg.prefix_cache {
                    // The prompt's blocks are complete: share them with requests arriving meanwhile.
                    let _ = self.prefix.insert(&s.req.prompt, &s.cache);
                }
                if read == 0 {
                    continue;
                }
                generated += 1;
                if let Some(reason) = Self::sample_one(s, &rows_logits[0], context)? {
                    finished.push((i, reason));
                }
                continue;
            }
            let drafts = s
                .spec
                .as_mut()
                .map(|st| std::mem::take(&mut st.drafts))
                .unwrap_or_default();
            if drafts.is_empty() {
                if let Some(st) = &mut s.spec {
                    // A step without drafts (speculation paused): the row waits for the drafter.
                    st.hidden.push(hidden()?.narrow(0, seg.start, 1)?);
                }
                s.fed += 1;
                generated += 1;
                if let Some(reason) = Self::sample_one(s, &rows_logits[0], context)? {
                    finished.push((i, reason));
                }
                continue;
            }
            // Speculative: the target's verdict on the drafts, then every accepted token and
            // the correction go out through the same path as sampled ones.
            let verdict = verify(
                &mut s.sampler,
                rows_logits,
                &drafts,
                &s.tokens,
                s.req.prompt.len(),
            );
            self.metrics
                .draft_tokens
                .fetch_add(drafts.len() as u64, Ordering::Relaxed);
            self.metrics
                .accepted_draft_tokens
                .fetch_add(verdict.accepted as u64, Ordering::Relaxed);
            let pos = s.fed;
            s.fed += 1 + verdict.accepted;
            s.cache.truncate(s.fed)?;
            if let Some(st) = &mut s.spec {
                st.hidden = vec![hidden()?.narrow(0, seg.start, 1 + verdict.accepted)?];
                st.next = drafts[..verdict.accepted].iter().map(|d| d.token).collect();
                st.offset = pos;
            }
            let out: Vec<u32> = drafts[..verdict.accepted]
                .iter()
                .map(|d| d.token)
                .chain([verdict.next])
                .collect();
            for (j, &t) in out.iter().enumerate() {
                generated += 1;
                if let Some(reason) = Self::take_token(s, t, &rows_logits[j], context)? {
                    finished.push((i, reason));
                    break;
                }
            }
        }
        self.metrics
            .generated_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        // Remove finished sequences, highest index first so the others keep their places.
        finished.sort_by(|a, b| b.0.cmp(&a.0));
        for (i, reason) in finished {
            let mut s = self.running.swap_remove(i);
            let _ = s.tx.send(Event::Finished {
                reason,
                completion_tokens: s.generated,
                text: s.stream.finish(),
            });
            self.release(s, true);
        }
        let budget = self.cfg.max_kv_bytes.saturating_sub(self.reserved);
        self.prefix.evict_to(budget);
        Ok(())
    }

    /// Draft this step's tokens for a decoding sequence with speculation on (kept in its state);
    /// returns how many. Positions stay inside the sequence's reservation and the context.
    fn draft(
        model: &CausalLm,
        s: &mut Sequence,
        draft_tokens: usize,
        context: usize,
    ) -> candle_core::Result<usize> {
        let Some(st) = &mut s.spec else {
            return Ok(0);
        };
        let pos = s.fed; // where the last sampled token goes
        let room = (context - 1 - pos)
            .min(s.req.max_tokens.saturating_sub(s.generated + 1))
            .min(packed_attention::MAX_PACKED_ROWS - 1);
        let k = draft_tokens.min(room);
        if k == 0 {
            // The end is near: decode plainly; the drafter is not needed any more.
            s.spec = None;
            return Ok(0);
        }
        st.next.push(s.tokens[pos]);
        let hidden = Tensor::cat(&st.hidden, 0)?;
        let mut pick = pick_draft(&mut s.sampler, &s.tokens, s.req.prompt.len());
        st.drafts = st
            .drafter
            .draft(model, &hidden, &st.next, st.offset, k, &mut pick)?;
        st.paused = 0;
        st.hidden.clear();
        st.next.clear();
        Ok(st.drafts.len())
    }

    /// A speculating sequence decodes one token plainly this step: the token its row is fed with
    /// joins the rows waiting for the drafter (their hidden states follow after the forward). A
    /// sequence whose drafter has waited through `MAX_WAITING_ROWS` such steps stops speculating,
    /// which bounds the hidden states held for it.
    fn skip_draft(s: &mut Sequence) -> usize {
        if let Some(st) = &mut s.spec {
            if st.paused >= MAX_WAITING_ROWS {
                s.spec = None;
            } else {
                st.paused += 1;
                st.next.push(s.tokens[s.fed]);
            }
        }
        0
    }

    /// Sample the next token of `s` and take it; returns why it ends, if it does.
    fn sample_one(
        s: &mut Sequence,
        logits: &[f32],
        context: usize,
    ) -> candle_core::Result<Option<FinishReason>> {
        let next = s.sampler.sample(logits, &s.tokens, s.req.prompt.len());
        Self::take_token(s, next, logits, context)
    }

    /// Append a chosen token (its logits for logprobs), stream it; returns why it ends, if it
    /// does.
    fn take_token(
        s: &mut Sequence,
        next: u32,
        logits: &[f32],
        context: usize,
    ) -> candle_core::Result<Option<FinishReason>> {
        if !s.req.ignore_eos && s.req.eos_ids.contains(&next) {
            return Ok(Some(FinishReason::Eos));
        }
        let logprob = s.req.logprobs.map(|top| {
            let (logprob, top) = token_logprobs(logits, next, top);
            TokenLogprob { logprob, top }
        });
        s.tokens.push(next);
        s.generated += 1;
        let (mut text, stopped) = s.stream.push(next)?;
        let done = if stopped {
            Some(FinishReason::Stop)
        } else if s.generated >= s.req.max_tokens || s.tokens.len() >= context {
            Some(FinishReason::Length)
        } else {
            None
        };
        if done.is_some() && !stopped {
            text.push_str(&s.stream.finish());
        }
        let _ = s.tx.send(Event::Token {
            id: next,
            text: std::mem::take(&mut text),
            logprob,
        });
        Ok(done)
    }
}
