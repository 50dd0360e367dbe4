//! The HTTP routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`, and the chat page at `/`. Requests become engine sequences
//! (`n` of them for `n` choices); their token events become OpenAI responses, streamed as
//! server-sent events (`stream: true`, ending with `data: [DONE]`) or collected.

use crate::api::{content_text, parse_sampling, ApiError, ApiResult, Fields, Sampling};
use crate::metrics::{render, ServerMetrics};
use crate::reasoning::{strip_reasoning, ReasoningSplitter};
use crate::tools::{tools_system_prompt, ToolCall, ToolCallParser, CALLS_BEGIN, CALL_BEGIN, SEP};
use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fathom_core::TextTokenizer;
use fathom_engine::{Engine, Event, FinishReason, Request, SubmitError, TokenLogprob};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const PAGE: &str = include_str!("../web/index.html");

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The id `/v1/models` lists and requests must name.
    pub model_name: String,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    pub api_key: Option<String>,
    /// max_tokens when a request gives none (capped by the context left after the prompt).
    pub default_max_tokens: usize,
}

pub struct AppState {
    pub engine: Engine,
    pub tok: Arc<TextTokenizer>,
    pub cfg: ServeConfig,
    pub metrics: ServerMetrics,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: Engine, tok: Arc<TextTokenizer>, cfg: ServeConfig) -> Arc<Self> {
        Arc::new(AppState {
            engine,
            tok,
            cfg,
            metrics: ServerMetrics::default(),
            created: unix_now(),
            next_id: AtomicU64::new(1),
        })
    }

    fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            self.created,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such route".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Bearer-key check for the API and metrics, and the response counters.
async fn guard(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let path = req.uri().path();
    let protected = path.starts_with("/v1/") || path == "/metrics";
    if let (Some(key), true) = (&st.cfg.api_key, protected) {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| given == key);
        if !ok {
            st.metrics
                .http_client_errors
                .fetch_add(1, Ordering::Relaxed);
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "Incorrect or missing API key: send `Authorization: Bearer KEY`".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    let api = path.starts_with("/v1/");
    let resp = next.run(req).await;
    if api {
        let counter = match resp.status().as_u16() {
            200..=299 => &st.metrics.http_ok,
            400..=499 => &st.metrics.http_client_errors,
            _ => &st.metrics.http_server_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&st.engine.metrics, &st.metrics),
    )
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.cfg.model_name, "object": "model", "created": st.created,
        "owned_by": "fathom", "max_model_len": st.engine.context_len,
    }]}))
}

/// vLLM's `/tokenize`: `{"prompt": TEXT}` (encoded as is) or `{"messages": [...]}` (through the
/// chat template with the generation prompt) → `{"tokens", "count", "max_model_len"}`.
async fn tokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let run = || -> ApiResult<Value> {
        let v = parse_body(&body)?;
        let f = Fields::parse(&v)?;
        let ids = match (f.str("prompt")?, f.value("messages")) {
            (Some(p), _) => st.tok.encode(p, false),
            (None, Some(m)) => st
                .tok
                .apply_chat_template(&Value::from(normalise_messages(m)?), None, true)
                .map(|(_, ids)| ids),
            (None, None) => {
                return Err(ApiError::invalid(
                    "give `prompt` or `messages`",
                    Some("prompt"),
                ))
            }
        }
        .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(json!({"count": ids.len(), "tokens": ids, "max_model_len": st.engine.context_len}))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn parse_body(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))
}

fn check_model(st: &AppState, f: &Fields) -> ApiResult<()> {
    match f.str("model")? {
        Some(m) if m != st.cfg.model_name => Err(ApiError::invalid(
            format!(
                "The model `{m}` does not exist; this server serves `{}`",
                st.cfg.model_name
            ),
            Some("model"),
        )
        .with_code("model_not_found")),
        _ => Ok(()),
    }
}

