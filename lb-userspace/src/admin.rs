//! The admin HTTP listener: `/metrics`, `/healthz`, `/ready`, `/status`.
//!
//! Handlers never touch maps or control-plane state: they ask the daemon loop
//! (the single owner) for a [`Status`] over a channel, so a scrape sees one
//! consistent snapshot and nothing else writes.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::sync::{mpsc, oneshot};

use crate::{metrics::Metrics, status::Status};

/// A request to the daemon loop.
pub struct Query {
    /// A `/metrics` scrape: also starts the next skew window.
    pub scrape: bool,
    pub reply: oneshot::Sender<Status>,
}

#[derive(Clone)]
pub struct Admin {
    /// True once the program is attached and the config applied; false again
    /// as soon as a graceful shutdown starts.
    pub ready: Arc<AtomicBool>,
    pub queries: mpsc::Sender<Query>,
    pub metrics: Arc<Metrics>,
}

impl Admin {
    /// Serves on `listener` until the process ends.
    pub fn spawn(self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(self);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }

    async fn snapshot(&self, scrape: bool) -> Result<Status, StatusCode> {
        let (reply, answer) = oneshot::channel();
        self.queries
            .send(Query { scrape, reply })
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        answer.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    }
}

async fn ready(State(a): State<Admin>) -> impl IntoResponse {
    if a.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn status(State(a): State<Admin>) -> Result<Json<Status>, StatusCode> {
    Ok(Json(a.snapshot(false).await?))
}

async fn metrics(State(a): State<Admin>) -> Result<impl IntoResponse, StatusCode> {
    let s = a.snapshot(true).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.metrics.render(&s),
    ))
}
