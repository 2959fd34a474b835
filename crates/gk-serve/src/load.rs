//! The load-test client behind `groundkit loadtest`: `concurrency` clients send good
//! requests back to back for a fixed time while a bounded number of misbehaving clients
//! (malformed heads, oversize bodies, heads and bodies trickled byte by byte) run beside
//! them. Every good answer's boxes are compared with the ones the same request got when
//! sent alone; throughput, latency percentiles and answers by status are counted.
//!
//! Loopback only: [`check_loopback`] refuses any other address. Raw HTTP/1.1 over tokio
//! sockets, one request per connection, so what is measured is the server, not a client
//! library's pool.

use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One good request: an image file's bytes and its expressions.
#[derive(Debug, Clone)]
pub struct Query {
    pub image: Arc<Vec<u8>>,
    pub exprs: Vec<String>,
}

/// A level of the test.
#[derive(Debug, Clone, Copy)]
pub struct LevelConfig {
    /// Good clients, each sending its next request when the last is answered.
    pub concurrency: usize,
    pub duration: Duration,
    /// Misbehaving clients, spread over the kinds of [`BadKind`], each trying at most 20
    /// times a second.
    pub bad_clients: usize,
    /// A client gives up on one request after this (set it above the server's timeouts:
    /// the level lasts until the slow clients' last attempts end).
    pub client_timeout: Duration,
}

/// A misbehaving client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadKind {
    /// Not HTTP.
    Malformed,
    /// A body declared and sent over the server's limit.
    Oversize,
    /// The head one byte at a time.
    SlowHead,
    /// A complete head, then the body a few bytes at a time.
    SlowBody,
}

const BAD_KINDS: [BadKind; 4] = [
    BadKind::Malformed,
    BadKind::Oversize,
    BadKind::SlowHead,
    BadKind::SlowBody,
];

/// What one level measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub seconds: f64,
    /// Good requests sent, and answered by HTTP status (`"error"`: no answer).
    pub sent: usize,
    pub by_status: BTreeMap<String, usize>,
    /// 200 answers per second.
    pub throughput: f64,
    /// Latency of the 200 answers, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Latency of the 503 answers (the refusals under overload), ms.
    pub p99_refused_ms: Option<f64>,
    /// 200 answers whose boxes differ from the request's answer alone by more than
    /// `tolerance_px`, and the largest difference seen.
    pub mismatched: usize,
    pub max_box_diff_px: f64,
    /// Misbehaving clients: attempts by kind, and how each attempt ended.
    pub bad: BTreeMap<String, BTreeMap<String, usize>>,
}

/// Boxes in two answers differ by at most this many pixels to count as the same.
pub const TOLERANCE_PX: f64 = 0.01;

/// Refuses an address that is not on this machine.
pub fn check_loopback(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{addr} is not a loopback address: the load test only runs against this machine"
        ))
    }
}

/// An answer: status and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
}

/// Reads one response (status line, headers, a `Content-Length` body or to the end).
async fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(n) => {
            while body.len() < n {
                let k = s.read(&mut chunk).await?;
                if k == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                body.extend_from_slice(&chunk[..k]);
            }
            body.truncate(n);
        }
        None => {
            s.read_to_end(&mut body).await?;
        }
    }
    Ok(Reply { status, body })
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn head_for(q: &Query) -> String {
    let query: Vec<String> = q
        .exprs
        .iter()
        .map(|e| format!("expression={}", url_encode(e)))
        .collect();
    format!(
        "POST /v1/ground?{} HTTP/1.1\r\nHost: load\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        query.join("&"),
        q.image.len()
    )
}

/// Sends `q` and returns its answer.
async fn send(addr: SocketAddr, q: &Query) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(head_for(q).as_bytes()).await?;
    s.write_all(&q.image).await?;
    read_reply(&mut s).await
}

/// The boxes of a 200 answer's body.
fn boxes(body: &[u8]) -> Option<Vec<[f64; 4]>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["results"]
        .as_array()?
        .iter()
        .map(|r| serde_json::from_value(r["bbox_xyxy"].clone()).ok())
        .collect()
}