/// What a parsed request asks the engine for.
struct Job {
    prompt: Vec<u32>,
    sampling: Sampling,
    /// Chat: split reasoning (and whether the template opened the think block).
    reasoning: Option<bool>,
    /// Chat with tools: parse tool calls; text the server pre-filled to force a call.
    tools: Option<String>,
    chat: bool,
    echo: Option<String>,
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    match chat_job(&st, &body) {
        Ok(job) => run_job(st, job, started).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let started = Instant::now();
    match completion_job(&st, &body) {
        Ok(job) => run_job(st, job, started).await,
        Err(e) => e.into_response(),
    }
}

/// OpenAI messages → the template's messages: text content, earlier reasoning dropped, tool-call
/// arguments as JSON text.
fn normalise_messages(raw: &Value) -> ApiResult<Vec<Value>> {
    let list = raw.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
        ApiError::invalid("`messages` must be a non-empty array", Some("messages"))
    })?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(format!("{at}.role is missing"), Some("messages"))
            })?;
            let role = match role {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::invalid(
                        format!("{at}.role `{other}` is not one of system, developer, user, assistant, tool"),
                        Some("messages"),
                    ))
                }
            };
            let content = content_text(m.get("content"), &at)?;
            let mut out = json!({"role": role});
            match role {
                "assistant" => {
                    // reasoning_content of earlier turns is not sent back to the model.
                    out["content"] = content.as_deref().map(strip_reasoning).map(Value::from).unwrap_or(Value::Null);
                    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                        let calls: Vec<Value> = calls
                            .iter()
                            .map(|c| {
                                let f = c.get("function").cloned().unwrap_or(json!({}));
                                let args = match f.get("arguments") {
                                    Some(Value::String(s)) => s.clone(),
                                    Some(other) => other.to_string(),
                                    None => "{}".into(),
                                };
                                json!({"type": "function", "id": c.get("id"), "function": {
                                    "name": f.get("name").and_then(Value::as_str).unwrap_or(""),
                                    "arguments": args}})
                            })
                            .collect();
                        out["tool_calls"] = Value::from(calls);
                    } else if content.is_none() {
                        out["content"] = Value::from("");
                    }
                }
                _ => {
                    out["content"] = Value::from(content.ok_or_else(|| {
                        ApiError::invalid(format!("{at}.content is missing"), Some("messages"))
                    })?);
                }
            }
            if let Some(id) = m.get("tool_call_id") {
                out["tool_call_id"] = id.clone();
            }
            Ok(out)
        })
        .collect()
}

