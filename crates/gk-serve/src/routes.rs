//! The HTTP routes over a served model.
//!
//! - `POST /v1/ground?expression=E[&expression=E2...]` with the image file (PNG or JPEG) as
//!   the body, or a `multipart/form-data` form with an `image` file field and one or more
//!   `expression` fields -> `200 {"image_size": [w, h], "results": [{"expression",
//!   "bbox_xyxy", "truncated", "score"?, "phrase"?}], "ms"}` (pixels of the posted image,
//!   one result per expression in order; `truncated`: cut to the model's text length).
//! - `GET /v1/model` what is served and how; `GET /metrics` Prometheus counters;
//!   `GET /healthz` -> `ok`; `GET /` a page to try it in a browser.
//!
//! Every refusal is `{"error": "..."}` and changes nothing: over `max_body` 413 (from the
//! declared length before any byte is read); no, empty, blank, too many or over-long
//! expressions, an undecodable image or a malformed form 400; the queue full 503 with
//! `Retry-After`; a body not received within the timeout 408; no answer within it 504.

use crate::batcher::{Job, Rejection};
use crate::App;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Instant;
use tokio::time::Instant as TokioInstant;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = (status, Json(serde_json::json!({ "error": msg.into() }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn reject(r: Rejection) -> Response {
    error(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        r.msg,
    )
}

/// The routes over `app`, with every answer counted in its metrics.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/model", get(model_info))
        .route("/metrics", get(metrics))
        .route("/v1/ground", post(ground))
        // our own limit applies (read_body); the form parser must not add axum's 2 MiB
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

/// The metrics' name for a path: fixed names only, whatever clients send.
fn route_name(path: &str) -> &'static str {
    match path {
        "/v1/ground" => "ground",
        "/v1/model" => "model",
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/" => "page",
        _ => "other",
    }
}

async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = route_name(req.uri().path());
    let start = Instant::now();
    let response = next.run(req).await;
    app.metrics
        .observe_request(route, response.status().as_u16(), start.elapsed());
    response
}

async fn model_info(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({
        "model": app.model.info(),
        "server": {
            "max_body_bytes": app.cfg.max_body_bytes,
            "max_expr_chars": app.cfg.max_expr_chars,
            "max_expressions": app.cfg.max_expressions,
            "queue": app.cfg.batch.queue,
            "max_batch": app.cfg.batch.max_batch,
            "max_wait_ms": app.cfg.batch.max_wait.as_secs_f64() * 1e3,
            "timeout_s": app.cfg.timeout.as_secs_f64(),
        },
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics
            .render(app.batcher.depth(), app.batcher.capacity()),
    )
        .into_response()
}

/// The body, at most `max_body_bytes`, by `deadline`: a declared `Content-Length` over the
/// limit is refused before any byte is read, a longer chunked body as soon as it passes it.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    deadline: TokioInstant,
) -> Result<Bytes, Response> {
    let limit = app.cfg.max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            if limit % (1 << 20) == 0 {
                format!("the body is over the {} MiB limit", limit >> 20)
            } else {
                format!("the body is over the {limit} byte limit")
            },
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match tokio::time::timeout_at(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        // over the limit, or the client went away mid-body (then no one reads the reply)
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {:.0} s",
                app.cfg.timeout.as_secs_f64()
            ),
        )),
    }
}

/// The checked expressions: at least one, none blank, none too long, not too many.
fn check_exprs(app: &App, exprs: Vec<String>) -> Result<Vec<String>, Response> {
    let bad = |msg: String| Err(error(StatusCode::BAD_REQUEST, msg));
    if exprs.is_empty() {
        return bad("missing expression: give ?expression=<url-encoded text> (repeat it for several), or an `expression` form field".into());
    }
    if exprs.len() > app.cfg.max_expressions {
        return bad(format!(
            "{} expressions, more than the {} accepted in one request",
            exprs.len(),
            app.cfg.max_expressions
        ));
    }
    for e in &exprs {
        let chars = e.chars().count();
        if chars > app.cfg.max_expr_chars {
            return bad(format!(
                "an expression has {chars} characters, more than the {} accepted",
                app.cfg.max_expr_chars
            ));
        }
        if e.trim().is_empty() {
            return bad("an expression is empty".into());
        }
    }
    Ok(exprs)
}

