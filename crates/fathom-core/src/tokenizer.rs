//! `tokenizer.json` (through the `tokenizers` crate) and the `chat_template` of
//! `tokenizer_config.json` (through minijinja with Python-compatible string methods, which DeepSeek's
//! templates need: `.split(...)`, `.startswith(...)`, `namespace`, `[-1]`).
//!
//! Rendering follows transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, with
//! `bos_token`, `eos_token`, `messages`, `tools` and `add_generation_prompt` in scope.

use crate::error::{FathomError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; keep rendering deterministic and offline-safe.
            let _ = fmt;
            String::new()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| FathomError::Template(format!("cannot parse chat_template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Render a conversation (OpenAI-style message objects) to the prompt string.
    pub fn render(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| FathomError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            tools => tools.map(minijinja::Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            FathomError::Template(msg)
        })
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Every id that ends generation: the tokenizer's eos plus the config's `eos_token_id`s.
    pub eos_ids: Vec<u32>,
    /// Whether plain-text prompts get bos prepended (`add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
    pub file: PathBuf,
}

/// `"<s>"` or `{"__type": "AddedToken", "content": "<s>", ...}` → `"<s>"`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `DIR/tokenizer.json` and, when present, `DIR/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(FathomError::Tokenizer {
                file,
                msg: "not found".into(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&file).map_err(|e| FathomError::Tokenizer {
                file: file.clone(),
                msg: format!("cannot load: {e}"),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| FathomError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| FathomError::Tokenizer {
                file: cfg_path.clone(),
                msg: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        // generation_config.json may list more stop ids (Llama 3: <|eot_id|>).
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                match v.get("eos_token_id") {
                    Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                    Some(Value::Array(a)) => {
                        eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| {
                    t.get("template")
                        .and_then(|s| s.as_str())
                        .map(str::to_string)
                }),
            _ => None,
        };
        // Newer checkpoints ship the template as a separate file.
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let chat_template = match chat_template {
            Some(src) => Some(
                ChatTemplate::new(
                    &src,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
                .map_err(|e| FathomError::Tokenizer {
                    file: cfg_path.clone(),
                    msg: e.to_string(),
                })?,
            ),
            None => None,
        };
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        eos_ids.dedup();
        Ok(TextTokenizer {
            inner,
            bos_token,
            eos_token,
            bos_id,
            eos_ids,
            add_bos,
            chat_template,
            file,
        })
    }

    /// Build from a GGUF file's `tokenizer.*` metadata (llama.cpp's `gpt2` model: byte-level BPE).
    /// The pre-tokenizer is chosen by `tokenizer.ggml.pre`, as llama.cpp does.
    pub fn from_gguf_metadata(
        meta: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        file: &Path,
    ) -> Result<Self> {
        use candle_core::quantized::gguf_file::Value as G;
        let bad = gguf_error(file);
        let strings = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(G::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        G::String(s) => Ok(s.clone()),
                        _ => Err(bad(format!("`{key}`: expected strings"))),
                    })
                    .collect(),
                _ => Err(bad(format!("`{key}` missing"))),
            }
        };
        let model = match meta.get("tokenizer.ggml.model") {
            Some(G::String(m)) => m.clone(),
            _ => return Err(bad("`tokenizer.ggml.model` missing".into())),
        };
        if model != "gpt2" && model != "llama" {
            return Err(bad(format!(
                "tokenizer model {model:?} is not supported from GGUF metadata (byte-level BPE \"gpt2\" and SentencePiece \"llama\" are); put the model's tokenizer.json beside the file"
            )));
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
            Some(G::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        if model == "llama" {
            let scores: Vec<f32> = match meta.get("tokenizer.ggml.scores") {
                Some(G::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                _ => return Err(bad("`tokenizer.ggml.scores` missing (SentencePiece)".into())),
            };
            if scores.len() != tokens.len() {
                return Err(bad(format!(
                    "`tokenizer.ggml.scores` has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            let add_space_prefix = !matches!(
                meta.get("tokenizer.ggml.add_space_prefix"),
                Some(G::Bool(false))
            );
            let unk = meta
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(|v| v.to_u32().ok())
                .and_then(|i| tokens.get(i as usize).cloned());
            let spec = sentencepiece_spec(&tokens, &scores, &types, add_space_prefix, unk);
            let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
                bad(format!(
                    "cannot build the SentencePiece tokenizer from GGUF metadata: {e}"
                ))
            })?;
            return Self::from_gguf_parts(inner, &tokens, meta, file);
        }
        let merges = strings("tokenizer.ggml.merges")?;
        let pre = match meta.get("tokenizer.ggml.pre") {
            Some(G::String(p)) => p.clone(),
            _ => "default".into(),
        };
        let byte_level = |regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let split = |re: &str| serde_json::json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        // The split regexes are llama.cpp's own, name by name (`pretokenizers.rs`, generated from
        // its llama-vocab.cpp): each splits every piece the previous left, then GPT-2 bytes.
        let Some(&(_, kind, ignore_merges)) = crate::pretokenizers::NAMES
            .iter()
            .find(|(n, _, _)| *n == pre)
        else {
            let known: Vec<&str> = crate::pretokenizers::NAMES
                .iter()
                .map(|(n, ..)| *n)
                .collect();
            return Err(bad(format!(
                "pre-tokenizer `tokenizer.ggml.pre` = {pre:?} is not one llama.cpp knows ({}); put the model's tokenizer.json beside the file",
                known.join(", ")
            )));
        };
        let spec_of = crate::pretokenizers::TYPES
            .iter()
            .find(|t| t.kind == kind)
            .ok_or_else(|| bad(format!("pre-tokenizer {pre:?} ({kind}) has no split rules")))?;
        if kind == "KIMI_K2" {
            // Its one regex only triggers a hand-written splitter in llama.cpp's unicode.cpp.
            return Err(bad(format!(
                "pre-tokenizer {pre:?} is split by a hand-written rule in llama.cpp that Fathom does not reproduce yet; put the model's tokenizer.json beside the file"
            )));
        }
        if !spec_of.byte_encode {
            return Err(bad(format!(
                "pre-tokenizer {pre:?} ({kind}) is SentencePiece-style BPE on raw UTF-8, not supported from GGUF metadata yet; put the model's tokenizer.json beside the file"
            )));
        }
        let mut steps: Vec<serde_json::Value> = spec_of.regexes.iter().map(|r| split(r)).collect();
        steps.push(byte_level(false));
        let pre_tokenizer = serde_json::json!({"type": "Sequence", "pretokenizers": steps});
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.entry(tok.clone()).or_insert(serde_json::json!(id));
            // 3 = control, 4 = user-defined (llama.cpp's token types): matched before BPE.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(
                    serde_json::json!({"id": id, "content": tok, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": byte_level(true),
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            bad(format!(
                "cannot build the tokenizer from GGUF metadata (pre-tokenizer {pre:?}): {e}"
            ))
        })?;
        Self::from_gguf_parts(inner, &tokens, meta, file)
    }

    /// The special ids, chat template and bos rule a GGUF file's metadata gives, around `inner`.
    fn from_gguf_parts(
        inner: tokenizers::Tokenizer,
        tokens: &[String],
        meta: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        file: &Path,
    ) -> Result<Self> {
        use candle_core::quantized::gguf_file::Value as G;
        let bad = gguf_error(file);
        let id = |key: &str| meta.get(key).and_then(|v| v.to_u32().ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let bos_token = name(bos_id);
        let eos_token = name(eos_id);
        let chat_template = match meta.get("tokenizer.chat_template") {
            Some(G::String(src)) => Some(
                ChatTemplate::new(
                    src,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
                .map_err(|e| bad(format!("`tokenizer.chat_template`: {e}")))?,
            ),
            _ => None,
        };
        let add_bos = matches!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(G::Bool(true))
        );
        Ok(TextTokenizer {
            inner,
            bos_token,
            eos_token,
            bos_id,
            eos_ids: eos_id.into_iter().collect(),
            add_bos,
            chat_template,
            file: file.to_path_buf(),
        })
    }

    pub fn add_eos_ids(&mut self, ids: &[u32]) {
        for &i in ids {
            if !self.eos_ids.contains(&i) {
                self.eos_ids.push(i);
            }
        }
    }

    /// Encode text. Special tokens written in the text (`<｜User｜>`, `<think>`) are recognised, as
    /// transformers does for a rendered chat template. `add_bos` prepends bos when configured.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| FathomError::Tokenizer {
                file: self.file.clone(),
                msg: format!("encode: {e}"),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos_id {
                if enc.get_ids().first() != Some(&b) {
                    ids.push(b);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| FathomError::Tokenizer {
                file: self.file.clone(),
                msg: format!("decode: {e}"),
            })
    }

    /// Every token (added ones included) and its id.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render a conversation with the chat template and encode it.
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<u32>)> {
        let tmpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| FathomError::Tokenizer {
                file: self.file.with_file_name("tokenizer_config.json"),
                msg: "no chat_template: this model has no chat format (use a plain prompt)".into(),
            })?;
        let text = tmpl.render(messages, tools, add_generation_prompt)?;
        // The template writes bos itself; do not add another.
        let ids = self.encode(&text, false)?;
        Ok((text, ids))
    }
}

/// DeepSeek-V3/R1's special tokens, in the order their ids are assigned by `fathom tokenizer train`
/// (bos = 0, eos = 1, pad = 2).
pub const DEEPSEEK_SPECIAL_TOKENS: [&str; 16] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
];

/// DeepSeek-R1's chat template: system prompts joined, reasoning of earlier assistant turns dropped,
/// tool calls and outputs, `<think>\n` pre-filled after the generation prompt.
pub const DEEPSEEK_R1_CHAT_TEMPLATE: &str = include_str!("templates/deepseek_r1.jinja");

/// `tokenizer_config.json` for a DeepSeek-style tokenizer (bos/eos/pad as AddedToken objects, as
/// the real checkpoints write them; bos is written by the template, not added by encode).
pub fn deepseek_tokenizer_config(model_max_length: usize) -> Value {
    let added = |content: &str| {
        serde_json::json!({"__type": "AddedToken", "content": content, "lstrip": false,
            "normalized": true, "rstrip": false, "single_word": false})
    };
    serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": added(DEEPSEEK_SPECIAL_TOKENS[0]),
        "eos_token": added(DEEPSEEK_SPECIAL_TOKENS[1]),
        "pad_token": added(DEEPSEEK_SPECIAL_TOKENS[2]),
        "clean_up_tokenization_spaces": false,
        "legacy": true,
        "model_max_length": model_max_length,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": DEEPSEEK_R1_CHAT_TEMPLATE,
    })
}

/// The error for a GGUF file's tokenizer metadata, naming the file.
fn gguf_error(file: &Path) -> impl Fn(String) -> FathomError + '_ {
    move |msg| FathomError::Tokenizer {
        file: file.to_path_buf(),
        msg,
    }
}

