//! `groundkit serve`: a trained run's predictor behind HTTP (axum on tokio).
//!
//! - `POST /v1/ground?expression=<url-encoded text>` with the image file (PNG or JPEG) as
//!   the body -> `200 {"bbox_xyxy": [x0, y0, x1, y1], "image_size": [w, h], "expression",
//!   "truncated", "ms"}` (pixels of the posted image; `truncated`: the expression was cut to
//!   the model's text length).
//! - `GET /` a page to try it in a browser; `GET /healthz` -> `ok`.
//!
//! Bad requests change nothing and get `{"error": "..."}`: a body over `--max-body-mb` is
//! 413; a missing, empty or over-long expression, an undecodable image or one over the
//! decoder's size limits is 400. Decoding and the forward run on tokio's blocking pool, so
//! a slow request does not stall the others' I/O.

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gk_train::infer::GroundingModel;
use gk_train::run::RunDir;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A run folder written by `groundkit train` (its best checkpoint is served).
    #[arg(long)]
    run: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Largest accepted request body (the image file), in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mb: usize,
    /// Longest accepted expression, in characters.
    #[arg(long, default_value_t = 512)]
    max_expr_chars: usize,
}

struct Server {
    model: Box<dyn GroundingModel>,
    max_expr_chars: usize,
    max_body_mb: usize,
}

#[derive(Debug, serde::Deserialize)]
struct GroundQuery {
    expression: Option<String>,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// The routes over a loaded predictor.
fn app(server: Arc<Server>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("serve.html")) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/ground", post(ground))
        .with_state(server)
}

/// The image bytes, at most `--max-body-mb`: a declared `Content-Length` over the limit is
/// refused before any byte is read, a longer chunked body as soon as it passes the limit.
async fn read_body(server: &Server, headers: &HeaderMap, body: Body) -> Result<Bytes, Response> {
    let limit = server.max_body_mb << 20;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the {} MiB limit", server.max_body_mb),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        // over the limit, or the client went away mid-body (then no one reads the reply)
        Err(_) => Err(too_large()),
    }
}

async fn ground(
    State(server): State<Arc<Server>>,
    Query(q): Query<GroundQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(expr) = q.expression else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing ?expression= (the url-encoded referring expression)",
        );
    };
    let chars = expr.chars().count();
    if chars > server.max_expr_chars {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "the expression has {chars} characters, more than the {} accepted",
                server.max_expr_chars
            ),
        );
    }
    if expr.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "the expression is empty");
    }
    // the expression is checked before the body is read
    let body = match read_body(&server, &headers, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty body: post the image file (PNG or JPEG) as the request body",
        );
    }
    let start = Instant::now();
    let work = tokio::task::spawn_blocking(move || {
        let img = gk_data::image_io::decode_rgb(&body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("cannot decode the image: {e}"),
            )
        })?;
        let query = gk_train::infer::Query {
            image: &img,
            expr: &expr,
        };
        let g = match server.model.ground(&[query]) {
            Ok(mut answers) if answers.len() == 1 => answers.remove(0),
            Ok(_) => {
                return Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the model gave no answer".to_string(),
                ))
            }
            // an expression the tokenizer makes nothing of is the client's
            Err(e @ gk_train::TrainError::Data(gk_data::DataError::EmptyText)) => {
                return Err((StatusCode::BAD_REQUEST, format!("{expr:?}: {e}")))
            }
            Err(e) => {
                return Err((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("grounding {expr:?}: {e}"),
                ))
            }
        };
        Ok::<_, (StatusCode, String)>((g, img.dimensions(), expr))
    });
    match work.await {
        Ok(Ok((g, (w, h), expr))) => Json(serde_json::json!({
            "bbox_xyxy": g.bbox_xyxy,
            "image_size": [w, h],
            "expression": expr,
            "truncated": g.truncated,
            "ms": start.elapsed().as_secs_f64() * 1e3,
        }))
        .into_response(),
        Ok(Err((status, msg))) => error(status, msg),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request failed: {e}"),
        ),
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    let run = RunDir::open(&a.run)?;
    let server = Arc::new(Server {
        model: gk_train::infer::open(&run)
            .with_context(|| format!("loading the run {}", a.run.display()))?,
        max_expr_chars: a.max_expr_chars,
        max_body_mb: a.max_body_mb,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr)
            .await
            .with_context(|| format!("binding {}", a.addr))?;
        // the first line of stdout names the address (tests and scripts read it)
        println!("listening on http://{}", listener.local_addr()?);
        eprintln!(
            "serving {} (POST /v1/ground?expression=... with an image body; GET / to try it)",
            a.run.display()
        );
        axum::serve(listener, app(server)).await.context("serving")
    })
}
