//! fathom-serve: an OpenAI-compatible HTTP server over the continuous-batching engine.
//!
//! - [`server`]: the routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
//!   `/metrics`, the chat page at `/`), SSE streaming, Bearer-key check.
//! - [`api`]: request fields read one by one, errors naming the field, OpenAI's error object.
//! - [`reasoning`]: R1's `<think>…</think>` split into `reasoning_content`.
//! - [`tools`]: tools described in the prompt, DeepSeek tool-call markup parsed into `tool_calls`.
//! - [`metrics`]: Prometheus text with latency histograms.

pub mod api;
pub mod metrics;
pub mod reasoning;
pub mod server;
pub mod tools;

pub use server::{router, AppState, ServeConfig};

/// Serve on `listener` until `shutdown` resolves; requests in flight are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: std::sync::Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
