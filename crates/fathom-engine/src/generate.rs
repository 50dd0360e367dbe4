//! The decode loop: prefill the prompt into the KV cache, then sample one token per step until
//! eos, a stop string, `max_tokens` or the context limit. Text streams out as it becomes final:
//! an incomplete UTF-8 sequence or a possible start of a stop string is held back.

use crate::sampler::{Sampler, SamplingParams};
use candle_core::{DType, Tensor};
use fathom_core::TextTokenizer;
use fathom_model::CausalLm;
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
pub struct TextStream<'a> {
    tok: Option<&'a TextTokenizer>,
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    stops: StopMatcher,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: Option<&'a TextTokenizer>, stops: &[String]) -> Self {
        TextStream {
            tok,
            ids: vec![],
            text: String::new(),
            emitted: 0,
            stops: StopMatcher::new(stops),
        }
    }

    /// Add a token; returns newly final text, and whether a stop string completed.
    pub fn push(&mut self, id: u32) -> candle_core::Result<(String, bool)> {
        self.ids.push(id);
        let Some(tok) = self.tok else {
            return Ok((String::new(), false));
        };
        self.text = tok
            .decode(&self.ids, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if let Some(at) = self.stops.find(&self.text) {
            self.text.truncate(at);
            let out = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.text.len();
            return Ok((out, true));
        }
        let mut safe = self.stops.safe_len(&self.text);
        // A trailing U+FFFD is an incomplete multi-byte sequence: wait for the next token.
        if self.text[..safe].ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
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
}

fn last_logits(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    let s = logits.dim(1)?;
    logits
        .narrow(1, s - 1, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()
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
    let mut stream = TextStream::new(tok, opts.stop);
    let mut cache = model.new_cache();
    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = vec![];

    let t0 = Instant::now();
    let ids = Tensor::new(prompt, &model.device)?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward(&ids, 0, Some(&mut cache))?)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    while out.len() < opts.max_tokens {
        let next = sampler.sample(&logits, &history, prompt.len());
        if !opts.ignore_eos && opts.eos_ids.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        out.push(next);
        history.push(next);
        let (piece, stopped) = stream.push(next)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        let pos = history.len() - 1;
        if pos + 1 >= ctx || out.len() >= opts.max_tokens {
            break;
        }
        let x = Tensor::new(&[next], &model.device)?.unsqueeze(0)?;
        logits = last_logits(&model.forward(&x, pos, Some(&mut cache))?)?;
    }
    let rest = stream.finish();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generation {
        token_ids: out,
        text: stream.text().to_string(),
        finish,
        prompt_tokens: prompt.len(),
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_stops() {
        let m = StopMatcher::new(&["</answer>".to_string(), "\n\n".to_string()]);
        assert_eq!(m.find("x</answer>y"), Some(1));
        assert_eq!(m.safe_len("abc</ans"), 3);
        assert_eq!(m.safe_len("abc\n"), 3);
        assert_eq!(m.safe_len("abc"), 3);
    }
}