/// The image and expressions of a `multipart/form-data` body.
async fn read_form(
    parts: axum::http::request::Parts,
    body: Bytes,
) -> Result<(Bytes, Vec<String>), Response> {
    let malformed = |e: String| error(StatusCode::BAD_REQUEST, format!("malformed form: {e}"));
    let req = Request::from_parts(parts, Body::from(body));
    let mut form = axum::extract::Multipart::from_request(req, &())
        .await
        .map_err(|e| malformed(e.body_text()))?;
    let (mut image, mut exprs) = (None, Vec::new());
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| malformed(e.body_text()))?
    {
        match field.name() {
            Some("image") => {
                image = Some(field.bytes().await.map_err(|e| malformed(e.body_text()))?)
            }
            Some("expression") => {
                exprs.push(field.text().await.map_err(|e| malformed(e.body_text()))?)
            }
            _ => {}
        }
    }
    let image = image.ok_or_else(|| malformed("no `image` file field".into()))?;
    Ok((image, exprs))
}

async fn ground(State(app): State<Arc<App>>, req: Request) -> Response {
    let start = Instant::now();
    let deadline = TokioInstant::now() + app.cfg.timeout;
    let (parts, body) = req.into_parts();
    let mut exprs: Vec<String> = match serde_urlencoded::from_str::<Vec<(String, String)>>(
        parts.uri.query().unwrap_or(""),
    ) {
        Ok(pairs) => pairs
            .into_iter()
            .filter(|(k, _)| k == "expression")
            .map(|(_, v)| v)
            .collect(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed query: {e}")),
    };
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_form {
        // a raw-body request names its expressions up front: check them before the body
        exprs = match check_exprs(&app, exprs) {
            Ok(e) => e,
            Err(r) => return r,
        };
    }
    let body = match read_body(&app, &parts.headers, body, deadline).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let image = if is_form {
        let (image, more) = match read_form(parts, body).await {
            Ok(f) => f,
            Err(r) => return r,
        };
        exprs.extend(more);
        exprs = match check_exprs(&app, exprs) {
            Ok(e) => e,
            Err(r) => return r,
        };
        image
    } else {
        body
    };
    if image.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty image: post the image file (PNG or JPEG) as the body or the form's `image` field",
        );
    }
    let Some(permit) = app.batcher.admit() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy ({} requests queued); retry shortly",
                app.batcher.capacity()
            ),
        );
    };
    // decoding runs on the blocking pool, at most `queue` at once (each holds a permit)
    let decoded = tokio::task::spawn_blocking(move || {
        gk_data::image_io::decode_rgb(&image).map(|img| (img, permit))
    })
    .await;
    let (img, permit) = match decoded {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot decode the image: {e}"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("decoding failed: {e}"),
            )
        }
    };
    let (w, h) = img.dimensions();
    let (reply, answer) = tokio::sync::oneshot::channel();
    app.batcher.submit(Job {
        image: Arc::new(img),
        exprs: exprs.clone(),
        deadline: deadline.into_std(),
        reply,
        permit,
    });
    let answers = match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(Ok(a))) => a,
        Ok(Ok(Err(r))) => return reject(r),
        Ok(Err(_)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model dropped the request",
            )
        }
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer within {:.0} s", app.cfg.timeout.as_secs_f64()),
            )
        }
    };
    let results: Vec<serde_json::Value> = exprs
        .iter()
        .zip(&answers)
        .map(|(e, a)| {
            let mut r = serde_json::json!({
                "expression": e,
                "bbox_xyxy": a.bbox_xyxy,
                "truncated": a.truncated,
            });
            if let Some(s) = a.score {
                r["score"] = s.into();
            }
            if let Some(p) = &a.phrase {
                r["phrase"] = p.clone().into();
            }
            r
        })
        .collect();
    Json(serde_json::json!({
        "image_size": [w, h],
        "results": results,
        "ms": start.elapsed().as_secs_f64() * 1e3,
    }))
    .into_response()
}
