//! The decode loop: prefill the prompt into the KV cache, then sample one token per step until
//! eos, a stop string, `max_tokens` or the context limit. Text streams out as it becomes final:
//! an incomplete UTF-8 sequence or a possible start of a stop string is held back.

use crate::sampler::{Sampler, SamplingParams};
use crate::speculative::{pick_draft, verify, Drafter, SpecStats};
use candle_core::{DType, Tensor};
use fathom_core::TextTokenizer;
use fathom_model::{CausalLm, KvCache, Segment};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or the model's context limit.
    Length,
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos | FinishReason::Stop => "stop",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids only (no prompt; the eos token that ended generation is not included).
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Speculative decoding's draft statistics, when it ran.
    pub spec: Option<SpecStats>,
}

/// Finds stop strings in generated text and says how much text is safe to show.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Byte offset of the earliest complete stop string.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Longest prefix of `text` that cannot become part of a stop string with more text.
    pub fn safe_len(&self, text: &str) -> usize {
        let mut safe = text.len();
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if text.ends_with(&s[..i]) {
                    safe = safe.min(text.len() - i);
                }
            }
        }
        safe
    }
}

/// Incremental detokeniser with hold-back for stop strings and partial UTF-8.
///
/// Each token decodes only a short window, as vLLM and TGI do: the ids from `prefix_offset`
/// (a few tokens back, so a tokenizer that treats the first token of a decode specially sees the
/// same context both times) to the end, minus the decode of the same window without the new ids.
/// Re-decoding the whole output every token made a long (R1-length) reply quadratic.
pub struct TextStream<'a> {
    tok: Option<&'a TextTokenizer>,
    ids: Vec<u32>,
    /// Window start and the end of the ids already turned into `text`.
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    emitted: usize,
    stops: StopMatcher,
    longest_stop: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: Option<&'a TextTokenizer>, stops: &[String]) -> Self {
        let stops = StopMatcher::new(stops);
        let longest_stop = stops.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        TextStream {
            tok,
            ids: vec![],
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stops,
            longest_stop,
        }
    }

    /// Text the ids after `read_offset` add (`force`: even if it ends in an incomplete UTF-8
    /// sequence, at the end of generation).
    fn decode_new(&mut self, force: bool) -> candle_core::Result<()> {
        let Some(tok) = self.tok else {
            return Ok(());
        };
        let decode = |ids: &[u32]| {
            tok.decode(ids, false)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        let before = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = decode(&self.ids[self.prefix_offset..])?;
        // A trailing U+FFFD is an incomplete multi-byte sequence: wait for the next token.
        if after.len() > before.len() && (force || !after.ends_with('\u{FFFD}')) {
            match after.get(before.len()..) {
                Some(delta) => self.text.push_str(delta),
                // The window's earlier text changed (not seen with byte-level BPE or
                // SentencePiece): fall back to the whole output once.
                None => self.text = decode(&self.ids)?,
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(())
    }

    /// Add a token; returns newly final text, and whether a stop string completed.
    pub fn push(&mut self, id: u32) -> candle_core::Result<(String, bool)> {
        self.ids.push(id);
        let checked = self.text.len();
        self.decode_new(false)?;
        // Only the new text (and a stop's length before it) can complete a stop string.
        let mut from = checked.saturating_sub(self.longest_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self.stops.find(&self.text[from..]) {
            self.text.truncate(from + at);
            let out = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.text.len();
            return Ok((out, true));
        }
        let mut safe = self.stops.safe_len(&self.text);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe <= self.emitted {
            return Ok((String::new(), false));
        }
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Ok((out, false))
    }

    /// Whatever was held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        if self.read_offset < self.ids.len() && self.decode_new(true).is_ok() {
            if let Some(at) = self.stops.find(&self.text) {
                self.text.truncate(at);
            }
        }
        let out = self.text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

pub struct GenerateOptions<'a> {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: &'a [String],
    pub ignore_eos: bool,
    pub eos_ids: &'a [u32],
    /// MTP speculative decoding: tokens drafted per step (0 = off). Models without MTP modules
    /// decode plainly whatever this says.
    pub draft_tokens: usize,
}

/// Draft tokens per step `fathom bench` measures speculation with (it measures both sides; what the
/// other commands use unless told is `speculative::default_draft_tokens`).
pub const DEFAULT_DRAFT_TOKENS: usize = 2;

/// The output side of decoding: every token goes through `emit`, which applies eos, stop
/// strings, `max_tokens` and the context limit the same way for plain and speculative decoding.
struct Emitter<'a, 'b> {
    opts: &'b GenerateOptions<'b>,
    stream: TextStream<'a>,
    history: Vec<u32>,
    out: Vec<u32>,
    context: usize,
}

impl Emitter<'_, '_> {
    /// Take a sampled token; returns why generation ends, if it does.
    fn emit(
        &mut self,
        token: u32,
        on_text: &mut dyn FnMut(&str),
    ) -> candle_core::Result<Option<FinishReason>> {
        if !self.opts.ignore_eos && self.opts.eos_ids.contains(&token) {
            return Ok(Some(FinishReason::Eos));
        }
        self.out.push(token);
        self.history.push(token);
        let (piece, stopped) = self.stream.push(token)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stopped {
            return Ok(Some(FinishReason::Stop));
        }
        if self.out.len() >= self.opts.max_tokens || self.history.len() >= self.context {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }
}

/// Run `ids` at positions offset.. through the model (the packed path, one segment, as the
/// server runs it) and return their final hidden states [n, hidden].
fn forward_rows(
    model: &CausalLm,
    cache: &mut KvCache,
    ids: &[u32],
    offset: usize,
) -> candle_core::Result<Tensor> {
    let segment = [Segment {
        start: 0,
        len: ids.len(),
        offset,
    }];
    model.forward_packed_hidden(ids, &segment, &mut [cache])
}

/// Logits of one token at `pos`: the runtime's planned step where it applies, else the plain
/// path (both append to `cache`).
fn decode_one(
    model: &CausalLm,
    cache: &mut KvCache,
    token: u32,
    pos: usize,
) -> candle_core::Result<Vec<f32>> {
    if let Some(logits) = model.decode_planned(token, pos, cache)? {
        return Ok(logits);
    }
    let h = forward_rows(model, cache, &[token], pos)?;
    Ok(row_logits(model, &h)?.remove(0))
}

fn row_logits(model: &CausalLm, hidden: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    model.logits(hidden)?.to_dtype(DType::F32)?.to_vec2()
}

/// Generate from `prompt` ids, calling `on_text` with each piece of final text.
pub fn generate(
    model: &CausalLm,
    tok: Option<&TextTokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> candle_core::Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt is empty");
    }
    let vocab = model.cfg.vocab_size as u32;
    if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
        candle_core::bail!("token id {bad} is out of range: the vocabulary has {vocab} entries");
    }
    let ctx = model.rope.max_positions();
    if prompt.len() >= ctx {
        candle_core::bail!(
            "the prompt has {} tokens; the context is {ctx}",
            prompt.len()
        );
    }
    opts.params.validate().map_err(candle_core::Error::Msg)?;
    let mut sampler = Sampler::new(opts.params.clone());
    let mut em = Emitter {
        opts,
        stream: TextStream::new(tok, opts.stop),
        history: prompt.to_vec(),
        out: vec![],
        context: ctx,
    };
    let mut cache = model.new_cache();
    let mut drafter = if opts.draft_tokens > 0 {
        Drafter::new(model)
    } else {
        None
    };
    let mut spec = drafter.as_ref().map(|_| SpecStats::default());
    let output_start = prompt.len();

    let t0 = Instant::now();
    let prompt_hidden = forward_rows(model, &mut cache, prompt, 0)?;
    let last = prompt_hidden.narrow(0, prompt.len() - 1, 1)?;
    let logits = row_logits(model, &last)?.remove(0);
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    if opts.max_tokens > 0 {
        let mut next = sampler.sample(&logits, &em.history, output_start);
        // Rows the drafter has not seen yet: hidden states, the token after each, first position.
        let mut pending_hidden = prompt_hidden;
        let mut pending_next: Vec<u32> = prompt[1..].to_vec();
        let mut pending_offset = 0;
        loop {
            if let Some(r) = em.emit(next, on_text)? {
                finish = r;
                break;
            }
            let pos = em.history.len() - 1; // where `next` goes
            let room = (ctx - 1 - pos).min(opts.max_tokens - em.out.len());
            let k = opts.draft_tokens.min(room);
            let (Some(d), true) = (drafter.as_mut(), k > 0) else {
                let logits = decode_one(model, &mut cache, next, pos)?;
                next = sampler.sample(&logits, &em.history, output_start);
                continue;
            };
            pending_next.push(next);
            let drafts = {
                let mut pick = pick_draft(&mut sampler, &em.history, output_start);
                d.draft(
                    model,
                    &pending_hidden,
                    &pending_next,
                    pending_offset,
                    k,
                    &mut pick,
                )?
            };
            let mut ids = vec![next];
            ids.extend(drafts.iter().map(|d| d.token));
            let h = forward_rows(model, &mut cache, &ids, pos)?;
            let verdict = verify(
                &mut sampler,
                &row_logits(model, &h)?,
                &drafts,
                &em.history,
                output_start,
            );
            let stats = spec.as_mut().expect("drafting implies stats");
            stats.record(drafts.len(), verdict.accepted);
            // Keep the verified rows (next and the accepted drafts); drop the rejected ones.
            cache.truncate(pos + verdict.accepted + 1)?;
            pending_hidden = h.narrow(0, 0, verdict.accepted + 1)?;
            pending_next = drafts[..verdict.accepted].iter().map(|d| d.token).collect();
            pending_offset = pos;
            let mut ended = None;
            for d in &drafts[..verdict.accepted] {
                if let Some(r) = em.emit(d.token, on_text)? {
                    ended = Some(r);
                    break;
                }
            }
            if let Some(r) = ended {
                finish = r;
                break;
            }
            next = verdict.next;
        }
    }
    let rest = em.stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generation {
        token_ids: em.out,
        text: em.stream.text().to_string(),
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_tokenizer() -> TextTokenizer {
        TextTokenizer::from_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default"),
        )
        .unwrap()
    }

    /// Streaming token by token gives exactly the whole decode, multi-byte characters split over
    /// byte tokens included, and nothing is emitted as a half character.
    #[test]
    fn incremental_text_equals_the_whole_decode() {
        let tok = default_tokenizer();
        for text in [
            "naïve café — 東京 🙂 ok",
            "plain words and 12 + 35 = 47.",
            "ü🙂🙂ü  \n\t x",
        ] {
            let ids = tok.encode(text, false).unwrap();
            let mut stream = TextStream::new(Some(&tok), &[]);
            let mut out = String::new();
            for &id in &ids {
                let (piece, stopped) = stream.push(id).unwrap();
                assert!(!stopped);
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{text:?}: half a character in {piece:?}"
                );
                out.push_str(&piece);
            }
            out.push_str(&stream.finish());
            assert_eq!(out, tok.decode(&ids, false).unwrap(), "{text:?}");
            assert_eq!(stream.text(), out);
        }
    }

    #[test]
    fn stop_strings_cut_the_stream_across_token_boundaries() {
        let tok = default_tokenizer();
        let ids = tok
            .encode("The answer is 47</answer> and more text", false)
            .unwrap();
        let mut stream = TextStream::new(Some(&tok), &["</answer>".to_string()]);
        let mut out = String::new();
        let mut stopped_at = None;
        for (i, &id) in ids.iter().enumerate() {
            let (piece, stopped) = stream.push(id).unwrap();
            out.push_str(&piece);
            if stopped {
                stopped_at = Some(i);
                break;
            }
        }
        assert!(stopped_at.is_some());
        assert_eq!(out, "The answer is 47");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn stop_matcher_holds_back_partial_stops() {
        let m = StopMatcher::new(&["</answer>".to_string(), "\n\n".to_string()]);
        assert_eq!(m.find("x</answer>y"), Some(1));
        assert_eq!(m.safe_len("abc</ans"), 3);
        assert_eq!(m.safe_len("abc\n"), 3);
        assert_eq!(m.safe_len("abc"), 3);
    }
}
