//! `fathom tokenizer train`: a byte-level BPE (the `tokenizers` crate's trainer, GPT-2/DeepSeek
//! style pre-tokenisation) with DeepSeek's special tokens at ids 0.. (bos 0, eos 1, pad 2) and
//! DeepSeek-R1's chat template, written as `tokenizer.json` + `tokenizer_config.json`.

use crate::data::ChunkReader;
use crate::error::{io_err, Result, TrainError};
use fathom_core::{deepseek_tokenizer_config, DEEPSEEK_SPECIAL_TOKENS};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// Train on the documents of `files` (text or JSONL) plus `arithmetic_problems` synthetic problems;
/// write the tokenizer files into `out`. Returns the vocabulary size reached.
pub fn train_tokenizer(
    files: &[PathBuf],
    arithmetic_problems: usize,
    seed: u64,
    vocab_size: usize,
    model_max_length: usize,
    out: &Path,
) -> Result<usize> {
    if vocab_size < DEEPSEEK_SPECIAL_TOKENS.len() + 256 {
        return Err(TrainError::Config {
            file: "--vocab-size".into(),
            msg: format!(
                "{vocab_size} is below the {} special tokens + 256 bytes",
                DEEPSEEK_SPECIAL_TOKENS.len()
            ),
        });
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            DEEPSEEK_SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(ByteLevel::new(false, false, true).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .map_err(|e| TrainError::Other(format!("tokenizer: {e}")))?;

    let failure: Arc<Mutex<Option<TrainError>>> = Arc::new(Mutex::new(None));
    let sink = failure.clone();
    let texts = ChunkReader::new(files, arithmetic_problems, seed).filter_map(move |c| match c {
        Ok(c) => Some(c.text),
        Err(e) => {
            sink.lock().unwrap().get_or_insert(e);
            None
        }
    });
    tok.train(&mut trainer, texts)
        .map_err(|e| TrainError::Other(format!("tokenizer training: {e}")))?;
    if let Some(e) = failure.lock().unwrap().take() {
        return Err(e);
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tj = out.join("tokenizer.json");
    tok.save(&tj, false)
        .map_err(|e| TrainError::Other(format!("{}: {e}", tj.display())))?;
    let tc = out.join("tokenizer_config.json");
    let cfg = deepseek_tokenizer_config(model_max_length);
    std::fs::write(&tc, serde_json::to_string_pretty(&cfg).unwrap()).map_err(io_err(&tc))?;
    Ok(tok.get_vocab_size(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_core::TextTokenizer;

    #[test]
    fn trains_a_deepseek_style_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.txt");
        std::fs::write(
            &corpus,
            "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n"
                .repeat(50),
        )
        .unwrap();
        let out = dir.path().join("tok");
        let n = train_tokenizer(&[corpus], 100, 0, 400, 512, &out).unwrap();
        assert!(n <= 400 && n > 272, "{n}");
        let tok = TextTokenizer::from_dir(&out).unwrap();
        assert_eq!(tok.token_to_id("<｜begin▁of▁sentence｜>"), Some(0));
        assert_eq!(tok.token_to_id("<｜end▁of▁sentence｜>"), Some(1));
        assert_eq!(tok.token_to_id("</think>"), Some(6));
        let text = "To be, or not to be? 12 + 35 = 47. naïve ☃";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // Frequent words became single tokens.
        assert!(tok.encode(" question", false).unwrap().len() == 1);
        let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
        let (prompt, _) = tok.apply_chat_template(&msgs, None, true).unwrap();
        assert_eq!(
            prompt,
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
        );
        assert!(train_tokenizer(&[], 0, 0, 100, 512, &out).is_err());
    }
}