fn chat_job(st: &AppState, body: &Bytes) -> ApiResult<Job> {
    let v = parse_body(body)?;
    let f = Fields::parse(&v)?;
    check_model(st, &f)?;
    let sampling = parse_sampling(&f, true)?;
    let mut messages = normalise_messages(
        f.value("messages")
            .ok_or_else(|| ApiError::invalid("`messages` is required", Some("messages")))?,
    )?;
    let tools: Vec<Value> = match f.value("tools") {
        None => vec![],
        Some(Value::Array(a)) => {
            for (i, t) in a.iter().enumerate() {
                if t.pointer("/function/name")
                    .and_then(Value::as_str)
                    .is_none()
                {
                    return Err(ApiError::invalid(
                        format!("tools[{i}].function.name is missing"),
                        Some("tools"),
                    ));
                }
            }
            a.clone()
        }
        Some(_) => return Err(ApiError::invalid("`tools` must be an array", Some("tools"))),
    };
    // tool_choice: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}.
    let forced: Option<Option<String>> =
        match f.value("tool_choice") {
            None => None,
            Some(Value::String(s)) if s == "auto" => None,
            Some(Value::String(s)) if s == "none" => Some(None),
            Some(Value::String(s)) if s == "required" => Some(Some(String::new())),
            Some(o) => match o.pointer("/function/name").and_then(Value::as_str) {
                Some(name)
                    if tools
                        .iter()
                        .any(|t| t.pointer("/function/name") == Some(&Value::from(name))) =>
                {
                    Some(Some(name.to_string()))
                }
                _ => return Err(ApiError::invalid(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or name one of `tools`",
                    Some("tool_choice"),
                )),
            },
        };
    let use_tools = !tools.is_empty() && forced != Some(None);
    if forced.as_ref().is_some_and(|f| f.is_some()) && tools.is_empty() {
        return Err(ApiError::invalid(
            "`tool_choice` needs `tools`",
            Some("tool_choice"),
        ));
    }
    if use_tools {
        // R1's template does not render `tools`: describe them in the system prompt.
        let section = tools_system_prompt(&tools);
        match messages.iter_mut().find(|m| m["role"] == "system") {
            Some(sys) => {
                let text = format!("{}\n\n{section}", sys["content"].as_str().unwrap_or(""));
                sys["content"] = Value::from(text);
            }
            None => messages.insert(0, json!({"role": "system", "content": section})),
        }
    }
    let (mut text, _) = st
        .tok
        .apply_chat_template(&Value::from(messages), None, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let think_prefilled = text.trim_end_matches('\n').ends_with("<think>");
    // A required or named tool: pre-fill the start of the call so the model writes its arguments.
    let mut prefill = String::new();
    if let Some(Some(name)) = &forced {
        if think_prefilled {
            prefill.push_str("</think>\n\n");
        }
        prefill.push_str(&format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}"));
        if !name.is_empty() {
            prefill.push_str(&format!("{name}\n```json\n"));
        }
        text.push_str(&prefill);
    }
    let prompt = st
        .tok
        .encode(&text, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Job {
        prompt,
        sampling,
        reasoning: Some(think_prefilled),
        tools: use_tools.then_some(prefill),
        chat: true,
        echo: None,
    })
}

fn completion_job(st: &AppState, body: &Bytes) -> ApiResult<Job> {
    let v = parse_body(body)?;
    let f = Fields::parse(&v)?;
    check_model(st, &f)?;
    let sampling = parse_sampling(&f, false)?;
    let bad = || {
        ApiError::invalid(
            "`prompt` must be a string, an array of token ids, or a one-element array of either",
            Some("prompt"),
        )
    };
    let ids_of = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|x| x.as_u64().map(|t| t as u32).ok_or_else(bad))
            .collect()
    };
    let encode = |s: &str| {
        st.tok
            .encode(s, st.tok.add_bos)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    let prompt = match f
        .value("prompt")
        .ok_or_else(|| ApiError::invalid("`prompt` is required", Some("prompt")))?
    {
        Value::String(s) => encode(s)?,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => encode(a[0].as_str().unwrap_or(""))?,
        Value::Array(a) if a.len() == 1 && a[0].is_array() => {
            ids_of(a[0].as_array().map(Vec::as_slice).unwrap_or(&[]))?
        }
        Value::Array(a) if a.iter().all(Value::is_u64) => ids_of(a)?,
        _ => return Err(bad()),
    };
    let echo = if f.bool("echo")?.unwrap_or(false) {
        Some(
            st.tok
                .decode(&prompt, false)
                .map_err(|e| ApiError::internal(e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Job {
        prompt,
        sampling,
        reasoning: None,
        tools: None,
        chat: false,
        echo,
    })
}

/// One choice's text as it streams: reasoning split, tool calls parsed, logprobs kept.
struct Choice {
    splitter: Option<ReasoningSplitter>,
    tools: Option<ToolCallParser>,
    reasoning: String,
    content: String,
    calls: Vec<Value>,
    logprobs: Vec<Value>,
    tokens: usize,
    finish: Option<&'static str>,
    call_prefix: String,
}

#[derive(Default)]
struct Delta {
    reasoning: String,
    content: String,
    calls: Vec<Value>,
    logprobs: Vec<Value>,
}

impl Delta {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty()
            && self.content.is_empty()
            && self.calls.is_empty()
            && self.logprobs.is_empty()
    }
}

impl Choice {
    fn new(job: &Job, call_prefix: String) -> Self {
        let mut c = Choice {
            splitter: job.reasoning.map(ReasoningSplitter::new),
            tools: job.tools.as_ref().map(|_| ToolCallParser::default()),
            reasoning: String::new(),
            content: String::new(),
            calls: vec![],
            logprobs: vec![],
            tokens: 0,
            finish: None,
            call_prefix,
        };
        if let Some(prefill) = &job.tools {
            c.feed(prefill); // nothing visible comes out of the pre-filled markup
        }
        c
    }

    /// A generated token: counted, its log-probabilities kept (and in the delta), its text fed.
    fn token(
        &mut self,
        tok: &TextTokenizer,
        id: u32,
        text: &str,
        logprob: Option<TokenLogprob>,
    ) -> Delta {
        self.tokens += 1;
        let mut d = self.feed(text);
        if let Some(lp) = logprob {
            let entry = logprob_entry(tok, id, &lp);
            self.logprobs.push(entry.clone());
            d.logprobs.push(entry);
        }
        d
    }

    fn feed(&mut self, text: &str) -> Delta {
        let mut d = Delta::default();
        let (reasoning, answer) = match &mut self.splitter {
            Some(s) => s.push(text),
            None => (String::new(), text.to_string()),
        };
        d.reasoning = reasoning;
        self.answer(answer, &mut d);
        self.keep(&d);
        d
    }

    fn answer(&mut self, text: String, d: &mut Delta) {
        match &mut self.tools {
            Some(p) => {
                let (content, calls) = p.push(&text);
                d.content.push_str(&content);
                self.add_calls(calls, d);
            }
            None => d.content.push_str(&text),
        }
    }

    fn add_calls(&mut self, calls: Vec<ToolCall>, d: &mut Delta) {
        for call in calls {
            let index = self.calls.len() + d.calls.len();
            d.calls.push(
                json!({"index": index, "id": format!("{}_{index}", self.call_prefix),
                "type": "function", "function": {"name": call.name, "arguments": call.arguments}}),
            );
        }
    }

    fn keep(&mut self, d: &Delta) {
        self.reasoning.push_str(&d.reasoning);
        self.content.push_str(&d.content);
        self.calls.extend(d.calls.iter().cloned());
    }

    fn finish(&mut self, reason: FinishReason, tail: &str) -> Delta {
        let mut d = self.feed(tail);
        let (reasoning, answer) = match &mut self.splitter {
            Some(s) => s.finish(),
            None => (String::new(), String::new()),
        };
        let mut more = Delta {
            reasoning,
            ..Default::default()
        };
        self.answer(answer, &mut more);
        if let Some(p) = &mut self.tools {
            more.content.push_str(&p.finish());
        }
        self.keep(&more);
        d.reasoning.push_str(&more.reasoning);
        d.content.push_str(&more.content);
        d.calls.extend(more.calls);
        self.finish = Some(if !self.calls.is_empty() {
            "tool_calls"
        } else {
            reason.as_str()
        });
        d
    }
}

fn logprob_entry(tok: &TextTokenizer, id: u32, lp: &TokenLogprob) -> Value {
    let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
    let entry = |id: u32, logprob: f32| {
        let t = text(id);
        json!({"token": t, "logprob": logprob, "bytes": t.as_bytes()})
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
    e
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}})
}

