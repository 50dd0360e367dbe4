//! `fathom serve`: load the model, start the continuous-batching engine and the HTTP server.

use crate::{limit_draft_modules, load_with, parse_quant, resolve_model};
use anyhow::{bail, Context, Result};
use clap::Args;
use fathom_core::WeightQuant;
use fathom_engine::{Engine, SchedulerConfig};
use fathom_serve::{AppState, ServeConfig};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on (loopback by default; 0.0.0.0 to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Name clients use in `model` (default: the model directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` (also read from $FATHOM_API_KEY).
    #[arg(long, env = "FATHOM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    max_seqs: usize,
    /// KV-cache memory bound in MiB (running sequences' reservations + prefix cache).
    #[arg(long, default_value_t = 1024)]
    max_kv_mib: usize,
    /// Requests waiting for a slot at most; more get 503.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Prompt tokens prefilled per step at most (chunked prefill).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Do not keep shared prompt prefixes' KV.
    #[arg(long)]
    no_prefix_cache: bool,
    /// MTP speculative decoding: tokens each sequence's MTP modules draft per step (models with
    /// MTP modules; default one per module for dense-layer models, off for MoE models — as
    /// `generate`; 0 = off; sequences that start from a prefix-cache hit decode plainly).
    #[arg(long)]
    draft_tokens: Option<usize>,
    /// Speculate only in steps where at most this many sequences decode: a batch already shares
    /// each weight read among its rows, and verification rows stop paying (docs/speculative.md).
    #[arg(long, default_value_t = fathom_engine::DEFAULT_SPEC_MAX_BATCH)]
    spec_max_batch: usize,
    /// MTP modules that draft (default: all); past them the last is reused recursively.
    #[arg(long)]
    draft_modules: Option<usize>,
    /// max_tokens for requests that give none (capped by the context left).
    #[arg(long, default_value_t = 4096)]
    default_max_tokens: usize,
    /// Threads for the model's kernels (default: all cores; on 2 cores a weight-bound model serves
    /// 35–50 % more tokens/s with 2 than with 1, the tiny default model ~6 % less: docs/serving.md).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantise projection weights while loading: q8_0, q6_k, q4_k, q4_0.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<WeightQuant>,
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let mut loaded = load_with(&path, a.quant)?;
    limit_draft_modules(&mut loaded.model, a.draft_modules)?;
    let tok = Arc::new(
        loaded
            .tok
            .with_context(|| format!("{}: serving needs a tokenizer", path.display()))?,
    );
    if a.max_seqs == 0 || a.max_kv_mib == 0 {
        bail!("--max-seqs and --max-kv-mib must be at least 1");
    }
    let name = a.model_name.clone().unwrap_or_else(|| {
        let p = std::fs::canonicalize(&path).unwrap_or(path.clone());
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fathom".into())
    });
    let draft_tokens = a.draft_tokens.unwrap_or_else(|| {
        fathom_engine::default_draft_tokens(&loaded.model.cfg, loaded.model.mtp.len())
    });
    let engine = Engine::start(
        Arc::new(loaded.model),
        Some(tok.clone()),
        SchedulerConfig {
            max_seqs: a.max_seqs,
            max_kv_bytes: a.max_kv_mib << 20,
            prefill_chunk: a.prefill_chunk.max(1),
            max_queue: a.max_queue,
            prefix_cache: !a.no_prefix_cache,
            block_size: 16,
            draft_tokens,
            spec_max_batch: a.spec_max_batch,
        },
    )?;
    let state = AppState::new(
        engine,
        tok,
        ServeConfig {
            model_name: name.clone(),
            api_key: a.api_key.clone(),
            default_max_tokens: a.default_max_tokens.max(1),
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "fathom serve: model `{name}` on http://{addr} (chat page at /, OpenAI API at /v1){}",
            if a.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        fathom_serve::serve(listener, state, fathom_serve::shutdown_signal()).await?;
        eprintln!("fathom serve: stopped");
        Ok(())
    })
}
