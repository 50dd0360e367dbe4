//! `fathom`: run DeepSeek-family checkpoints from a Hugging Face directory.
//!
//! Subcommands: `generate` (stream a completion), `chat` (multi-turn REPL), `forward` (dump logits),
//! `inspect` (architecture, parameter counts, KV bytes per token), `bench`, `quantize` (→ GGUF),
//! `train` (pretraining), `tasks` (SFT data from task generators), `sft`, `grpo`, `distill`
//! (post-training), `tokenizer train`, `plot` (training curves). Without `--model`, the embedded default model at
//! `models/default/` is used. `--model` takes a Hugging Face directory, a GGUF file (llama.cpp's
//! `deepseek2`/`qwen2`/`llama`) or a directory `fathom quantize` wrote.

mod bench;
mod posttrain_cmds;
mod serve_cmd;
mod train_cmds;

// candle allocates a fresh buffer for every op; glibc malloc's trimming and page faults cost
// ~15 % of a training step on 2 cores (perf), mimalloc keeps freed pages for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fathom_core::{GgufCheckpoint, ModelConfig, TextTokenizer, WeightQuant};
use fathom_engine::{generate, GenerateOptions, Generation, SamplingParams};
use fathom_model::{param_counts, CausalLm};
use serde_json::json;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "fathom",
    version,
    about = "The DeepSeek recipe in Rust: run DeepSeek-V3/V2/R1, Qwen2 and Llama checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout.
    Generate(GenerateArgs),
    /// Interactive multi-turn chat using the model's chat template (`/reset`, `/exit`).
    Chat(ChatArgs),
    /// Write the full-sequence logits ([seq, vocab], f32 tensor `logits`) to a safetensors file.
    Forward {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Comma-separated input ids, e.g. 1,2,3.
        #[arg(long, value_parser = parse_ids)]
        token_ids: TokenIds,
        #[arg(long)]
        output: PathBuf,
    },
    /// Print the architecture, parameter counts and KV-cache bytes per token.
    Inspect {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Measure prefill / decode throughput, time to first token, peak RSS and KV bytes per token.
    Bench(bench::BenchArgs),
    /// Accuracy, format-reward rate and pass@k on freshly generated held-out problems.
    Eval(EvalArgs),
    /// Quantise a checkpoint's projections to a llama.cpp block format: writes OUT/model.gguf
    /// plus config and tokenizer files (loads anywhere a model directory is accepted).
    Quantize {
        #[arg(long)]
        model: Option<PathBuf>,
        /// q8_0, q6_k, q4_k or q4_0; or llama.cpp's mixtures q4_k_m / q5_k_m (q4_K / q5_K, with
        /// q6_K for lm_head and for the value and down projections of llama.cpp's chosen layers).
        #[arg(long, value_parser = fathom_model::quantize::QuantTarget::parse)]
        to: fathom_model::quantize::QuantTarget,
        #[arg(long)]
        out: PathBuf,
    },
    /// OpenAI-compatible HTTP server (chat/completions, streaming, R1 reasoning, tool calls,
    /// continuous batching, prefix cache) with a web chat page at `/`.
    Serve(serve_cmd::ServeArgs),
    /// Pretrain a DeepSeek-V3-architecture model (MLA, DeepSeekMoE, MTP) from a TOML config.
    Train(train_cmds::TrainArgs),
    /// Write SFT conversations or {"prompt", "answer"} lines from the task generators.
    Tasks(posttrain_cmds::TasksArgs),
    /// Supervised fine-tuning on chat conversations (loss on the final assistant turn, packing).
    Sft(posttrain_cmds::SftArgs),
    /// GRPO with rule-based rewards (accuracy + format) on a task, rollouts through the engine.
    Grpo(posttrain_cmds::GrpoArgs),
    /// Distil a teacher into a student: reward-filtered reasoning traces, or logit matching.
    Distill(posttrain_cmds::DistillArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(train_cmds::TokenizerCmd),
    /// Render a run's metrics.jsonl to a PNG (default RUN_DIR/metrics.png).
    Plot {
        run_dir: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Debug)]
struct TokenIds(Vec<u32>);

fn parse_ids(s: &str) -> std::result::Result<TokenIds, String> {
    let ids = s
        .split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .map_err(|_| format!("`{x}` is not a token id (expected e.g. 1,2,3)"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err("no token ids given".into());
    }
    Ok(TokenIds(ids))
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.6)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when this string appears (repeatable); it is not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// MTP speculative decoding: tokens the MTP modules draft per step (models with MTP modules;
    /// lossless). Default: one per module for models with dense main layers (1.5–1.9× measured),
    /// off for MoE models, where verified rows read other experts (0.88–0.96×); 0 = off.
    #[arg(long)]
    draft_tokens: Option<usize>,
    /// Never decode speculatively, whatever `--draft-tokens` says.
    #[arg(long)]
    no_spec: bool,
    /// MTP modules that draft, in order (default: all the model has); drafts past them reuse the
    /// last one recursively (1 = V3's single module reused, SGLang-style).
    #[arg(long)]
    draft_modules: Option<usize>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print `{"token_ids": [...], "text": ...}` instead of streaming text.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Print timing to stderr.
    #[arg(long)]
    verbose: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// arithmetic (operands up to 4 digits; arithmetic:N for up to N), countdown, or a JSONL file
    /// of {"prompt", "answer"} lines.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Problems to evaluate.
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per problem for pass@k (1: greedy).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Sampling temperature of the pass@k samples.
    #[arg(long, default_value_t = 0.6)]
    temperature: f64,
    /// System prompt: none (R1's recommendation), r1-zero (R1-Zero's instruction) or the text.
    #[arg(long, default_value = "none")]
    system: String,
    /// Worker threads (problems in parallel, candle single-threaded in each); 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, value_parser = parse_quant)]
    quant: Option<WeightQuant>,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(
        long,
        conflicts_with = "token_ids",
        required_unless_present = "token_ids"
    )]
    prompt: Option<String>,
    /// Comma-separated prompt ids instead of text.
    #[arg(long, value_parser = parse_ids)]
    token_ids: Option<TokenIds>,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Quantise projection weights while loading: q8_0, q6_k, q4_k, q4_0.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<WeightQuant>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    system: Option<String>,
    /// Run one turn from these prompt ids (no template) and exit.
    #[arg(long, value_parser = parse_ids)]
    token_ids: Option<TokenIds>,
    /// Quantise projection weights while loading: q8_0, q6_k, q4_k, q4_0.
    #[arg(long, value_parser = parse_quant)]
    quant: Option<WeightQuant>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// `--model`, else $FATHOM_MODEL, else `models/default` here or beside the binary's repo.
fn resolve_model(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        if !p.exists() {
            bail!("model {} does not exist", p.display());
        }
        return Ok(p.clone());
    }
    if let Ok(p) = std::env::var("FATHOM_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from("models/default")];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            candidates.push(dir.join("models/default"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default"));
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .context("no --model given and no embedded default model found at models/default")
}

