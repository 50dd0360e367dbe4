//! `fathom serve` end to end: a server on a random loopback port, driven over raw HTTP/1.1 (so a
//! test can hang up mid-stream), checked against the engine's own greedy decode.

use candle_core::{DType, Device, Tensor};
use fathom_core::TextTokenizer;
use fathom_engine::{generate, Engine, GenerateOptions, SamplingParams, SchedulerConfig};
use fathom_model::CausalLm;
use fathom_serve::reasoning::split_reasoning;
use fathom_serve::{AppState, ServeConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    model: Arc<CausalLm>,
    tok: Arc<TextTokenizer>,
}

fn start(dir: &Path, api_key: Option<&str>, cfg: SchedulerConfig) -> Server {
    let model = Arc::new(CausalLm::load(dir, DType::F32, &Device::Cpu).unwrap());
    let mut tok = TextTokenizer::from_dir(dir).unwrap();
    tok.add_eos_ids(&model.cfg.eos_token_ids);
    let tok = Arc::new(tok);
    let engine = Engine::start(model.clone(), Some(tok.clone()), cfg).unwrap();
    let state = AppState::new(
        engine,
        tok.clone(),
        ServeConfig {
            model_name: "default".into(),
            api_key: api_key.map(str::to_string),
            default_max_tokens: 64,
        },
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let st = state.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            fathom_serve::serve(l, st, std::future::pending())
                .await
                .unwrap();
        });
    });
    Server {
        addr: rx.recv().unwrap(),
        state,
        model,
        tok,
    }
}

/// Send a request; returns the open reader positioned at the body, the status and headers.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut hs = vec![];
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        hs.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, hs, r)
}

/// The whole body (chunked or not) as text.
fn read_body(hs: &[(String, String)], mut r: BufReader<TcpStream>) -> String {
    let chunked = hs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut out = vec![];
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n + 2];
            r.read_exact(&mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
    } else if let Some((_, n)) = hs.iter().find(|(k, _)| k == "content-length") {
        out = vec![0; n.parse().unwrap()];
        r.read_exact(&mut out).unwrap();
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    String::from_utf8(out).unwrap()
}

fn call(srv: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, hs, r) = send(srv.addr, method, path, &[], body);
    (status, read_body(&hs, r))
}

