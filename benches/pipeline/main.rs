//! The pipeline benchmark: the real release binary, run as child processes against the real
//! PostgreSQL and RabbitMQ, driven over HTTP, with the ceilings (what PostgreSQL and the
//! broker do alone) measured in the same run so every figure can be stated as a ratio.
//!
//! ```text
//! cargo bench --bench pipeline                  # the standard set (about 3 minutes)
//! cargo bench --bench pipeline -- soak          # long: steady load over a 10 M history
//! cargo bench --bench pipeline -- lists         # ranked lists over a big read model
//! cargo bench --bench pipeline -- consumers     # 1, 2, 3 consumer processes
//! cargo bench --bench pipeline -- standard soak # several at once, in that order
//! ```
//!
//! It prints one table (phase, figure, value, target, ratio to a ceiling, met) and writes
//! `target/bench-pipeline.json` with the evidence (CPU per process from /proc, PostgreSQL
//! wait events). Child logs go to `target/bench-logs/`. Each phase is a module with one
//! `run` function returning its figures (`report::Figures`); see `benches/README.md`.
//!
//! The standard set: `ceiling` (pgbench running `benches/ceiling/*.sql`), `pipeline`
//! (`all`: order burst, drain, freshness, queries, RSS, outbox bytes per order),
//! `backlog` (publisher and consumer drains of a backlog), `broker` (RabbitMQ alone with
//! the same messages, window and prefetch, so the drains are ratios of it), `batch` (the
//! consumer's database work for one-event batches, in one statement and the long way).
//!
//! Environment overrides (all optional): `BENCH_SECONDS` (15, order burst), `BENCH_QUERY_SECONDS`
//! (10), `BENCH_CLIENTS` (32), `BENCH_PRODUCTS` (200), `BENCH_FRESH_SAMPLES` (100),
//! `BENCH_BACKLOG` (50000 events in the backlog and broker phases), `BENCH_CEILING_SECONDS`
//! (10 per figure; 0 skips), `BENCH_DRAIN_TIMEOUT` (120 s), `BENCH_JSON`
//! (`target/bench-pipeline.json`), and the harness' `TEST_PG_URL` / `TEST_BROKER_URL`.
//! Every tuning variable of the binary (`.env.example`) set in the environment reaches
//! every child process. A smoke run: `BENCH_SECONDS=3 BENCH_QUERY_SECONDS=2
//! BENCH_FRESH_SAMPLES=20 BENCH_BACKLOG=5000 BENCH_CEILING_SECONDS=2 cargo bench --bench pipeline`.

// The test harness, shared with tests/it: fresh databases, broker names, totals.
#[allow(dead_code)]
#[path = "../../tests/it/harness.rs"]
mod harness;

mod backlog;
mod batch;
mod broker;
mod ceiling;
mod client;
mod consumers;
mod lists;
mod pipeline;
mod report;
mod sample;
mod services;
mod soak;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::ceiling::Ceilings;
use crate::report::Report;

/// The settings every phase reads.
pub struct Settings {
    pub seconds: u64,
    pub query_seconds: u64,
    pub clients: usize,
    pub products: usize,
    pub customers: usize,
    pub fresh_samples: usize,
    pub backlog: i64,
    pub ceiling_seconds: u64,
    pub drain_timeout: Duration,
    pub json_path: PathBuf,
    pub log_dir: PathBuf,
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
        _ => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        Settings {
            seconds: env_or("BENCH_SECONDS", 15),
            query_seconds: env_or("BENCH_QUERY_SECONDS", 10),
            clients: env_or("BENCH_CLIENTS", 32),
            products: env_or("BENCH_PRODUCTS", 200),
            customers: env_or("BENCH_CUSTOMERS", 20_000),
            fresh_samples: env_or("BENCH_FRESH_SAMPLES", 100),
            backlog: env_or("BENCH_BACKLOG", 50_000),
            ceiling_seconds: env_or("BENCH_CEILING_SECONDS", 10),
            drain_timeout: Duration::from_secs(env_or("BENCH_DRAIN_TIMEOUT", 120)),
            json_path: std::env::var("BENCH_JSON")
                .map(PathBuf::from)
                .unwrap_or_else(|_| manifest.join("target/bench-pipeline.json")),
            log_dir: manifest.join("target/bench-logs"),
        }
    }
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// The phases one can ask for on the command line.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Set {
    Standard,
    Soak,
    Consumers,
    Lists,
}

fn parse_args() -> Result<Vec<Set>, String> {
    let mut sets = Vec::new();
    // `cargo bench` passes `--bench`; flags are not ours.
    for a in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
        let set = match a.as_str() {
            "standard" => Set::Standard,
            "soak" => Set::Soak,
            "consumers" => Set::Consumers,
            "lists" => Set::Lists,
            other => {
                return Err(format!(
                    "unknown phase set {other:?}; known: standard, soak, consumers, lists"
                ))
            }
        };
        sets.push(set);
    }
    if sets.is_empty() {
        sets.push(Set::Standard);
    }
    Ok(sets)
}

fn main() -> ExitCode {
    let sets = match parse_args() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let s = Settings::from_env();
    std::fs::create_dir_all(&s.log_dir).expect("creating target/bench-logs");
    let started = Instant::now();
    log(format!(
        "phase sets {sets:?}; child logs in {}",
        s.log_dir.display()
    ));
    let mut report = Report::default();
    // The ceilings matter to the standard set's ratios; the other sets compare runs.
    let ceilings = if sets.contains(&Set::Standard) {
        ceiling::run(s.ceiling_seconds)
    } else {
        Ceilings::default()
    };
    if sets.contains(&Set::Standard) {
        report.add("ceiling", &ceilings, &ceilings);
    }
    for set in &sets {
        match set {
            Set::Standard => standard(&s, &ceilings, &mut report),
            Set::Soak => report.add("soak", &soak::run(&s), &ceilings),
            Set::Consumers => report.add("consumers", &consumers::run(&s), &ceilings),
            Set::Lists => report.add("lists", &lists::run(&s), &ceilings),
        }
    }
    report.print();
    let runtime = started.elapsed().as_secs_f64();
    println!("total runtime {runtime:.0} s; shared 2-core machine: absolute figures are noisy, ratios to ceilings of the same run less so");
    let header = json!({
        "command": format!("cargo bench --bench pipeline -- {}", std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect::<Vec<_>>().join(" ")),
        "runtime_seconds": round(runtime, 1),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "settings": {"seconds": s.seconds, "query_seconds": s.query_seconds, "clients": s.clients,
                     "products": s.products, "fresh_samples": s.fresh_samples, "backlog": s.backlog,
                     "ceiling_seconds": s.ceiling_seconds,
                     "tuning_env": services::tuning().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
    });
    report.write_json(&s.json_path, header);
    ExitCode::SUCCESS
}

/// The default set: the pipeline under load, the backlog drains, the broker alone.
fn standard(s: &Settings, ceilings: &Ceilings, report: &mut Report) {
    let p = pipeline::run(s);
    report.add("pipeline", &p, ceilings);
    let mut b = backlog::run(s);
    let alone = broker::run(s, p.event_bytes.round() as usize);
    b.broker = Some((alone.confirms_per_s, alone.delivers_per_s));
    report.add("backlog", &b, ceilings);
    report.add("broker", &alone, ceilings);
    report.add("batch", &batch::run(s), ceilings);
}