/// A Hugging Face `tokenizers` spec for a SentencePiece BPE vocabulary (`tokenizer.ggml.model` =
/// `llama`), as transformers converts one (LlamaTokenizerFast): "▁" prepended (when the file
/// says `add_space_prefix`) and spaces replaced by "▁", BPE with byte fallback to the `<0xXX>`
/// tokens, and merges made from the scores the way transformers' `SentencePieceExtractor` does —
/// every split of a vocabulary piece into two pieces is a merge, ranked by the merged piece's
/// score (highest first), ties by the two pieces' ids — which reproduces SentencePiece's (and
/// llama.cpp's) "merge the best-scoring adjacent pair" loop.
fn sentencepiece_spec(
    tokens: &[String],
    scores: &[f32],
    types: &[i64],
    add_space_prefix: bool,
    unk: Option<String>,
) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let mut ids = std::collections::HashMap::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(tok.clone()).or_insert(serde_json::json!(id));
        ids.entry(tok.as_str()).or_insert(id);
        // 2 = unknown, 3 = control, 4 = user-defined: matched whole, before BPE.
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 2 || ty == 3 || ty == 4 {
            added.push(
                serde_json::json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": ty != 4}),
            );
        }
    }
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (cut, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[id], il, ir, l, r));
            }
        }
    }
    // Highest score first; within one score the pieces' ids (a stable order, as transformers).
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| serde_json::json!([m.3, m.4]))
        .collect();
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(
        serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
    );
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}
