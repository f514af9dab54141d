//! The admin HTTP listener: `/metrics`, `/healthz`, `/ready`, `/status`.
//!
//! Handlers never touch maps or control-plane state: they ask the daemon loop
//! (the single owner) for a [`Status`] over a channel, so a scrape sees one
//! consistent snapshot and nothing else writes.
//!
//! Whatever clients do, the listener's cost stays bounded (see [`Limits`]):
//! file descriptors run out for the whole process, health probes included,
//! so an unbounded listener would let idle connections take every backend
//! down.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

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

/// Bounds on what the admin listener spends on its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once. Beyond it the listener stops accepting:
    /// further clients wait in the kernel's backlog, where they cost this
    /// process no descriptor and no memory.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from the
    /// connection's start or the previous response: it bounds idle
    /// connections and headers sent slowly.
    pub header_timeout: Duration,
    /// A connection is closed (gracefully) after this long, so one that
    /// stalls elsewhere (a client not reading its response) frees its place.
    pub max_age: Duration,
    /// Largest request head; a larger one is answered 431 and closed. No
    /// handler reads a request body.
    pub max_request_head: usize,
}

impl Limits {
    pub fn new(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            header_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(60),
            // hyper's smallest read buffer (8 KiB) doubled: any real
            // client's GET fits.
            max_request_head: 16 * 1024,
        }
    }
}

/// After a failed accept (out of descriptors, say), before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Admin {
    /// Serves on `listener` within `limits` until the process ends.
    pub fn spawn(self, listener: TcpListener, limits: Limits) {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(self);
        tokio::spawn(serve(listener, app, limits));
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

async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A place first, then a connection: at the cap nothing is accepted.
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let app = app.clone();
                tokio::spawn(async move {
                    connection(stream, app, limits).await;
                    drop(place);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one HTTP/1 connection within `limits`.
async fn connection(stream: TcpStream, app: Router, limits: Limits) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_request_head);
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = tokio::time::sleep(limits.max_age) => {
            // Finishes the request in flight, if any, within one more header
            // timeout.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_timeout, conn).await;
        }
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

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An admin listener on loopback with no daemon loop behind it (only
    /// `/healthz` and `/ready` answer 200).
    async fn start(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (queries, _) = mpsc::channel(1);
        Admin {
            ready: Arc::new(AtomicBool::new(true)),
            queries,
            metrics: Arc::new(Metrics::new()),
        }
        .spawn(listener, limits);
        addr
    }

    fn limits(max_connections: usize, header_timeout: Duration) -> Limits {
        Limits {
            max_connections,
            header_timeout,
            ..Limits::new(max_connections)
        }
    }

    /// Reads until the server closes (or 5 s pass); returns what it sent.
    async fn read_all(stream: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        read_all(&mut s).await
    }

    #[tokio::test]
    async fn answers_requests() {
        let addr = start(Limits::new(4)).await;
        let answer = get(addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed() {
        let addr = start(limits(4, Duration::from_millis(300))).await;
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nX-Slow: y")
            .await
            .unwrap();
        // Kept alive after an answer, then idle.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        for s in [&mut idle, &mut half] {
            assert_eq!(read_all(s).await, "", "closed without an answer");
        }
        let answer = read_all(&mut kept).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "then closed: {answer}");
        // read_all gives up after 5 s: sooner means the server closed them.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "closed after the header timeout, took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let addr = start(limits(4, Duration::from_secs(30))).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: lb\r\nX-Pad: {}",
            "a".repeat(64 * 1024)
        );
        // The server may close before it has read everything.
        let _ = s.write_all(head.as_bytes()).await;
        let answer = read_all(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    #[tokio::test]
    async fn beyond_the_cap_a_client_waits_for_a_place() {
        let addr = start(limits(1, Duration::from_secs(30))).await;
        let holder = TcpStream::connect(addr).await.unwrap();
        // Let the listener accept it and take the only place.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = tokio::spawn(get(addr, "/ready"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "served beyond the cap");
        drop(holder);
        let answer = tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .expect("served once the place is free")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