struct Loaded {
    model: CausalLm,
    tok: Option<TextTokenizer>,
}

fn parse_quant(s: &str) -> std::result::Result<WeightQuant, String> {
    WeightQuant::parse(s)
}

fn load(dir: &Path) -> Result<Loaded> {
    load_with(dir, None)
}

/// Keep the first `n` MTP modules for drafting (`--draft-modules`).
fn limit_draft_modules(model: &mut CausalLm, n: Option<usize>) -> Result<()> {
    let Some(n) = n else { return Ok(()) };
    let have = model.mtp.len();
    if have == 0 {
        bail!("--draft-modules {n}: the model has no MTP modules to draft with");
    }
    if n == 0 || n > have {
        bail!(
            "--draft-modules {n}: the model has {have} MTP module(s); give 1 to {have} \
             (--no-spec turns speculation off)"
        );
    }
    model.mtp.truncate(n);
    Ok(())
}

fn load_with(path: &Path, quant: Option<WeightQuant>) -> Result<Loaded> {
    let model = CausalLm::load_quantized(path, DType::F32, &Device::Cpu, quant)?;
    let mut tok = load_tokenizer(path)?;
    if let Some(t) = &mut tok {
        t.add_eos_ids(&model.cfg.eos_token_ids);
    }
    Ok(Loaded { model, tok })
}

