//! `groundkit loadtest`: starts `groundkit serve` on a run (loopback, a free port) once per
//! `--max-batch` setting, and drives it at each `--concurrency` with
//! [`gk_serve::load::run_level`], misbehaving clients mixed in. Reports throughput, p50/p99
//! latency, answers by status, boxes against the same request alone, and the server's peak
//! memory (`VmHWM` of its process); checks it answers correctly after each level and exits
//! cleanly on SIGTERM.

use anyhow::{bail, Context, Result};
use gk_serve::load::{self, LevelConfig, LevelReport, Query};
use gk_train::batch_predict::Input;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The run to serve.
    #[arg(long)]
    run: PathBuf,
    /// Where the requests come from: a JSONL of {"image", "expr"} rows (e.g. a val set), or a
    /// folder of images with --expr.
    #[arg(long)]
    input: PathBuf,
    /// Folder the rows' image paths are relative to (default: the JSONL's folder).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Expressions for a folder input.
    #[arg(long)]
    expr: Vec<String>,
    /// Distinct requests (the first this many readable rows), sent round-robin.
    #[arg(long, default_value_t = 32)]
    queries: usize,
    /// Good clients per level, comma-separated.
    #[arg(long, default_value = "1,8,32,128", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Misbehaving clients per level (malformed, oversize, slow head, slow body in turn).
    #[arg(long, default_value_t = 4)]
    bad_clients: usize,
    /// The server's --max-batch, one server per value (1: no micro-batching).
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    max_batch: Vec<usize>,
    /// The server's --queue.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// The server's --timeout-s and --header-timeout-s (short, so slow clients are cut
    /// within a level).
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
    #[arg(long, default_value_t = 2)]
    header_timeout_s: u64,
    /// Print the reports as JSON lines.
    #[arg(long)]
    json: bool,
}

/// A served run in a child process.
struct Served {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Served {
    fn start(a: &LoadtestArgs, max_batch: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the groundkit binary")?;
        let mut child = Command::new(exe)
            .args(["serve", "--run"])
            .arg(&a.run)
            .args(["--addr", "127.0.0.1:0"])
            .args(["--max-batch", &max_batch.to_string()])
            .args(["--queue", &a.queue.to_string()])
            .args(["--timeout-s", &a.timeout_s.to_string()])
            .args(["--header-timeout-s", &a.header_timeout_s.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting groundkit serve")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .with_context(|| format!("the server did not start (its first line: {line:?})"))?
            .parse()?;
        load::check_loopback(&addr).map_err(anyhow::Error::msg)?;
        Ok(Self { child, addr })
    }

    /// The server process's peak resident memory so far, MiB (Linux).
    fn peak_rss_mib(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("sending SIGTERM")?;
        Ok(self.child.wait()?)
    }
}

fn pool(a: &LoadtestArgs) -> Result<Vec<Query>> {
    let input = if a.input.is_dir() {
        Input::Folder {
            dir: a.input.clone(),
            exprs: a.expr.clone(),
        }
    } else {
        Input::Jsonl(a.input.clone())
    };
    let root = a.images.clone().unwrap_or_else(|| input.default_root());
    let mut out = Vec::new();
    for r in input.rows()? {
        if out.len() == a.queries {
            break;
        }
        let path = gk_data::dataset::resolve_image(&root, &r.image);
        if r.error.is_some() || r.expr.trim().is_empty() {
            continue;
        }
        if let Ok(bytes) = std::fs::read(&path) {
            out.push(Query {
                image: Arc::new(bytes),
                exprs: vec![r.expr.clone()],
            });
        }
    }
    if out.is_empty() {
        bail!("no readable requests in {}", a.input.display());
    }
    Ok(out)
}

pub fn run(a: LoadtestArgs) -> Result<()> {
    let pool = Arc::new(pool(&a)?);
    let rt = tokio::runtime::Runtime::new()?;
    if !a.json {
        println!(
            "{:>5} {:>5} {:>7} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
            "batch",
            "conc",
            "sent",
            "200",
            "503",
            "other",
            "ok/s",
            "p50 ms",
            "p99 ms",
            "p99 503",
            "mismatch",
            "peak MiB"
        );
    }
    for &max_batch in &a.max_batch {
        let served = Served::start(&a, max_batch)?;
        let addr = served.addr;
        let want = Arc::new(
            rt.block_on(load::reference(addr, &pool))
                .map_err(anyhow::Error::msg)?,
        );
        for &concurrency in &a.concurrency {
            let cfg = LevelConfig {
                concurrency,
                duration: Duration::from_secs_f64(a.seconds),
                bad_clients: a.bad_clients,
                client_timeout: Duration::from_secs(a.timeout_s + 5),
            };
            let r: LevelReport =
                rt.block_on(load::run_level(addr, pool.clone(), want.clone(), cfg));
            let peak = served.peak_rss_mib();
            // the server still answers correctly after the level
            let after = rt
                .block_on(load::reference(addr, &pool[..1]))
                .map_err(anyhow::Error::msg)
                .context("after the level")?;
            if after[0] != want[0] {
                bail!("after the level at concurrency {concurrency} the first query's boxes changed: {:?} vs {:?}", after[0], want[0]);
            }
            if a.json {
                let mut v = serde_json::to_value(&r)?;
                v["max_batch"] = max_batch.into();
                v["peak_rss_mib"] = peak.into();
                println!("{v}");
            } else {
                let count = |k: &str| r.by_status.get(k).copied().unwrap_or(0);
                let other = r.sent - count("200") - count("503");
                println!(
                    "{:>5} {:>5} {:>7} {:>6} {:>6} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>8} {:>9}",
                    max_batch,
                    concurrency,
                    r.sent,
                    count("200"),
                    count("503"),
                    other,
                    r.throughput,
                    r.p50_ms,
                    r.p99_ms,
                    r.p99_refused_ms
                        .map_or("-".to_string(), |v| format!("{v:.1}")),
                    r.mismatched,
                    peak.map_or("-".to_string(), |v| format!("{v:.0}")),
                );
                for (kind, outcomes) in &r.bad {
                    let o: Vec<String> =
                        outcomes.iter().map(|(k, n)| format!("{k} x{n}")).collect();
                    eprintln!("      bad {kind}: {}", o.join(", "));
                }
            }
        }
        let status = served.stop()?;
        if !status.success() {
            bail!("the server (max batch {max_batch}) exited with {status} after SIGTERM");
        }
    }
    Ok(())
}
