//! The server's counters in Prometheus' text format (`GET /metrics`): requests by route and
//! status, a request latency histogram, queue depth and capacity, a histogram of forward
//! sizes (queries per micro-batch) and the forwards' time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the batch-size buckets, queries.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            *c += (v <= *b) as u64;
        }
        self.sum += v;
        self.n += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.n);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.n);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (route, status) -> count
    requests: BTreeMap<(&'static str, u16), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    batch: Histogram,
    forward_seconds: f64,
}

/// Shared counters.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// One answered request on `route` (a fixed name, not the raw path).
    pub fn observe_request(&self, route: &'static str, status: u16, took: Duration) {
        let mut m = self.inner.lock().unwrap();
        *m.requests.entry((route, status)).or_default() += 1;
        m.latency
            .entry(route)
            .or_default()
            .observe(&LATENCY_BUCKETS, took.as_secs_f64());
    }

    /// One forward of `queries` queries.
    pub fn observe_forward(&self, queries: usize, took: Duration) {
        let mut m = self.inner.lock().unwrap();
        m.batch.observe(&BATCH_BUCKETS, queries as f64);
        m.forward_seconds += took.as_secs_f64();
    }

    /// Requests answered with `status` on `route` so far.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        let m = self.inner.lock().unwrap();
        m.requests
            .iter()
            .filter(|((r, s), _)| *r == route && *s == status)
            .map(|(_, n)| n)
            .sum()
    }

    /// The text exposition, with the queue's current depth and capacity.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize) -> String {
        let m = self.inner.lock().unwrap();
        let mut out = String::new();
        out += "# HELP groundkit_requests_total Requests answered, by route and status.\n";
        out += "# TYPE groundkit_requests_total counter\n";
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "groundkit_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out += "# HELP groundkit_request_seconds Time from a request's head to its answer.\n";
        out += "# TYPE groundkit_request_seconds histogram\n";
        for (route, h) in &m.latency {
            h.render(
                &mut out,
                "groundkit_request_seconds",
                &format!("route=\"{route}\""),
                &LATENCY_BUCKETS,
            );
        }
        out += "# HELP groundkit_queue_depth Admitted requests not yet answered.\n";
        out += "# TYPE groundkit_queue_depth gauge\n";
        let _ = writeln!(out, "groundkit_queue_depth {queue_depth}");
        out += "# HELP groundkit_queue_capacity Admitted requests at most (more get 503).\n";
        out += "# TYPE groundkit_queue_capacity gauge\n";
        let _ = writeln!(out, "groundkit_queue_capacity {queue_capacity}");
        out += "# HELP groundkit_batch_queries Queries per model forward (micro-batch size).\n";
        out += "# TYPE groundkit_batch_queries histogram\n";
        m.batch
            .render(&mut out, "groundkit_batch_queries", "", &BATCH_BUCKETS);
        out += "# HELP groundkit_forward_seconds_total Time spent in model forwards.\n";
        out += "# TYPE groundkit_forward_seconds_total counter\n";
        let _ = writeln!(out, "groundkit_forward_seconds_total {}", m.forward_seconds);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_cumulative_buckets_and_counts() {
        let m = Metrics::default();
        m.observe_request("ground", 200, Duration::from_millis(20));
        m.observe_request("ground", 200, Duration::from_millis(300));
        m.observe_request("ground", 503, Duration::from_micros(100));
        m.observe_forward(3, Duration::from_millis(10));
        let text = m.render(2, 64);
        for line in [
            "groundkit_requests_total{route=\"ground\",status=\"200\"} 2",
            "groundkit_requests_total{route=\"ground\",status=\"503\"} 1",
            "groundkit_request_seconds_bucket{route=\"ground\",le=\"0.005\"} 1",
            "groundkit_request_seconds_bucket{route=\"ground\",le=\"0.025\"} 2",
            "groundkit_request_seconds_bucket{route=\"ground\",le=\"+Inf\"} 3",
            "groundkit_request_seconds_count{route=\"ground\"} 3",
            "groundkit_queue_depth 2",
            "groundkit_queue_capacity 64",
            "groundkit_batch_queries_bucket{le=\"2\"} 0",
            "groundkit_batch_queries_bucket{le=\"4\"} 1",
            "groundkit_batch_queries_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.requests("ground", 200), 2);
    }
}
