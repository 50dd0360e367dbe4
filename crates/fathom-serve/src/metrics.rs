//! `/metrics` in Prometheus' text format: the engine's counters and gauges (requests, tokens,
//! prefix-cache hit tokens, queue depth, KV memory) and the server's latency histograms.

use fathom_engine::EngineMetrics;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>, // per-bucket counts, sum, count
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            g.0[i] += 1;
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&g.0) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct ServerMetrics {
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub http_ok: AtomicU64,
    pub http_client_errors: AtomicU64,
    pub http_server_errors: AtomicU64,
    pub disconnects: AtomicU64,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            ttft: Histogram::new(LATENCY),
            inter_token: Histogram::new(LATENCY),
            e2e: Histogram::new(LATENCY),
            http_ok: AtomicU64::new(0),
            http_client_errors: AtomicU64::new(0),
            http_server_errors: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
        }
    }
}

pub fn render(engine: &EngineMetrics, server: &ServerMetrics) -> String {
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    line(
        "fathom_requests_total",
        "counter",
        "Sequences submitted to the engine.",
        c(&engine.requests),
    );
    line(
        "fathom_requests_rejected_total",
        "counter",
        "Requests refused because the queue was full.",
        c(&engine.rejected),
    );
    line(
        "fathom_prompt_tokens_total",
        "counter",
        "Prompt tokens admitted.",
        c(&engine.prompt_tokens),
    );
    line(
        "fathom_prompt_cached_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache (cache hits).",
        c(&engine.cached_prompt_tokens),
    );
    line(
        "fathom_generation_tokens_total",
        "counter",
        "Tokens generated.",
        c(&engine.generated_tokens),
    );
    line(
        "fathom_engine_steps_total",
        "counter",
        "Batched forward passes.",
        c(&engine.steps),
    );
    line(
        "fathom_spec_draft_tokens_total",
        "counter",
        "MTP speculative decoding: tokens drafted.",
        c(&engine.draft_tokens),
    );
    line(
        "fathom_spec_accepted_tokens_total",
        "counter",
        "MTP speculative decoding: drafted tokens the model accepted (acceptance = accepted / drafted).",
        c(&engine.accepted_draft_tokens),
    );
    line(
        "fathom_spec_paused_steps_total",
        "counter",
        "MTP speculative decoding: steps decoded without drafts because more sequences than --spec-max-batch were decoding.",
        c(&engine.spec_paused_steps),
    );
    let g = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
    line(
        "fathom_requests_waiting",
        "gauge",
        "Requests queued for admission.",
        g(&engine.waiting),
    );
    line(
        "fathom_requests_running",
        "gauge",
        "Sequences being decoded.",
        g(&engine.running),
    );
    line(
        "fathom_kv_reserved_bytes",
        "gauge",
        "KV-cache bytes reserved by running sequences.",
        g(&engine.kv_reserved_bytes),
    );
    line(
        "fathom_prefix_cache_bytes",
        "gauge",
        "KV-cache bytes held by the prefix cache.",
        g(&engine.prefix_cache_bytes),
    );
    line(
        "fathom_http_responses_ok_total",
        "counter",
        "Successful API responses.",
        c(&server.http_ok),
    );
    line(
        "fathom_http_responses_4xx_total",
        "counter",
        "API responses with a client error.",
        c(&server.http_client_errors),
    );
    line(
        "fathom_http_responses_5xx_total",
        "counter",
        "API responses with a server error (incl. overload).",
        c(&server.http_server_errors),
    );
    line(
        "fathom_client_disconnects_total",
        "counter",
        "Streams whose client went away before the end.",
        c(&server.disconnects),
    );
    server.ttft.render(
        &mut out,
        "fathom_time_to_first_token_seconds",
        "Time from request to first generated token.",
    );
    server.inter_token.render(
        &mut out,
        "fathom_inter_token_latency_seconds",
        "Time between consecutive tokens of a stream.",
    );
    server.e2e.render(
        &mut out,
        "fathom_request_duration_seconds",
        "Time from request to the last token.",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.1\"} 1\n"));
        assert!(s.contains("x_bucket{le=\"1\"} 3\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"));
        assert!(s.contains("x_count 4\n"));
    }
}