/// Each query's boxes when sent alone, one after another.
pub async fn reference(addr: SocketAddr, pool: &[Query]) -> Result<Vec<Vec<[f64; 4]>>, String> {
    let mut out = Vec::new();
    for (i, q) in pool.iter().enumerate() {
        let r = send(addr, q)
            .await
            .map_err(|e| format!("query {i} alone: {e}"))?;
        if r.status != 200 {
            return Err(format!(
                "query {i} alone: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        out.push(boxes(&r.body).ok_or(format!("query {i} alone: no boxes in the answer"))?);
    }
    Ok(out)
}

fn max_diff(a: &[[f64; 4]], b: &[[f64; 4]]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

/// One misbehaving attempt; how it ended (`"408"`, `"closed"`, ...).
async fn misbehave(addr: SocketAddr, kind: BadKind, limit: Duration) -> String {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await?;
        match kind {
            BadKind::Malformed => {
                s.write_all(b"GARBAGE \x01\x02 NOT HTTP\r\n\r\n").await?;
            }
            BadKind::Oversize => {
                s.write_all(
                    b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: load\r\nContent-Length: 1073741824\r\n\r\n",
                )
                .await?;
                // the server answers from the declared length; what it does not read is lost
                let _ = s.write_all(&vec![0u8; 1 << 16]).await;
            }
            BadKind::SlowHead => {
                for b in b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: load\r\n".iter() {
                    if s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            BadKind::SlowBody => {
                s.write_all(
                    b"POST /v1/ground?expression=x HTTP/1.1\r\nHost: load\r\nContent-Length: 100000\r\n\r\n",
                )
                .await?;
                for _ in 0..1000 {
                    if s.write_all(b"0123456789").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        read_reply(&mut s).await
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(r)) => r.status.to_string(),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed".into(),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".into(),
        Ok(Err(e)) => format!("error: {}", e.kind()),
        Err(_) => "client gave up".into(),
    }
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted_ms.len() - 1) as f64).round() as usize;
    sorted_ms[i.min(sorted_ms.len() - 1)]
}

/// Runs one level against `addr`: `pool` queries round-robin, checked against `want`
/// (from [`reference`]).
pub async fn run_level(
    addr: SocketAddr,
    pool: Arc<Vec<Query>>,
    want: Arc<Vec<Vec<[f64; 4]>>>,
    cfg: LevelConfig,
) -> LevelReport {
    #[derive(Default)]
    struct Tally {
        sent: usize,
        by_status: BTreeMap<String, usize>,
        ok_ms: Vec<f64>,
        refused_ms: Vec<f64>,
        mismatched: usize,
        max_diff: f64,
    }
    let start = Instant::now();
    let end = start + cfg.duration;
    let mut good = Vec::new();
    for c in 0..cfg.concurrency {
        let (pool, want) = (pool.clone(), want.clone());
        good.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut i = c;
            while Instant::now() < end {
                let k = i % pool.len();
                i += cfg.concurrency;
                let t0 = Instant::now();
                let r = tokio::time::timeout(cfg.client_timeout, send(addr, &pool[k])).await;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                t.sent += 1;
                let key = match r {
                    Ok(Ok(r)) => {
                        match r.status {
                            200 => {
                                t.ok_ms.push(ms);
                                let d = boxes(&r.body)
                                    .map_or(f64::INFINITY, |b| max_diff(&b, &want[k]));
                                t.max_diff = t.max_diff.max(d);
                                t.mismatched += (d > TOLERANCE_PX) as usize;
                            }
                            503 => {
                                t.refused_ms.push(ms);
                                // a refused client waits before its next try (less than
                                // the Retry-After of 1 s, to keep the pressure on)
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            _ => {}
                        }
                        r.status.to_string()
                    }
                    Ok(Err(_)) => "error".into(),
                    Err(_) => "client timeout".into(),
                };
                *t.by_status.entry(key).or_default() += 1;
            }
            t
        }));
    }
    let mut bad = Vec::new();
    for b in 0..cfg.bad_clients {
        let kind = BAD_KINDS[b % BAD_KINDS.len()];
        bad.push(tokio::spawn(async move {
            let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
            while Instant::now() < end {
                let outcome = misbehave(addr, kind, cfg.client_timeout).await;
                *outcomes.entry(outcome).or_default() += 1;
                // bounded: at most 20 attempts a second per client
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (kind, outcomes)
        }));
    }
    let mut all = Tally::default();
    for g in good {
        let t = g.await.expect("a client task panicked");
        all.sent += t.sent;
        for (k, v) in t.by_status {
            *all.by_status.entry(k).or_default() += v;
        }
        all.ok_ms.extend(t.ok_ms);
        all.refused_ms.extend(t.refused_ms);
        all.mismatched += t.mismatched;
        all.max_diff = all.max_diff.max(t.max_diff);
    }
    let mut report = LevelReport {
        concurrency: cfg.concurrency,
        ..Default::default()
    };
    for b in bad {
        let (kind, outcomes) = b.await.expect("a client task panicked");
        let name = serde_json::to_value(kind)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        let e = report.bad.entry(name).or_default();
        for (k, v) in outcomes {
            *e.entry(k).or_default() += v;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    all.ok_ms.sort_by(f64::total_cmp);
    all.refused_ms.sort_by(f64::total_cmp);
    report.seconds = seconds;
    report.sent = all.sent;
    report.throughput = all.ok_ms.len() as f64 / seconds;
    report.p50_ms = percentile(&all.ok_ms, 50.0);
    report.p99_ms = percentile(&all.ok_ms, 99.0);
    report.max_ms = all.ok_ms.last().copied().unwrap_or(0.0);
    report.p99_refused_ms = (!all.refused_ms.is_empty()).then(|| percentile(&all.refused_ms, 99.0));
    report.mismatched = all.mismatched;
    report.max_box_diff_px = all.max_diff;
    report.by_status = all.by_status;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(url_encode("the cat/é"), "the%20cat%2F%C3%A9");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 50.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 99.0), 5.0);
        assert!(check_loopback(&"127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(check_loopback(&"10.0.0.1:80".parse().unwrap()).is_err());
        assert_eq!(
            max_diff(&[[0.0, 1.0, 2.0, 3.0]], &[[0.0, 1.5, 2.0, 3.0]]),
            0.5
        );
    }
}
