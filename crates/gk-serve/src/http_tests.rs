//! The server over real sockets with a stand-in model: answers, refusals, the bounded
//! queue, timeouts for slow clients, metrics and graceful shutdown.

use crate::testing::FakeModel;
use crate::{serve_on, App, ServeConfig};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Server {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::thread::JoinHandle<()>>,
    app: Arc<App>,
}

impl Server {
    fn start(model: Arc<FakeModel>, cfg: ServeConfig) -> Self {
        let app = App::new(model, cfg).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let app2 = app.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(l.local_addr().unwrap().to_string()).unwrap();
                serve_on(l, app2, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        Self {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop),
            done: Some(done),
            app,
        }
    }

    /// Starts the graceful shutdown; `join` waits for it.
    fn stop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }

    fn join(&mut self) {
        self.done.take().unwrap().join().unwrap();
    }
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// Status, headers and body of the response on `s` (read to the end).
fn response(s: &mut TcpStream) -> (u16, String, String) {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One request: `head` (request line and any headers) then `body`.
fn request(addr: &str, head: &str, body: &[u8]) -> (u16, String, String) {
    let mut s = connect(addr);
    let _ = s
        .write_all(
            format!(
                "{head}\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .and_then(|()| s.write_all(body));
    response(&mut s)
}

fn post(addr: &str, query: &str, body: &[u8]) -> (u16, String, String) {
    request(addr, &format!("POST /v1/ground{query} HTTP/1.1"), body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn boxes(v: &serde_json::Value) -> Vec<[f32; 4]> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_value(r["bbox_xyxy"].clone()).unwrap())
        .collect()
}

fn want_box(expr: &str, w: u32, h: u32) -> [f32; 4] {
    FakeModel::answer_for(expr, w, h).bbox_xyxy
}

#[test]
fn answers_forms_and_several_expressions_and_refuses_bad_requests() {
    let cfg = ServeConfig {
        max_body_bytes: 100_000,
        max_expr_chars: 20,
        max_expressions: 3,
        ..ServeConfig::default()
    };
    let mut srv = Server::start(Arc::new(FakeModel::new()), cfg);
    let a = srv.addr.clone();
    let img = png(40, 20);
    let (st, _, body) = post(&a, "?expression=ab&expression=the%20cat", &img);
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["image_size"], serde_json::json!([40, 20]));
    assert_eq!(v["results"][1]["expression"], "the cat");
    assert_eq!(
        boxes(&v),
        [want_box("ab", 40, 20), want_box("the cat", 40, 20)]
    );
    // the same as a multipart form, expressions from the form and the query
    let boundary = "XyZ";
    let mut form = Vec::new();
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"expression\"\r\n\r\nthe cat\r\n").as_bytes());
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
    form.extend(&img);
    form.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (st, _, body) = request(
        &a,
        &format!("POST /v1/ground?expression=ab HTTP/1.1\r\nContent-Type: multipart/form-data; boundary={boundary}"),
        &form,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        boxes(&json(&body)),
        [want_box("ab", 40, 20), want_box("the cat", 40, 20)]
    );
    for (query, body, status, needle) in [
        ("", &img[..], 400, "missing expression"),
        ("?expression=%20", &img[..], 400, "empty"),
        (
            "?expression=a&expression=b&expression=c&expression=d",
            &img[..],
            400,
            "4 expressions",
        ),
        (
            &*format!("?expression={}", "a".repeat(21)),
            &img[..],
            400,
            "21 characters",
        ),
        ("?expression=x", &b"not an image"[..], 400, "decode"),
        ("?expression=x", &b""[..], 400, "empty image"),
    ] {
        let (got, _, text) = post(&a, query, body);
        assert_eq!(got, status, "{query}: {text}");
        let err = json(&text)["error"].as_str().unwrap().to_string();
        assert!(err.contains(needle), "{query}: {err}");
    }
    // a body declared over the limit is refused from its head, before any byte is read
    // (none is sent: unread bytes would make the server's close a reset that eats the reply)
    let mut s = connect(&a);
    s.write_all(
        b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: t\r\nContent-Length: 100001\r\n\r\n",
    )
    .unwrap();
    let (st, _, body) = response(&mut s);
    assert!(st == 413 && body.contains("100000 byte"), "{st} {body}");
    let (st, _, body) = request(
        &a,
        "POST /v1/ground HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=q",
        b"--q\r\nContent-Disposition: form-data; name=\"expression\"\r\n\r\nx\r\n--q--\r\n",
    );
    assert!(st == 400 && body.contains("no `image`"), "{st} {body}");
    let (st, _, body) = request(&a, "GET /v1/model HTTP/1.1", b"");
    assert_eq!(st, 200);
    let v = json(&body);
    assert_eq!(
        (
            v["model"]["kind"].as_str(),
            v["server"]["max_expressions"].as_u64()
        ),
        (Some("fake"), Some(3))
    );
    let (st, _, text) = request(&a, "GET /metrics HTTP/1.1", b"");
    assert_eq!(st, 200);
    assert!(
        text.contains("groundkit_requests_total{route=\"ground\",status=\"200\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("groundkit_requests_total{route=\"ground\",status=\"400\"} 7"),
        "{text}"
    );
    assert!(text.contains("groundkit_batch_queries_count 2"), "{text}");
    srv.stop();
    srv.join();
}

#[test]
fn a_full_queue_answers_503_and_the_server_recovers() {
    let model = Arc::new(FakeModel::gated());
    let cfg = ServeConfig {
        batch: crate::batcher::BatchConfig {
            queue: 1,
            max_batch: 4,
            max_wait: Duration::from_millis(1),
        },
        ..ServeConfig::default()
    };
    let mut srv = Server::start(model.clone(), cfg);
    let a = srv.addr.clone();
    let img = png(16, 16);
    let held = {
        let (a, img) = (a.clone(), img.clone());
        std::thread::spawn(move || post(&a, "?expression=first", &img))
    };
    model.wait_until_running(1);
    let t = Instant::now();
    let (st, head, body) = post(&a, "?expression=second", &img);
    assert_eq!(st, 503, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "refused at once");
    model.open_gate();
    assert_eq!(held.join().unwrap().0, 200);
    assert_eq!(post(&a, "?expression=third", &img).0, 200);
    assert_eq!(srv.app.metrics.requests("ground", 503), 1);
    srv.stop();
    srv.join();
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    let cfg = ServeConfig {
        timeout: Duration::from_millis(800),
        header_timeout: Duration::from_millis(800),
        ..ServeConfig::default()
    };
    let mut srv = Server::start(Arc::new(FakeModel::new()), cfg);
    let a = srv.addr.clone();
    let img = png(16, 16);
    // a body that never finishes
    let mut slow_body = connect(&a);
    slow_body
        .write_all(b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n0123456789")
        .unwrap();
    // a head that never finishes
    let mut slow_head = connect(&a);
    slow_head
        .write_all(b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // meanwhile a good request is answered
    let t = Instant::now();
    assert_eq!(post(&a, "?expression=x", &img).0, 200);
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    let (st, _, body) = response(&mut slow_body);
    assert_eq!(st, 408, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("did not arrive"));
    // the half-sent head's connection is closed (hyper may answer 408 first)
    let (st, _, _) = response(&mut slow_head);
    assert!(st == 0 || st == 408, "{st}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(post(&a, "?expression=x", &img).0, 200);
    srv.stop();
    srv.join();
}

#[test]
fn shutdown_lets_the_request_in_flight_finish() {
    let model = Arc::new(FakeModel::gated());
    let mut srv = Server::start(model.clone(), ServeConfig::default());
    let a = srv.addr.clone();
    let img = png(16, 16);
    let held = {
        let (a, img) = (a.clone(), img.clone());
        std::thread::spawn(move || post(&a, "?expression=in%20flight", &img))
    };
    model.wait_until_running(1);
    srv.stop();
    // the listener closes; the request in flight is still answered
    let t = Instant::now();
    while TcpStream::connect(&a).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "still accepting");
        std::thread::sleep(Duration::from_millis(20));
    }
    model.open_gate();
    let (st, _, body) = held.join().unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(boxes(&json(&body)), [want_box("in flight", 16, 16)]);
    srv.join();
}

#[test]
fn the_load_client_measures_and_checks_answers_beside_bad_clients() {
    use crate::load::{reference, run_level, LevelConfig, Query};
    let model = Arc::new(FakeModel::slow(Duration::from_millis(2)));
    let cfg = ServeConfig {
        max_body_bytes: 1 << 20,
        timeout: Duration::from_millis(600),
        header_timeout: Duration::from_millis(400),
        ..ServeConfig::default()
    };
    let mut srv = Server::start(model.clone(), cfg);
    let addr: std::net::SocketAddr = srv.addr.parse().unwrap();
    let pool: Vec<Query> = [(16, 16, "a"), (30, 12, "the cat"), (8, 40, "left dog")]
        .into_iter()
        .map(|(w, h, e)| Query {
            image: Arc::new(png(w, h)),
            exprs: vec![e.to_string()],
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let want = reference(addr, &pool).await.unwrap();
        run_level(
            addr,
            Arc::new(pool),
            Arc::new(want),
            LevelConfig {
                concurrency: 4,
                duration: Duration::from_millis(1200),
                bad_clients: 4,
                client_timeout: Duration::from_secs(10),
            },
        )
        .await
    });
    assert!(report.sent > 10, "{report:?}");
    assert_eq!(
        report.by_status.get("200"),
        Some(&report.sent),
        "{report:?}"
    );
    assert_eq!(report.mismatched, 0, "{report:?}");
    let outcome = |kind: &str, what: &str| report.bad[kind].get(what).copied().unwrap_or(0);
    assert!(outcome("malformed", "400") > 0, "{report:?}");
    assert!(outcome("oversize", "413") > 0, "{report:?}");
    assert!(outcome("slow-body", "408") > 0, "{report:?}");
    assert!(
        outcome("slow-head", "closed") + outcome("slow-head", "408") > 0,
        "{report:?}"
    );
    assert!(
        model.batch_sizes().iter().any(|&b| b > 1),
        "concurrent requests were batched"
    );
    srv.stop();
    srv.join();
}