/// tokenizer.json in the model's directory (or beside its GGUF file), else the GGUF metadata.
fn load_tokenizer(path: &Path) -> Result<Option<TextTokenizer>> {
    let dir = if path.is_file() {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    if dir.join("tokenizer.json").is_file() {
        return Ok(Some(TextTokenizer::from_dir(dir)?));
    }
    match fathom_core::find_gguf(path) {
        Some(file) => Ok(Some(GgufCheckpoint::open(&file)?.tokenizer()?)),
        None => Ok(None),
    }
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    use fathom_train::evaluate::{evaluate, EvalOptions, TaskSource};
    let dir = resolve_model(&a.model)?;
    let l = load_with(&dir, a.quant)?;
    let tok = l
        .tok
        .as_ref()
        .with_context(|| format!("{}: eval needs a tokenizer", dir.display()))?;
    if tok.chat_template.is_none() {
        bail!("{}: eval needs a chat template", dir.display());
    }
    if a.n == 0 || a.k == 0 {
        bail!("--n and --k must be > 0");
    }
    let source = TaskSource::parse(&a.task);
    let problems = source
        .problems(a.n, a.seed, fathom_train::tasks::Split::HeldOut)
        .map_err(anyhow::Error::msg)?;
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    if a.format == Format::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let opts = EvalOptions {
        max_tokens: a.max_tokens,
        k: a.k,
        temperature: a.temperature,
        seed: a.seed,
        system: fathom_train::evaluate::system_prompt(&a.system),
    };
    let threads = fathom_train::posttrain::worker_threads(a.threads);
    let r = evaluate(&l.model, tok, &problems, &opts, threads, &|n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    if a.format == Format::Json {
        let mut v = serde_json::to_value(&r)?;
        v["task"] = json!(a.task);
        v["model"] = json!(dir.display().to_string());
        println!("{v}");
    } else {
        println!(
            "{} on {} held-out {} problems (seed {}): accuracy {:.1} %, format {:.1} %, pass@{} {:.1} %, {:.0} tokens per completion, {:.1} s",
            dir.display(),
            r.n,
            a.task,
            a.seed,
            100.0 * r.accuracy,
            100.0 * r.format_rate,
            r.k,
            100.0 * r.pass_at_k,
            r.mean_completion_tokens,
            r.seconds
        );
        for (q, c, ok) in &r.examples {
            println!(
                "\n[{}] {q}\n{}",
                if *ok { "correct" } else { "wrong" },
                c.trim()
            );
        }
    }
    Ok(())
}

fn cmd_quantize(
    model: Option<PathBuf>,
    to: fathom_model::quantize::QuantTarget,
    out: PathBuf,
) -> Result<()> {
    let dir = resolve_model(&model)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors  {msg}")
            .expect("template"),
    );
    let t0 = std::time::Instant::now();
    let r = fathom_model::quantize::quantize_checkpoint(&dir, to, &out, |done, total, name| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    println!(
        "{} → {} ({}): {} tensors, {} in {} ({} in another block format: rows not a multiple of the block, or a mixture's q6_K), {:.1} MB → {:.1} MB in {:.1} s",
        dir.display(),
        out.join("model.gguf").display(),
        to.name(),
        r.tensors,
        r.quantized,
        to.name(),
        r.fell_back,
        r.input_bytes as f64 / 1e6,
        r.output_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn eos_ids(l: &Loaded) -> Vec<u32> {
    match &l.tok {
        Some(t) => t.eos_ids.clone(),
        None => l.model.cfg.eos_token_ids.clone(),
    }
}

fn run_generation(
    l: &Loaded,
    prompt: &[u32],
    s: &SamplingArgs,
    stream: bool,
) -> Result<Generation> {
    let mut stdout = std::io::stdout();
    let mut on_text = |t: &str| {
        if stream {
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
    };
    run_generation_with(l, prompt, s, &mut on_text)
}

/// How `chat` shows a reply: R1's reasoning (between `<think>` and `</think>`, the opening tag
/// often pre-filled by the template) set apart from the answer — dimmed after a "thinking" label
/// on a terminal, under `[reasoning]` / `[answer]` labels otherwise.
struct ReplyPrinter {
    splitter: fathom_serve::reasoning::ReasoningSplitter,
    ansi: bool,
    /// 0: nothing shown yet, 1: inside reasoning, 2: inside the answer.
    section: u8,
}

impl ReplyPrinter {
    fn new(prefilled: bool) -> Self {
        ReplyPrinter {
            splitter: fathom_serve::reasoning::ReasoningSplitter::new(prefilled),
            ansi: std::io::IsTerminal::is_terminal(&std::io::stdout()),
            section: 0,
        }
    }

    fn show(&mut self, reasoning: &str, answer: &str) {
        let mut out = String::new();
        if !reasoning.is_empty() {
            if self.section == 0 {
                out.push_str(if self.ansi {
                    "\x1b[2mthinking: "
                } else {
                    "[reasoning]\n"
                });
                self.section = 1;
            }
            out.push_str(reasoning);
        }
        if !answer.is_empty() {
            if self.section < 2 {
                if self.section == 1 {
                    out.push_str(if self.ansi { "\x1b[0m\n" } else { "\n" });
                }
                if !self.ansi && self.section == 1 {
                    out.push_str("[answer]\n");
                }
                self.section = 2;
            }
            out.push_str(answer);
        }
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    fn push(&mut self, text: &str) {
        let (r, a) = self.splitter.push(text);
        self.show(&r, &a);
    }

    fn finish(&mut self) {
        let (r, a) = self.splitter.finish();
        self.show(&r, &a);
        if self.ansi && self.section == 1 {
            print!("\x1b[0m");
        }
        println!();
    }
}

fn run_generation_with(
    l: &Loaded,
    prompt: &[u32],
    s: &SamplingArgs,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let eos = eos_ids(l);
    let opts = GenerateOptions {
        params: s.params(),
        max_tokens: s.max_tokens,
        stop: &s.stop,
        ignore_eos: s.ignore_eos,
        eos_ids: &eos,
        draft_tokens: if s.no_spec {
            0
        } else {
            s.draft_tokens.unwrap_or_else(|| {
                fathom_engine::default_draft_tokens(&l.model.cfg, l.model.mtp.len())
            })
        },
    };
    let g = generate(&l.model, l.tok.as_ref(), prompt, &opts, on_text)?;
    if s.verbose {
        let n = g.token_ids.len().max(1);
        eprintln!(
            "\n[{} prompt tokens, prefill {:.1} ms; {} tokens in {:.2} s = {:.1} tok/s; finish {}]",
            g.prompt_tokens,
            g.prefill_secs * 1e3,
            g.token_ids.len(),
            g.decode_secs,
            n as f64 / g.decode_secs.max(1e-9),
            g.finish.as_str()
        );
        if let Some(spec) = &g.spec {
            eprintln!("[{}]", spec.summary());
        }
    }
    Ok(g)
}

fn print_json(g: &Generation) {
    println!(
        "{}",
        json!({"token_ids": g.token_ids, "text": g.text, "finish_reason": g.finish.as_str(), "prompt_tokens": g.prompt_tokens})
    );
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let dir = resolve_model(&a.model)?;
    let mut l = load_with(&dir, a.quant)?;
    limit_draft_modules(&mut l.model, a.sampling.draft_modules)?;
    let prompt: Vec<u32> = match (&a.token_ids, &a.prompt) {
        (Some(ids), _) => ids.0.clone(),
        (None, Some(text)) => {
            let tok = l.tok.as_ref().with_context(|| {
                format!("{}: no tokenizer.json; pass --token-ids", dir.display())
            })?;
            if a.chat {
                let mut msgs = vec![];
                if let Some(s) = &a.system {
                    msgs.push(json!({"role": "system", "content": s}));
                }
                msgs.push(json!({"role": "user", "content": text}));
                tok.apply_chat_template(&json!(msgs), None, true)?.1
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("give --prompt TEXT or --token-ids 1,2,3"),
    };
    let stream = a.sampling.format == Format::Text;
    let g = run_generation(&l, &prompt, &a.sampling, stream)?;
    if stream {
        println!();
    } else {
        print_json(&g);
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let dir = resolve_model(&a.model)?;
    let mut l = load_with(&dir, a.quant)?;
    limit_draft_modules(&mut l.model, a.sampling.draft_modules)?;
    let stream = a.sampling.format == Format::Text;
    if let Some(ids) = &a.token_ids {
        let g = run_generation(&l, &ids.0, &a.sampling, stream)?;
        if stream {
            println!();
        } else {
            print_json(&g);
        }
        return Ok(());
    }
    let tok = l
        .tok
        .as_ref()
        .with_context(|| format!("{}: chat needs tokenizer.json", dir.display()))?;
    if tok.chat_template.is_none() {
        bail!(
            "{}: tokenizer_config.json has no chat_template",
            dir.display()
        );
    }
    let mut history: Vec<serde_json::Value> = vec![];
    if let Some(s) = &a.system {
        history.push(json!({"role": "system", "content": s}));
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "fathom chat — {} ({}). /reset clears history, /exit quits.",
            dir.display(),
            l.model.cfg.arch.model_type()
        );
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m["role"] == "system");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": line}));
        let (text, ids) = tok.apply_chat_template(&json!(history), None, true)?;
        let g = if stream {
            let mut printer = ReplyPrinter::new(text.trim_end().ends_with("<think>"));
            let g = run_generation_with(&l, &ids, &a.sampling, &mut |t| printer.push(t))?;
            printer.finish();
            g
        } else {
            let g = run_generation(&l, &ids, &a.sampling, false)?;
            print_json(&g);
            g
        };
        history.push(json!({"role": "assistant", "content": g.text}));
    }
    Ok(())
}

fn cmd_forward(model: Option<PathBuf>, ids: TokenIds, output: PathBuf) -> Result<()> {
    let dir = resolve_model(&model)?;
    let l = load(&dir)?;
    let vocab = l.model.cfg.vocab_size as u32;
    if let Some(bad) = ids.0.iter().find(|&&t| t >= vocab) {
        bail!("token id {bad} is out of range: the vocabulary has {vocab} entries");
    }
    let x = Tensor::new(ids.0.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = l
        .model
        .forward(&x, 0, None)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let tmp = output.with_extension("safetensors.tmp");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("logits".to_string(), logits)]),
        &tmp,
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &output).with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

fn cmd_inspect(model: Option<PathBuf>, format: Format) -> Result<()> {
    let dir = resolve_model(&model)?;
    let gguf = fathom_core::find_gguf(&dir)
        .map(|f| GgufCheckpoint::open(&f))
        .transpose()?;
    let (cfg, store) = match &gguf {
        Some(g) => (g.model_config()?, None),
        None => (
            ModelConfig::from_path(&dir)?,
            Some(fathom_core::WeightStore::open(&dir)?),
        ),
    };
    let (total, active) = param_counts(&cfg);
    // Plain (expanded) cache stores 2·heads·head_dim per layer; MLA's latent cache stores
    // kv_lora_rank + qk_rope_head_dim (V2 §2.1.2). Reported at f32, the dtype Fathom caches in.
    let bytes_per_value = 4;
    let kv_bytes = cfg.kv_values_per_token_per_layer() * cfg.num_hidden_layers * bytes_per_value;
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut stored_params = 0usize;
    let mtp_name = format!("model.layers.{}.eh_proj.weight", cfg.num_hidden_layers);
    let mtp_stored = match (&store, &gguf) {
        (Some(store), _) => {
            for (_, (dt, shape)) in store.summary() {
                *dtypes.entry(format!("{dt:?}")).or_default() += 1;
                stored_params += shape.iter().product::<usize>();
            }
            store.contains(&mtp_name)
        }
        (None, Some(g)) => {
            for name in g.tensor_names() {
                let (dt, shape) = g.tensor_info(name).expect("listed tensor");
                *dtypes.entry(dt.name().to_uppercase()).or_default() += 1;
                stored_params += shape.iter().product::<usize>();
            }
            g.contains(&mtp_name)
        }
        (None, None) => unreachable!(),
    };
    let mtp_present = cfg.num_nextn_predict_layers > 0 && mtp_stored;
    let mut info = json!({
        "model": dir.display().to_string(),
        "architecture": cfg.arch.model_type(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "total_params": total,
        "active_params": active,
        "stored_tensor_elements": stored_params,
        "kv_bytes_per_token": kv_bytes,
        "kv_cache_dtype": "f32",
        "mtp_modules": if mtp_present { cfg.num_nextn_predict_layers } else { 0 },
        "tensor_dtypes": dtypes,
        "fp8_block": cfg.quantization.as_ref().map(|q| q.weight_block_size),
    });
    if let Some(m) = &cfg.mla {
        info["attention"] = json!({"kind": "MLA", "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim});
    } else {
        info["attention"] = json!({"kind": "GQA", "head_dim": cfg.head_dim});
    }
    if let Some(m) = &cfg.moe {
        info["moe"] = json!({"routed_experts": m.n_routed_experts, "shared_experts": m.n_shared_experts,
            "experts_per_token": m.num_experts_per_tok, "groups": m.n_group, "topk_group": m.topk_group,
            "topk_method": format!("{:?}", m.topk_method), "scoring": format!("{:?}", m.scoring_func),
            "first_k_dense_replace": m.first_k_dense_replace});
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model          {}", dir.display());
    println!(
        "architecture   {} ({} layers, hidden {}, {} heads, vocab {})",
        cfg.arch.model_type(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.vocab_size
    );
    println!("attention      {}", info["attention"]);
    if let Some(m) = info.get("moe") {
        println!("moe            {m}");
    }
    println!(
        "parameters     {} total, {} active per token",
        human(total),
        human(active)
    );
    println!("kv cache       {kv_bytes} bytes per token (f32)");
    println!("mtp modules    {}", info["mtp_modules"]);
    println!("tensor dtypes  {}", info["tensor_dtypes"]);
    Ok(())
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn main() {
    let cli = Cli::parse();
    let trains = matches!(
        cli.cmd,
        Command::Train(_)
            | Command::Sft(_)
            | Command::Grpo(_)
            | Command::Distill(_)
            | Command::Eval(_)
    );
    if trains && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Training parallelises over batch shards, one per core; candle's intra-op pool on top
        // would oversubscribe (tools/bench/train_speed.py). Set before candle's pools start.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    // Kernel threads for bench and serve (candle's pool, sized once, before any model code runs);
    // unset, candle uses every core.
    let kernel_threads = match &cli.cmd {
        Command::Bench(b) => b.threads,
        Command::Serve(a) => a.threads,
        _ => None,
    };
    if let Some(n) = kernel_threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle looks its thread count up on every CPU op, and with RAYON_NUM_THREADS unset
        // that lookup re-reads /proc/cpuinfo (candle-core 0.11.1 `utils::get_num_threads` →
        // `num_cpus::get_physical`): ~7 % of a decode step in a profile. Pin candle's own
        // default once, so the lookup is an environment read.
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
    let r = match cli.cmd {
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Forward {
            model,
            token_ids,
            output,
        } => cmd_forward(model, token_ids, output),
        Command::Inspect { model, format } => cmd_inspect(model, format),
        Command::Bench(b) => resolve_model(&b.model).and_then(|d| bench::cmd_bench(b, d)),
        Command::Quantize { model, to, out } => cmd_quantize(model, to, out),
        Command::Eval(a) => cmd_eval(a),
        Command::Serve(a) => serve_cmd::cmd_serve(a),
        Command::Train(a) => train_cmds::cmd_train(a),
        Command::Tokenizer(c) => train_cmds::cmd_tokenizer(c),
        Command::Tasks(a) => posttrain_cmds::cmd_tasks(a),
        Command::Sft(a) => {
            resolve_model(&a.model_arg()).and_then(|d| posttrain_cmds::cmd_sft(a, d))
        }
        Command::Grpo(a) => {
            resolve_model(&a.model_arg()).and_then(|d| posttrain_cmds::cmd_grpo(a, d))
        }
        Command::Distill(a) => posttrain_cmds::cmd_distill(a),
        Command::Plot { run_dir, out } => train_cmds::cmd_plot(run_dir, out),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
