//! The OpenAI request bodies, read field by field so that every error names the field at fault,
//! and the OpenAI-style error object (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fathom_engine::SamplingParams;
use serde_json::{json, Map, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_overloaded",
            param: None,
            code: Some("overloaded"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Typed access to a JSON object's optional fields; errors name the field.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn parse(body: &'a Value) -> ApiResult<Self> {
        body.as_object()
            .map(Fields)
            .ok_or_else(|| ApiError::invalid("the request body must be a JSON object", None))
    }

    /// The field, unless absent or null (OpenAI clients send null for "not set").
    pub fn value(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn f64(&self, name: &str) -> ApiResult<Option<f64>> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{name}` must be a number, got {v}"), Some(name))
            }),
        }
    }

    pub fn u64(&self, name: &str) -> ApiResult<Option<u64>> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ApiError::invalid(
                    format!("`{name}` must be a non-negative integer, got {v}"),
                    Some(name),
                )
            }),
        }
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                ApiError::invalid(
                    format!("`{name}` must be true or false, got {v}"),
                    Some(name),
                )
            }),
        }
    }

    pub fn str(&self, name: &str) -> ApiResult<Option<&'a str>> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                ApiError::invalid(format!("`{name}` must be a string, got {v}"), Some(name))
            }),
        }
    }

    /// `stop`: a string or an array of at most 4 strings.
    pub fn stop(&self) -> ApiResult<Vec<String>> {
        match self.value("stop") {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) if a.len() <= 4 => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("`stop` entries must be strings", Some("stop"))
                    })
                })
                .collect(),
            Some(_) => Err(ApiError::invalid(
                "`stop` must be a string or an array of up to 4 strings",
                Some("stop"),
            )),
        }
    }
}

/// The generation settings common to both endpoints.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Some(top) when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

pub fn parse_sampling(f: &Fields, chat: bool) -> ApiResult<Sampling> {
    let mut p = SamplingParams {
        temperature: 1.0, // OpenAI's default
        ..SamplingParams::default()
    };
    if let Some(t) = f.f64("temperature")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid(
                format!("`temperature` must be in [0, 2], got {t}"),
                Some("temperature"),
            ));
        }
        p.temperature = t;
    }
    if let Some(v) = f.f64("top_p")? {
        p.top_p = v;
    }
    if let Some(v) = f.f64("min_p")? {
        p.min_p = v;
    }
    match f.value("top_k") {
        // vLLM's convention: -1 (or 0) disables top-k.
        Some(v) if v.as_i64().is_some_and(|k| k <= 0) => {}
        Some(_) => p.top_k = f.u64("top_k")?.map(|k| k as usize),
        None => {}
    }
    if let Some(v) = f.f64("presence_penalty")? {
        p.presence_penalty = v;
    }
    if let Some(v) = f.f64("frequency_penalty")? {
        p.frequency_penalty = v;
    }
    if let Some(v) = f.f64("repetition_penalty")? {
        p.repetition_penalty = v;
    }
    match f.value("seed") {
        Some(v) => {
            p.seed = v
                .as_i64()
                .map(|s| s as u64)
                .or(v.as_u64())
                .ok_or_else(|| ApiError::invalid("`seed` must be an integer", Some("seed")))?
        }
        None => p.seed = rand_seed(),
    }
    p.validate().map_err(|m| {
        let field = m.split_whitespace().next().map(str::to_string);
        ApiError::invalid(m, field.as_deref())
    })?;
    let max_tokens = match f.u64("max_completion_tokens")? {
        Some(v) => Some(v),
        None => f.u64("max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    let n = f.u64("n")?.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(
            format!("`n` must be between 1 and 16, got {n}"),
            Some("n"),
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.value("stream_options") {
        Some(o) => o
            .get("include_usage")
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    ApiError::invalid(
                        "`stream_options.include_usage` must be true or false",
                        Some("stream_options"),
                    )
                })
            })
            .transpose()?
            .unwrap_or(false),
        None => false,
    };
    // Chat: `logprobs` is a bool and `top_logprobs` an int (0..=20); completions: `logprobs` int.
    let logprobs = if chat {
        let want = f.bool("logprobs")?.unwrap_or(false);
        let top = f.u64("top_logprobs")?;
        if top.is_some_and(|t| t > 20) {
            return Err(ApiError::invalid(
                "`top_logprobs` must be between 0 and 20",
                Some("top_logprobs"),
            ));
        }
        if top.is_some() && !want {
            return Err(ApiError::invalid(
                "`top_logprobs` needs `logprobs: true`",
                Some("top_logprobs"),
            ));
        }
        want.then(|| top.unwrap_or(0) as usize)
    } else {
        match f.u64("logprobs")? {
            Some(t) if t > 5 => {
                return Err(ApiError::invalid(
                    "`logprobs` must be between 0 and 5",
                    Some("logprobs"),
                ))
            }
            t => t.map(|t| t as usize),
        }
    };
    Ok(Sampling {
        params: p,
        max_tokens: max_tokens.map(|v| v as usize),
        stop: f.stop()?,
        n: n as usize,
        stream,
        include_usage,
        logprobs,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// A seed for requests that give none (distinct per request).
fn rand_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A message's `content` as text: a string, null, or an array of `{"type": "text", "text"}` parts.
pub fn content_text(v: Option<&Value>, at: &str) -> ApiResult<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{at}.content: only text parts are supported"),
                            Some("messages"),
                        ))
                    }
                }
            }
            Ok(Some(out))
        }
        Some(other) => Err(ApiError::invalid(
            format!("{at}.content must be a string or an array of text parts, got {other}"),
            Some("messages"),
        )),
    }
}
