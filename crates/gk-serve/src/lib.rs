//! gk-serve: any run's model ([`gk_train::infer::GroundingModel`]) behind HTTP.
//!
//! - [`routes`]: the API and the page; [`batcher`]: the bounded queue and the one model
//!   worker that micro-batches concurrent requests; [`metrics`]: Prometheus counters;
//!   [`load`]: the load-test client (`groundkit loadtest`).
//! - The accept loop here is our own over hyper's HTTP/1 connections: at most
//!   `max_connections` open (more wait in the kernel's backlog), a request head not received
//!   within `header_timeout` closes its connection, and on SIGTERM or Ctrl-C the listener
//!   closes, requests in flight finish (for at most the request timeout), then the worker.

pub mod batcher;
pub mod load;
pub mod metrics;
pub mod routes;
#[cfg(test)]
mod testing;

use batcher::{BatchConfig, Batcher};
use gk_train::infer::GroundingModel;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What can stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Largest accepted request body (the image, or the whole form), bytes.
    pub max_body_bytes: usize,
    /// Longest accepted expression, characters.
    pub max_expr_chars: usize,
    /// Expressions in one request at most.
    pub max_expressions: usize,
    pub batch: BatchConfig,
    /// From a request's head to its answer at most (408 while the body is still arriving,
    /// 504 while waiting for the model).
    pub timeout: Duration,
    /// A request head not complete within this closes the connection.
    pub header_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_expr_chars: 512,
            max_expressions: 16,
            batch: BatchConfig {
                queue: 64,
                max_batch: 16,
                max_wait: Duration::from_millis(5),
            },
            timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// A served model: what the routes share.
pub struct App {
    pub model: Arc<dyn GroundingModel>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub cfg: ServeConfig,
}

impl App {
    /// Starts the model's worker. A model whose answers depend on the rest of its batch
    /// (HiVG's batch-mixing bridges) is run one query per forward.
    pub fn new(
        model: Arc<dyn GroundingModel>,
        mut cfg: ServeConfig,
    ) -> Result<Arc<Self>, ServeError> {
        if model.info().batch_dependent.is_some() {
            cfg.batch.max_batch = 1;
        }
        let metrics = Arc::new(Metrics::default());
        let batcher = Batcher::start(model.clone(), cfg.batch, metrics.clone())
            .map_err(io("starting the model worker"))?;
        Ok(Arc::new(Self {
            model,
            batcher,
            metrics,
            cfg,
        }))
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish (for at most the request timeout and a second) and stops the model's worker.
pub async fn serve_on(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let router = routes::router(app.clone());
    let conns = Arc::new(tokio::sync::Semaphore::new(app.cfg.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.cfg.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // out of file descriptors and the like: wait, do not spin
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let done = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = done.await;
            drop(permit);
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        eprintln!("shutting down: {open} connections finishing");
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(app.cfg.timeout + Duration::from_secs(1)) => {
            eprintln!("shutting down: gave up waiting for the open connections");
        }
    }
    let app2 = app.clone();
    tokio::task::spawn_blocking(move || app2.batcher.shutdown())
        .await
        .map_err(|e| ServeError::Io {
            what: "stopping the model worker".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(())
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
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Serves `model` on `addr` until SIGTERM or Ctrl-C; `on_listening` gets the bound address
/// (port 0 picks a free one).
pub fn serve(
    model: Arc<dyn GroundingModel>,
    addr: &str,
    cfg: ServeConfig,
    on_listening: impl FnOnce(SocketAddr, &App),
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    rt.block_on(async move {
        let app = App::new(model, cfg)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(io(format!("binding {addr}")))?;
        on_listening(
            listener
                .local_addr()
                .map_err(io("reading the bound address"))?,
            &app,
        );
        serve_on(listener, app, shutdown_signal()).await
    })
}
#[cfg(test)]
mod http_tests;