fn post(srv: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = call(srv, "POST", path, &body.to_string());
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// SSE `data:` payloads of a streamed response, up to and including `[DONE]`.
fn stream(srv: &Server, path: &str, body: Value) -> Vec<String> {
    let (status, hs, r) = send(srv.addr, "POST", path, &[], &body.to_string());
    assert_eq!(status, 200);
    assert!(hs
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    read_body(&hs, r)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn greedy_text(srv: &Server, messages: Value, max_tokens: usize) -> String {
    let (_, ids) = srv.tok.apply_chat_template(&messages, None, true).unwrap();
    let opts = GenerateOptions {
        params: SamplingParams::default(),
        max_tokens,
        stop: &[],
        ignore_eos: false,
        eos_ids: &srv.tok.eos_ids,
        draft_tokens: 0,
    };
    generate(&srv.model, Some(&srv.tok), &ids, &opts, &mut |_| {})
        .unwrap()
        .text
}

#[test]
fn chat_matches_the_engine_streamed_or_not() {
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let messages = json!([{"role": "user", "content": "What is 12 + 35?"}]);
    let (status, v) = post(
        &srv,
        "/v1/chat/completions",
        json!({"model": "default", "messages": messages, "temperature": 0, "max_tokens": 48}),
    );
    assert_eq!(status, 200, "{v}");
    let want = greedy_text(&srv, messages.clone(), 48);
    let (reasoning, content) = split_reasoning(&want, true);
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["reasoning_content"], reasoning.as_str());
    assert_eq!(msg["content"], content.as_str());
    assert_eq!(v["object"], "chat.completion");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 48);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same request streamed: the deltas add up to the same message.
    let events = stream(
        &srv,
        "/v1/chat/completions",
        json!({"model": "default", "messages": messages, "temperature": 0, "max_tokens": 48,
               "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (mut r, mut c, mut finish) = (String::new(), String::new(), Value::Null);
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        for choice in ch["choices"].as_array().unwrap() {
            r.push_str(choice["delta"]["reasoning_content"].as_str().unwrap_or(""));
            c.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finish = choice["finish_reason"].clone();
            }
        }
    }
    assert_eq!(
        (r.as_str(), c.as_str()),
        (reasoning.as_str(), content.as_str())
    );
    assert_eq!(finish, v["choices"][0]["finish_reason"]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], completion);

    // Earlier reasoning is not sent back: a turn with and without it renders the same prompt.
    let with = json!([{"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>secret</think>\n\nhello", "reasoning_content": "secret"},
        {"role": "user", "content": "again"}]);
    let without = json!([{"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]);
    let a = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": with, "max_tokens": 1}),
    )
    .1;
    let b = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": without, "max_tokens": 1}),
    )
    .1;
    assert_eq!(a["usage"]["prompt_tokens"], b["usage"]["prompt_tokens"]);

    // Models, health, metrics.
    let (s, models) = call(&srv, "GET", "/v1/models", "");
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"],
        "default"
    );
    assert_eq!(call(&srv, "GET", "/health", "").0, 200);
    let (s, metrics) = call(&srv, "GET", "/metrics", "");
    assert_eq!(s, 200);
    for name in [
        "fathom_requests_total",
        "fathom_generation_tokens_total",
        "fathom_requests_waiting",
        "fathom_prompt_cached_tokens_total",
        "fathom_time_to_first_token_seconds_bucket",
        "fathom_inter_token_latency_seconds_count",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let (s, page) = call(&srv, "GET", "/", "");
    assert_eq!(s, 200);
    assert!(page.contains("/v1/chat/completions") && !page.contains("https://"));
}

#[test]
fn bad_requests_get_openai_errors() {
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let check = |body: &str, want_status: u16, fragment: &str| {
        let (status, text) = call(&srv, "POST", "/v1/chat/completions", body);
        assert_eq!(status, want_status, "{body} → {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(fragment), "{body}: `{msg}` lacks `{fragment}`");
        assert!(v["error"]["type"].is_string());
    };
    let user = r#"[{"role":"user","content":"hi"}]"#;
    check("{not json", 400, "not valid JSON");
    check("[1,2]", 400, "JSON object");
    check(
        &format!(r#"{{"model":"gpt-4","messages":{user}}}"#),
        400,
        "`gpt-4` does not exist",
    );
    check(r#"{"model":"default"}"#, 400, "`messages` is required");
    check(r#"{"messages":[]}"#, 400, "non-empty");
    check(
        r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
        400,
        "wizard",
    );
    check(
        &format!(r#"{{"messages":{user},"temperature":3}}"#),
        400,
        "temperature",
    );
    check(
        &format!(r#"{{"messages":{user},"temperature":"hot"}}"#),
        400,
        "temperature",
    );
    check(&format!(r#"{{"messages":{user},"n":0}}"#), 400, "`n`");
    check(
        &format!(r#"{{"messages":{user},"max_tokens":-1}}"#),
        400,
        "max_tokens",
    );
    check(
        &format!(r#"{{"messages":{user},"top_logprobs":3}}"#),
        400,
        "logprobs",
    );
    check(&format!(r#"{{"messages":{user},"stop":7}}"#), 400, "stop");
    check(
        &format!(r#"{{"messages":{user},"tool_choice":"required"}}"#),
        400,
        "tools",
    );
    check(
        &format!(r#"{{"messages":{user},"max_tokens":100000}}"#),
        400,
        "context length",
    );
    let long = "word ".repeat(2000);
    let (status, v) = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": long}]}),
    );
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (status, _) = call(&srv, "GET", "/v1/nothing", "");
    assert_eq!(status, 404);
    let (status, v) = post(&srv, "/v1/completions", json!({"prompt": {"x": 1}}));
    assert_eq!(status, 400, "{v}");
    // The server still works.
    let (status, _) = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(status, 200);
}

#[test]
fn api_key_guards_the_api_only() {
    let srv = start(&default_model(), Some("sekrit"), SchedulerConfig::default());
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    let (status, hs, r) = send(srv.addr, "POST", "/v1/chat/completions", &[], &body);
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&read_body(&hs, r)).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(
        send(srv.addr, "POST", "/v1/chat/completions", &wrong, &body).0,
        401
    );
    let right = [("Authorization", "Bearer sekrit")];
    assert_eq!(
        send(srv.addr, "POST", "/v1/chat/completions", &right, &body).0,
        200
    );
    assert_eq!(send(srv.addr, "GET", "/metrics", &[], "").0, 401);
    assert_eq!(send(srv.addr, "GET", "/health", &[], "").0, 200);
    assert_eq!(send(srv.addr, "GET", "/", &[], "").0, 200);
}

#[test]
fn shared_prefixes_hit_the_cache_and_are_reported() {
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let system =
        "You are a careful assistant who checks every sum twice before answering. ".repeat(3);
    let ask = |q: &str| {
        post(
            &srv,
            "/v1/chat/completions",
            json!({"temperature": 0, "max_tokens": 8,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}),
        )
        .1
    };
    let first = ask("What is 2 + 2?");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let second = ask("What is 3 + 5?");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= 16,
        "the shared system prompt is served from the cache: {second}"
    );
    assert!(cached < second["usage"]["prompt_tokens"].as_u64().unwrap());
    let (_, metrics) = call(&srv, "GET", "/metrics", "");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("fathom_prompt_cached_tokens_total "))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(1).unwrap(), cached.to_string());
}

#[test]
fn a_client_that_hangs_up_frees_its_sequence() {
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": 400, "ignore_eos": true, "stream": true});
    let (status, _, mut r) = send(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        &body.to_string(),
    );
    assert_eq!(status, 200);
    let mut line = String::new();
    // The template pre-fills <think>: the first generated text is reasoning.
    while !line.contains("reasoning_content") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    let m = &srv.state.engine.metrics;
    let t0 = std::time::Instant::now();
    while m.running.load(Ordering::Relaxed) != 1 {
        assert!(
            t0.elapsed().as_secs() < 20,
            "the sequence never showed as running"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(r); // hang up mid-stream
    while m.running.load(Ordering::Relaxed) != 0 {
        assert!(t0.elapsed().as_secs() < 20, "the sequence is still running");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(m.generated_tokens.load(Ordering::Relaxed) < 400);
    assert_eq!(srv.state.metrics.disconnects.load(Ordering::Relaxed), 1);
}

#[test]
fn over_capacity_requests_get_503_not_oom() {
    let srv = start(
        &default_model(),
        None,
        SchedulerConfig {
            max_seqs: 1,
            max_queue: 1,
            ..Default::default()
        },
    );
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
        "ignore_eos": true, "stream": true})
    .to_string();
    // Three streams at once: one runs, one waits, the third is refused.
    let mut open = vec![];
    let mut refused = 0;
    for _ in 0..3 {
        let (status, hs, r) = send(srv.addr, "POST", "/v1/chat/completions", &[], &body);
        if status == 503 {
            refused += 1;
            let v: Value = serde_json::from_str(&read_body(&hs, r)).unwrap();
            assert_eq!(v["error"]["code"], "overloaded");
            assert!(hs.iter().any(|(k, _)| k == "retry-after"));
        } else {
            assert_eq!(status, 200);
            open.push((hs, r));
        }
    }
    assert!(refused >= 1);
    for (hs, r) in open {
        assert!(read_body(&hs, r).ends_with("data: [DONE]\n\n"));
    }
}

#[test]
fn completions_endpoint_with_echo_logprobs_and_n() {
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let (status, v) = post(
        &srv,
        "/v1/completions",
        json!({"model": "default", "prompt": "To be, or not",
        "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("To be, or not"));
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    // n = 3 sampled choices with a seed: reproducible.
    let body = json!({"prompt": [5, 9, 11], "max_tokens": 5, "temperature": 1.0, "n": 3, "seed": 42, "ignore_eos": true});
    let a = post(&srv, "/v1/completions", body.clone()).1;
    let b = post(&srv, "/v1/completions", body).1;
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"]["completion_tokens"], 15);
    // Chat logprobs: OpenAI's content list.
    let (_, v) = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[0]["token"], content[0]["top_logprobs"][0]["token"]);
    // Streamed completions end with [DONE].
    let events = stream(
        &srv,
        "/v1/completions",
        json!({"prompt": "Hark", "max_tokens": 4, "stream": true}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
}

/// A real checkpoint whose weights encode a bigram table: the next token depends on the current
/// one only (attention and MLP output zero, one-hot embeddings, lm_head = transitions). It lets
/// an end-to-end test see the server parse markup a trained model would emit. `script` maps
/// each token (from the prompt's last one on) to the next; every other token leads to eos.
fn bigram_model(dir: &Path, tok_dir: &Path, script: &[u32], eos: u32, vocab: usize) {
    let h = script.len() + 1; // one dim per script token, one for "anything else"
    let dim_of = |t: u32| script.iter().position(|&s| s == t).unwrap_or(h - 1);
    let mut embed = vec![0f32; vocab * h];
    for t in 0..vocab {
        embed[t * h + dim_of(t as u32)] = 1.0;
    }
    let mut head = vec![0f32; vocab * h];
    for (i, w) in script.windows(2).enumerate() {
        head[w[1] as usize * h + i] = 10.0;
    }
    head[eos as usize * h + script.len() - 1] = 10.0;
    head[eos as usize * h + h - 1] = 10.0;
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev).unwrap();
    let zeros = |r: usize, c: usize| t(vec![0.0; r * c], (r, c));
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev).unwrap();
    let d = 4; // head_dim
    let mut w = std::collections::HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        t(embed, (vocab, h)),
    );
    w.insert("lm_head.weight".to_string(), t(head, (vocab, h)));
    w.insert("model.norm.weight".to_string(), ones(h));
    let l = "model.layers.0";
    w.insert(format!("{l}.input_layernorm.weight"), ones(h));
    w.insert(format!("{l}.post_attention_layernorm.weight"), ones(h));
    for p in ["q_proj", "k_proj", "v_proj"] {
        w.insert(format!("{l}.self_attn.{p}.weight"), zeros(d, h));
    }
    w.insert(format!("{l}.self_attn.o_proj.weight"), zeros(h, d));
    w.insert(format!("{l}.mlp.gate_proj.weight"), zeros(4, h));
    w.insert(format!("{l}.mlp.up_proj.weight"), zeros(4, h));
    w.insert(format!("{l}.mlp.down_proj.weight"), zeros(h, 4));
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": h, "intermediate_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": d,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "bos_token_id": 0, "eos_token_id": eos, "tie_word_embeddings": false});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok_dir.join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn tool_calls_come_out_as_openai_tool_calls() {
    let tok = TextTokenizer::from_dir(&default_model()).unwrap();
    // What the model will "say" after the template's "<｜Assistant｜><think>\n".
    let reply = "Look it up</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>weather<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let (_, prompt_ids) = tok
        .apply_chat_template(&json!([{"role": "user", "content": "x"}]), None, true)
        .unwrap();
    let mut script = vec![*prompt_ids.last().unwrap()];
    script.extend(tok.encode(reply, false).unwrap());
    let mut seen = std::collections::HashSet::new();
    assert!(
        script.iter().all(|t| seen.insert(*t)),
        "a bigram script needs distinct tokens"
    );
    let dir = std::env::temp_dir().join(format!("fathom-bigram-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    bigram_model(&dir, &default_model(), &script, 1, tok.vocab_size());
    let srv = start(&dir, None, SchedulerConfig::default());
    let tools = json!([{"type": "function", "function": {"name": "weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {}}}}]);
    let body = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools, "temperature": 0});
    let (status, v) = post(&srv, "/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["reasoning_content"], "Look it up");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "weather");
    assert_eq!(call["function"]["arguments"], "{}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    // Streaming: the call arrives as a tool_calls delta, no markup leaks into content.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = stream(&srv, "/v1/chat/completions", streamed);
    let mut calls = vec![];
    let mut content = String::new();
    for e in &events[..events.len() - 1] {
        let ch: Value = serde_json::from_str(e).unwrap();
        let d = &ch["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        calls.extend(d["tool_calls"].as_array().cloned().unwrap_or_default());
    }
    assert_eq!(content, "");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "weather");
    // Without tools the markup is plain content; tool results render through the template.
    let (_, plain) = post(
        &srv,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert!(plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("<｜tool▁calls▁begin｜>"));
    let follow_up = json!({"tools": tools, "max_tokens": 1, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"sky\": \"clear\"}"}]});
    let (status, v) = post(&srv, "/v1/chat/completions", follow_up);
    assert_eq!(status, 200, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JSON call to chromedriver's WebDriver API.
fn webdriver(port: u16, method: &str, path: &str, body: Value) -> Value {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_, hs, r) = send(addr, method, path, &[], &body.to_string());
    serde_json::from_str(&read_body(&hs, r)).unwrap()
}

/// The chat page in headless Chromium (driven through chromedriver): type two messages, press
/// Send, and see streamed replies appear with the history kept. Skipped, saying so, where
/// Debian's `chromium` and `chromium-driver` are not installed (`.ci/run` installs them).
#[test]
fn web_chat_page_in_headless_chromium() {
    let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
    if !Path::new(chromium).exists() || !Path::new(driver).exists() {
        eprintln!(
            "SKIPPED: {chromium} or {driver} not found (apt-get install chromium chromium-driver)"
        );
        return;
    }
    let srv = start(&default_model(), None, SchedulerConfig::default());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed().as_secs() < 30, "chromedriver did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let profile = std::env::temp_dir().join(format!("fathom-chromium-{}", std::process::id()));
    let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.display())]}}}});
    let session = webdriver(port, "POST", "/session", caps);
    let sid = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_string();
    let s = |p: &str| format!("/session/{sid}{p}");
    let result = std::panic::catch_unwind(|| {
        webdriver(
            port,
            "POST",
            &s("/url"),
            json!({"url": format!("http://{}/", srv.addr)}),
        );
        let element = |css: &str| -> String {
            let v = webdriver(
                port,
                "POST",
                &s("/element"),
                json!({"using": "css selector", "value": css}),
            );
            v["value"]["element-6066-11e4-a52e-4f735466cecf"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let script = |js: &str| {
            webdriver(
                port,
                "POST",
                &s("/execute/sync"),
                json!({"script": js, "args": []}),
            )["value"]
                .clone()
        };
        // The page sends no temperature (the server's default is 1, and each request draws its
        // own seed); make its requests greedy so the reply, and whether it reasons, is fixed.
        script(
            "const send = window.fetch; \
             window.fetch = (url, opts) => { \
               if (opts && opts.body) { \
                 const body = JSON.parse(opts.body); body.temperature = 0; \
                 opts = Object.assign({}, opts, {body: JSON.stringify(body)}); \
               } \
               return send(url, opts); \
             }; return true;",
        );
        for (turn, text) in ["What is 47 + 38?", "And 28 + 89?"].iter().enumerate() {
            let input = element("#input");
            webdriver(
                port,
                "POST",
                &s(&format!("/element/{input}/value")),
                json!({"text": text}),
            );
            let button = element("#send");
            webdriver(
                port,
                "POST",
                &s(&format!("/element/{button}/click")),
                json!({}),
            );
            let t0 = std::time::Instant::now();
            let done = loop {
                let v = script(&format!(
                    "const d = document.querySelectorAll('.assistant')[{turn}]; \
                     return d && d.dataset.done ? d.innerText : null;"
                ));
                if let Some(t) = v.as_str() {
                    break t.to_string();
                }
                assert!(t0.elapsed().as_secs() < 60, "no reply appeared in the page");
                std::thread::sleep(std::time::Duration::from_millis(100));
            };
            assert!(
                !done.trim().is_empty() && !done.contains("Error:"),
                "reply: {done}"
            );
        }
        // Two user and two assistant bubbles; the default model reasons on this sum greedily,
        // shown in <details>.
        assert_eq!(
            script("return document.querySelectorAll('.user').length;"),
            2
        );
        assert_eq!(
            script("return document.querySelectorAll('.assistant').length;"),
            2
        );
        assert_eq!(
            script("return !document.querySelector('details.reasoning').hidden;"),
            true
        );
        // Greedy, the first reply is the model's worked answer to 47 + 38.
        let first = script("return document.querySelectorAll('.assistant .answer')[0].innerText;");
        assert!(first.as_str().is_some_and(|t| t.contains("85")), "{first}");
        assert_eq!(script("return history.length;"), 4);
    });
    webdriver(port, "DELETE", &s(""), json!({}));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&profile);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    // The page's requests went through the real API.
    assert!(srv.state.metrics.http_ok.load(Ordering::Relaxed) >= 3);
}
