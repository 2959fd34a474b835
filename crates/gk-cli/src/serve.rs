//! `groundkit serve`: arguments to [`gk_serve::ServeConfig`], the run's model through the
//! one inference interface, then [`gk_serve::serve`] until SIGTERM or Ctrl-C.

use anyhow::{Context, Result};
use gk_serve::batcher::BatchConfig;
use gk_serve::ServeConfig;
use gk_train::run::RunDir;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A run folder (train, import or train-ckd; its best checkpoint is served).
    #[arg(long)]
    run: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Largest accepted request body (the image file, or the whole form), in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mb: usize,
    /// Longest accepted expression, in characters.
    #[arg(long, default_value_t = 512)]
    max_expr_chars: usize,
    /// Expressions in one request at most.
    #[arg(long, default_value_t = 16)]
    max_expressions: usize,
    /// Requests admitted (waiting for or in the model) at most; more get 503 + Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Queries per forward at most: concurrent requests are batched up to this (1: no
    /// micro-batching).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// How long the model waits for more requests to batch after the first, in ms.
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// From a request's head to its answer at most, in seconds (408 while the body is still
    /// arriving, 504 while waiting for the model).
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// A request head not received within this closes the connection, in seconds.
    #[arg(long, default_value_t = 10)]
    header_timeout_s: u64,
    /// Open connections at most (more wait to be accepted).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let run = RunDir::open(&a.run)?;
    let model: Arc<dyn gk_train::infer::GroundingModel> = Arc::from(
        gk_train::infer::open(&run)
            .with_context(|| format!("loading the run {}", a.run.display()))?,
    );
    let cfg = ServeConfig {
        max_body_bytes: a.max_body_mb << 20,
        max_expr_chars: a.max_expr_chars,
        max_expressions: a.max_expressions,
        batch: BatchConfig {
            queue: a.queue.max(1),
            max_batch: a.max_batch.max(1),
            max_wait: Duration::from_millis(a.max_wait_ms),
        },
        timeout: Duration::from_secs(a.timeout_s),
        header_timeout: Duration::from_secs(a.header_timeout_s),
        max_connections: a.max_connections.max(1),
    };
    gk_serve::serve(model, &a.addr, cfg, |addr, app| {
        // the first line of stdout names the address (tests and scripts read it)
        println!("listening on http://{addr}");
        let info = app.model.info();
        eprintln!(
            "serving {} ({}, {} parameters): POST /v1/ground?expression=... with an image body or form; GET / to try it; GET /metrics",
            a.run.display(),
            info.kind,
            info.parameters
        );
        if let Some(why) = &info.batch_dependent {
            eprintln!("note: {why}: served one query per forward");
        }
    })
    .context("serving")
}