/// Submit the job's `n` sequences and answer, streaming or not.
async fn run_job(st: Arc<AppState>, job: Job, started: Instant) -> Response {
    let ctx = st.engine.context_len;
    if job.prompt.len() >= ctx {
        return ApiError::invalid(
            format!(
                "This model's maximum context length is {ctx} tokens; the prompt has {} tokens",
                job.prompt.len()
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded")
        .into_response();
    }
    let max_tokens = job
        .sampling
        .max_tokens
        .unwrap_or(st.cfg.default_max_tokens.min(ctx - job.prompt.len()));
    let mut receivers = vec![];
    for i in 0..job.sampling.n {
        let mut params = job.sampling.params.clone();
        params.seed = params.seed.wrapping_add(i as u64);
        let req = Request {
            prompt: job.prompt.clone(),
            params,
            max_tokens,
            stop: job.sampling.stop.clone(),
            eos_ids: st.tok.eos_ids.clone(),
            ignore_eos: job.sampling.ignore_eos,
            logprobs: job.sampling.logprobs,
        };
        match st.engine.submit(req) {
            Ok(rx) => receivers.push(rx),
            Err(e) => {
                return match e {
                    SubmitError::Invalid(m) => {
                        let code = m
                            .contains("context length")
                            .then_some("context_length_exceeded");
                        let mut err = ApiError::invalid(m, Some("max_tokens"));
                        err.code = code;
                        err
                    }
                    SubmitError::QueueFull(_) | SubmitError::Stopped => {
                        ApiError::overloaded(e.to_string())
                    }
                }
                .into_response()
            }
        }
    }
    let id = st.new_id(if job.chat { "chatcmpl" } else { "cmpl" });
    if job.sampling.stream {
        stream_job(st, job, receivers, id, started).into_response()
    } else {
        collect_job(st, job, receivers, id, started).await
    }
}

/// Timing of one request's tokens for the latency histograms.
struct Timing {
    started: Instant,
    last: Option<Instant>,
}

impl Timing {
    fn token(&mut self, m: &ServerMetrics) {
        let now = Instant::now();
        match self.last {
            None => m.ttft.observe((now - self.started).as_secs_f64()),
            Some(t) => m.inter_token.observe((now - t).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

fn completion_logprobs(entries: &[Value]) -> Value {
    let mut offset = 0;
    let mut offsets = vec![];
    for e in entries {
        offsets.push(offset);
        offset += e["token"].as_str().map_or(0, str::len);
    }
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            let mut m = serde_json::Map::new();
            for t in e["top_logprobs"].as_array().into_iter().flatten() {
                m.insert(t["token"].as_str().unwrap_or("").to_string(), t["logprob"].clone());
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

async fn collect_job(
    st: Arc<AppState>,
    job: Job,
    receivers: Vec<UnboundedReceiver<Event>>,
    id: String,
    started: Instant,
) -> Response {
    let mut choices = vec![];
    let (mut completion, mut cached) = (0, 0);
    let mut timing = Timing {
        started,
        last: None,
    };
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let mut c = Choice::new(&job, format!("call_{id}_{i}"));
        loop {
            match rx.recv().await {
                Some(Event::Started { cached_tokens }) => cached = cached.max(cached_tokens),
                Some(Event::Token {
                    id: t,
                    text,
                    logprob,
                }) => {
                    if i == 0 {
                        timing.token(&st.metrics);
                    }
                    c.token(&st.tok, t, &text, logprob);
                }
                Some(Event::Finished { reason, text, .. }) => {
                    c.finish(reason, &text);
                    break;
                }
                Some(Event::Error(e)) => return ApiError::internal(e).into_response(),
                None => {
                    return ApiError::internal("the engine dropped the request").into_response()
                }
            }
        }
        completion += c.tokens;
        choices.push(c);
    }
    st.metrics.e2e.observe(started.elapsed().as_secs_f64());
    let logprobs_wanted = job.sampling.logprobs.is_some();
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            if job.chat {
                let mut message = json!({"role": "assistant", "content": c.content});
                if job.reasoning.is_some() {
                    message["reasoning_content"] = Value::from(c.reasoning);
                }
                if !c.calls.is_empty() {
                    message["tool_calls"] = Value::from(c.calls);
                    if message["content"] == "" {
                        message["content"] = Value::Null;
                    }
                }
                json!({"index": i, "message": message, "finish_reason": c.finish,
                    "logprobs": if logprobs_wanted { json!({"content": c.logprobs}) } else { Value::Null }})
            } else {
                let text = format!("{}{}", job.echo.as_deref().unwrap_or(""), c.content);
                json!({"index": i, "text": text, "finish_reason": c.finish,
                    "logprobs": if logprobs_wanted { completion_logprobs(&c.logprobs) } else { Value::Null }})
            }
        })
        .collect();
    Json(json!({
        "id": id,
        "object": if job.chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": st.cfg.model_name,
        "system_fingerprint": concat!("fathom-", env!("CARGO_PKG_VERSION")),
        "choices": choices,
        "usage": usage(job.prompt.len(), completion, cached),
    }))
    .into_response()
}

fn stream_job(
    st: Arc<AppState>,
    job: Job,
    receivers: Vec<UnboundedReceiver<Event>>,
    id: String,
    started: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let (merged_tx, mut merged) = unbounded_channel::<(usize, Event)>();
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => if tx.send((i, ev)).is_err() { break },
                        None => break,
                    },
                    // The client went away: drop the engine receiver so the sequence is freed.
                    _ = tx.closed() => break,
                }
            }
        });
    }
    drop(merged_tx);
    tokio::spawn(async move {
        let n = job.sampling.n;
        let created = unix_now();
        let object = if job.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let with_usage = job.sampling.include_usage;
        let chunk = |choices: Value, usage_v: Option<Value>| {
            let mut c = json!({"id": id, "object": object, "created": created,
                "model": st.cfg.model_name, "choices": choices,
                "system_fingerprint": concat!("fathom-", env!("CARGO_PKG_VERSION"))});
            if with_usage {
                c["usage"] = usage_v.unwrap_or(Value::Null);
            }
            SseEvent::default().data(c.to_string())
        };
        let mut choices: Vec<Choice> = (0..n)
            .map(|i| Choice::new(&job, format!("call_{id}_{i}")))
            .collect();
        let mut timing = Timing {
            started,
            last: None,
        };
        let (mut cached, mut open) = (0, n);
        let send = |ev: SseEvent| {
            let tx = body_tx.clone();
            async move { tx.send(Ok(ev)).await.is_ok() }
        };
        if job.chat {
            for i in 0..n {
                let first = json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]);
                if !send(chunk(first, None)).await {
                    st.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut first_text = job.echo.clone();
        while open > 0 {
            let Some((i, ev)) = merged.recv().await else {
                break;
            };
            let c = &mut choices[i];
            let (delta, finish) = match ev {
                Event::Started { cached_tokens } => {
                    cached = cached.max(cached_tokens);
                    continue;
                }
                Event::Token {
                    id: t,
                    text,
                    logprob,
                } => {
                    if i == 0 {
                        timing.token(&st.metrics);
                    }
                    let d = c.token(&st.tok, t, &text, logprob);
                    (d, None)
                }
                Event::Finished { reason, text, .. } => {
                    open -= 1;
                    let d = c.finish(reason, &text);
                    (d, c.finish)
                }
                Event::Error(e) => {
                    let err = ApiError::internal(e).body();
                    let _ = send(SseEvent::default().data(err.to_string())).await;
                    return;
                }
            };
            if delta.is_empty() && finish.is_none() {
                continue;
            }
            let body = if job.chat {
                let mut d = json!({});
                if !delta.content.is_empty() {
                    d["content"] = Value::from(delta.content);
                }
                if !delta.reasoning.is_empty() {
                    d["reasoning_content"] = Value::from(delta.reasoning);
                }
                if !delta.calls.is_empty() {
                    d["tool_calls"] = Value::from(delta.calls);
                }
                let lp = if delta.logprobs.is_empty() {
                    Value::Null
                } else {
                    json!({"content": delta.logprobs})
                };
                json!([{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}])
            } else {
                let text = format!("{}{}", first_text.take().unwrap_or_default(), delta.content);
                let lp = if delta.logprobs.is_empty() {
                    Value::Null
                } else {
                    completion_logprobs(&delta.logprobs)
                };
                json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}])
            };
            if !send(chunk(body, None)).await {
                st.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        st.metrics.e2e.observe(started.elapsed().as_secs_f64());
        if with_usage {
            let completion: usize = choices.iter().map(|c| c.tokens).sum();
            let u = usage(job.prompt.len(), completion, cached);
            let _ = send(chunk(json!([]), Some(u))).await;
        }
        let _ = send(SseEvent::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Sse::new(stream)
}
