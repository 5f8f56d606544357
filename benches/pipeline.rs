//! The pipeline benchmark (issue 5): the real release binary, run as child processes
//! against the real PostgreSQL and RabbitMQ, driven over HTTP by a small keep-alive client
//! on std threads. Run it with
//!
//! ```text
//! cargo bench --bench pipeline
//! ```
//!
//! It prints a table and writes `target/bench-pipeline.json`. Phases, in order:
//!
//! 1. ceiling: `../shared/bench/pg-ceiling.sh` (pgbench running the system's transactions;
//!    skipped with a note when the script is not there), run first while the machine is quiet;
//! 2. `all` on fresh databases (`bench_write`, `bench_read`) and unique broker names:
//!    products, then orders at a fixed number of clients for a fixed time, then the drain
//!    (end of the burst until the read model equals the write model, totals compared in SQL),
//!    freshness (201 → visible in the query service, sequential samples), queries (GET
//!    product sales for random products), and the peak RSS of `all` (VmHWM);
//! 3. `../shared/bench/loadtest.py` against another fresh `all` (its own databases), summary
//!    included;
//! 4. backlogs: `command-service` with `OUTBOX_PUBLISHERS=0` takes N orders, then a
//!    `command-service` with publishers and no consumer drains the outbox into the broker
//!    (publisher events/s), then `consumer-service` drains the queue (consumer events/s).
//!
//! While the order burst, the queries and the backlog drains run, the benchmark records
//! the CPU used per process group (from /proc) and samples `pg_stat_activity` wait events,
//! so the report says what bounds each figure. The machine is shared: figures are noisy,
//! ratios to the ceiling (taken in the same run) hold better than absolute numbers.
//!
//! Environment overrides (all optional):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `BENCH_SECONDS` | 15 | order burst length, s |
//! | `BENCH_QUERY_SECONDS` | 10 | query phase length, s |
//! | `BENCH_CLIENTS` | 32 | concurrent HTTP clients (orders, queries, backlog fill) |
//! | `BENCH_PRODUCTS` | 200 | products created before the orders |
//! | `BENCH_FRESH_SAMPLES` | 100 | sequential freshness samples |
//! | `BENCH_BACKLOG` | 50000 | orders in the publisher/consumer backlog phases (0 skips) |
//! | `BENCH_CEILING_SECONDS` | 10 | seconds per pg-ceiling figure (0 skips the ceiling) |
//! | `BENCH_LOADTEST` | 1 | 0 skips loadtest.py |
//! | `BENCH_DRAIN_TIMEOUT` | 120 | give up waiting for a drain after this many seconds |
//! | `BENCH_SHARED_DIR` | `../shared/bench` | where pg-ceiling.sh and loadtest.py live |
//! | `BENCH_PG_URL` | `postgresql://postgres@127.0.0.1:5432` | superuser URL, no database |
//! | `BENCH_BROKER_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` | RabbitMQ |
//! | `BENCH_JSON` | `target/bench-pipeline.json` | where the JSON goes |
//!
//! Every tuning variable of the binary (`COMMAND_HTTP_WORKERS`, `WRITE_POOL_SIZE`,
//! `OUTBOX_BATCH_SIZE`, `CONSUMER_BATCH_SIZE`, ... see `.env.example`) set in the
//! environment of `cargo bench` reaches every child process, so knobs can be compared
//! with e.g. `CONSUMER_THREADS=1 BENCH_SECONDS=5 cargo bench --bench pipeline`.
//! A quick smoke run: `BENCH_SECONDS=3 BENCH_QUERY_SECONDS=2 BENCH_FRESH_SAMPLES=20
//! BENCH_BACKLOG=5000 BENCH_CEILING_SECONDS=0 BENCH_LOADTEST=0 cargo bench --bench pipeline`.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cqrs-analytics");
const CATEGORIES: &[&str] = &[
    "Electronics",
    "Books",
    "Home",
    "Garden",
    "Toys",
    "Sports",
    "Beauty",
    "Grocery",
];

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

struct Settings {
    seconds: u64,
    query_seconds: u64,
    clients: usize,
    products: usize,
    fresh_samples: usize,
    backlog: i64,
    ceiling_seconds: u64,
    loadtest: bool,
    drain_timeout: Duration,
    shared_dir: PathBuf,
    pg: String,
    broker: String,
    json_path: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
        _ => default,
    }
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

impl Settings {
    fn from_env() -> Settings {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        Settings {
            seconds: env_or("BENCH_SECONDS", 15),
            query_seconds: env_or("BENCH_QUERY_SECONDS", 10),
            clients: env_or("BENCH_CLIENTS", 32),
            products: env_or("BENCH_PRODUCTS", 200),
            fresh_samples: env_or("BENCH_FRESH_SAMPLES", 100),
            backlog: env_or("BENCH_BACKLOG", 50_000),
            ceiling_seconds: env_or("BENCH_CEILING_SECONDS", 10),
            loadtest: env_or("BENCH_LOADTEST", 1u8) != 0,
            drain_timeout: Duration::from_secs(env_or("BENCH_DRAIN_TIMEOUT", 120)),
            shared_dir: std::env::var("BENCH_SHARED_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| manifest.join("../shared/bench")),
            pg: env_str("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432"),
            broker: env_str("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            json_path: std::env::var("BENCH_JSON")
                .map(PathBuf::from)
                .unwrap_or_else(|_| manifest.join("target/bench-pipeline.json")),
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 keep-alive client
// ---------------------------------------------------------------------------------------

struct Http {
    addr: SocketAddr,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
    buf: Vec<u8>,
}

impl Http {
    fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            conn: None,
            buf: Vec::with_capacity(1024),
        }
    }

    /// One request; reconnects once if a kept-alive connection turns out closed.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, String)> {
        match self.try_request(method, path, body) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.conn = None;
                self.try_request(method, path, body)
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.conn = Some((BufReader::new(s.try_clone()?), s));
        }
        let (reader, writer) = self.conn.as_mut().expect("connected");
        self.buf.clear();
        match body {
            Some(b) => write!(
                self.buf,
                "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )?,
            None => write!(self.buf, "{method} {path} HTTP/1.1\r\nHost: bench\r\n\r\n")?,
        }
        writer.write_all(&self.buf)?;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed in headers",
                ));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse().unwrap_or(0);
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked reply"));
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// xorshift64*: a dependency-free random number generator for request shapes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone)]
struct Product {
    id: i64,
    price: String,
}

fn order_body(rng: &mut Rng, products: &[Product]) -> String {
    let n = 1 + rng.below(3);
    let mut picked: Vec<usize> = Vec::with_capacity(n);
    while picked.len() < n.min(products.len()) {
        let k = rng.below(products.len());
        if !picked.contains(&k) {
            picked.push(k);
        }
    }
    let items: Vec<String> = picked
        .iter()
        .map(|&k| {
            format!(
                r#"{{"productId":{},"quantity":{},"price":{}}}"#,
                products[k].id,
                1 + rng.below(3),
                products[k].price
            )
        })
        .collect();
    format!(
        r#"{{"customerId":{},"items":[{}]}}"#,
        1 + rng.below(20_000),
        items.join(",")
    )
}

// ---------------------------------------------------------------------------------------
// Closed-loop load: N clients, each one request at a time
// ---------------------------------------------------------------------------------------

enum Until {
    Time(Duration),
    /// Stop after this many successful requests in total.
    Count(i64),
}

struct LoadResult {
    ok: u64,
    other: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
    statuses: HashMap<u16, u64>,
}

impl LoadResult {
    fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
    fn pct_ms(&self, p: f64) -> f64 {
        pct(&self.latencies_us, p) / 1000.0
    }
}

/// Percentile of sorted values (nearest rank).
fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64
}

/// One client's (ok, other, errors, latencies in µs, replies by status).
type ClientTally = (u64, u64, u64, Vec<u64>, HashMap<u16, u64>);

fn load<F>(addr: SocketAddr, clients: usize, until: Until, expect: u16, make: F) -> LoadResult
where
    F: Fn(&mut Rng) -> (&'static str, String, Option<String>) + Sync,
{
    let remaining = AtomicI64::new(match until {
        Until::Count(n) => n,
        Until::Time(_) => i64::MAX,
    });
    let start = Instant::now();
    let deadline = match until {
        Until::Time(d) => Some(start + d),
        Until::Count(_) => None,
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let parts: Vec<ClientTally> = thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (make, remaining) = (&make, &remaining);
                s.spawn(move || {
                    let mut rng = Rng::new(seed ^ ((c as u64 + 1) * 0x1234_5678_9abc));
                    let mut http = Http::new(addr);
                    let (mut ok, mut other, mut errors) = (0u64, 0u64, 0u64);
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut statuses = HashMap::new();
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d)
                            || remaining.load(Ordering::Relaxed) <= 0
                        {
                            break;
                        }
                        let (method, path, body) = make(&mut rng);
                        let t = Instant::now();
                        match http.request(method, &path, body.as_deref()) {
                            Ok((status, _)) => {
                                lat.push(t.elapsed().as_micros() as u64);
                                *statuses.entry(status).or_insert(0) += 1;
                                if status == expect {
                                    ok += 1;
                                    remaining.fetch_sub(1, Ordering::Relaxed);
                                } else {
                                    other += 1;
                                }
                            }
                            Err(_) => {
                                errors += 1;
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    (ok, other, errors, lat, statuses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut r = LoadResult {
        ok: 0,
        other: 0,
        errors: 0,
        seconds,
        latencies_us: Vec::new(),
        statuses: HashMap::new(),
    };
    for (ok, other, errors, lat, statuses) in parts {
        r.ok += ok;
        r.other += other;
        r.errors += errors;
        r.latencies_us.extend(lat);
        for (k, v) in statuses {
            *r.statuses.entry(k).or_insert(0) += v;
        }
    }
    r.latencies_us.sort_unstable();
    r
}

// ---------------------------------------------------------------------------------------
// Child processes and /proc
// ---------------------------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Names {
    exchange: String,
    product_queue: String,
    order_queue: String,
    dlx: String,
    dlq: String,
}

impl Names {
    fn new(tag: &str) -> Names {
        Names {
            exchange: format!("bench.{tag}.events"),
            product_queue: format!("bench.{tag}.product-events"),
            order_queue: format!("bench.{tag}.order-events"),
            dlx: format!("bench.{tag}.dlx"),
            dlq: format!("bench.{tag}.dlq"),
        }
    }
}

/// What every child gets: its databases, the broker, unique names and free ports.
struct Env {
    write_db: String,
    vars: Vec<(String, String)>,
    command: SocketAddr,
    query: SocketAddr,
    consumer: SocketAddr,
}

impl Env {
    fn new(s: &Settings, write_db: &str, read_db: &str, names: &Names) -> Env {
        let (c, q, k) = (free_port(), free_port(), free_port());
        let write_url = format!("{}/{write_db}", s.pg);
        let read_url = format!("{}/{read_db}", s.pg);
        let mut vars = vec![
            ("DATABASE_URL", write_url),
            ("READ_DATABASE_URL", read_url),
            ("BROKER_URL", s.broker.clone()),
            ("HTTP_BIND_ADDR", "127.0.0.1".into()),
            ("COMMAND_SERVICE_PORT", c.to_string()),
            ("QUERY_SERVICE_PORT", q.to_string()),
            ("CONSUMER_SERVICE_PORT", k.to_string()),
            ("BROKER_EXCHANGE", names.exchange.clone()),
            ("BROKER_PRODUCT_QUEUE", names.product_queue.clone()),
            ("BROKER_ORDER_QUEUE", names.order_queue.clone()),
            ("BROKER_DEAD_LETTER_EXCHANGE", names.dlx.clone()),
            ("BROKER_DEAD_LETTER_QUEUE", names.dlq.clone()),
        ];
        if std::env::var("RUST_LOG").is_err() {
            vars.push(("RUST_LOG", "warn".into()));
        }
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Env {
            write_db: write_db.into(),
            vars: vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            command: addr(c),
            query: addr(q),
            consumer: addr(k),
        }
    }
}

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(env: &Env, role: &str, extra: &[(&str, &str)], log_dir: &Path) -> Proc {
        let log_path = log_dir.join(format!("{role}-{}.log", env.write_db));
        let log_file = fs::File::create(&log_path).expect("creating a log file");
        let mut cmd = Command::new(BIN);
        cmd.arg(role)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning the release binary");
        Proc {
            name: role.to_string(),
            child,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (graceful), then SIGKILL after 15 s.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        log(format!(
            "{} did not stop within 15 s; killing it",
            self.name
        ));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_healthy(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut http = Http::new(addr);
    loop {
        if let Ok((200, _)) = http.request("GET", "/health", None) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{addr} not healthy after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of a Prometheus counter's samples from a service's /metrics (cheap to poll,
/// unlike counting outbox or processed_events rows in SQL, which costs PostgreSQL CPU).
fn metric(http: &mut Http, name: &str) -> Option<f64> {
    let (status, body) = http.request("GET", "/metrics", None).ok()?;
    if status != 200 {
        return None;
    }
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// VmHWM (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks (user + system) per process group, plus the machine's busy/total ticks.
#[derive(Default, Clone)]
struct CpuSnap {
    by_group: HashMap<String, u64>,
    machine_busy: u64,
    machine_total: u64,
    at: Option<Instant>,
}

fn cpu_snapshot(mine: &[(u32, &str)]) -> CpuSnap {
    let mut snap = CpuSnap {
        at: Some(Instant::now()),
        ..Default::default()
    };
    let me = std::process::id();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let group = if pid == me {
                "bench client".to_string()
            } else if let Some((_, n)) = mine.iter().find(|(p, _)| *p == pid) {
                format!("cqrs-analytics {n}")
            } else {
                match comm {
                    "postgres" => "postgres".into(),
                    "beam.smp" | "erl_child_setup" | "epmd" => "rabbitmq".into(),
                    "wrk" => "wrk".into(),
                    _ => "other".into(),
                }
            };
            *snap.by_group.entry(group).or_insert(0) += ticks;
        }
    }
    if let Ok(s) = fs::read_to_string("/proc/stat") {
        if let Some(l) = s.lines().next() {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            snap.machine_total = v.iter().sum();
            // idle + iowait
            snap.machine_busy = snap.machine_total
                - v.get(3).copied().unwrap_or(0)
                - v.get(4).copied().unwrap_or(0);
        }
    }
    snap
}

/// CPU used between two snapshots, in cores (1.0 = one core busy the whole time).
fn cpu_delta(a: &CpuSnap, b: &CpuSnap) -> Value {
    let secs = b.at.unwrap().duration_since(a.at.unwrap()).as_secs_f64();
    let hz = 100.0; // USER_HZ on Linux
    let mut groups: Vec<(String, f64)> = b
        .by_group
        .iter()
        .map(|(k, v)| {
            let before = a.by_group.get(k).copied().unwrap_or(0);
            (k.clone(), v.saturating_sub(before) as f64 / hz / secs)
        })
        .filter(|(_, c)| *c >= 0.005)
        .collect();
    groups.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut obj = serde_json::Map::new();
    for (k, c) in groups {
        obj.insert(k, json!(round(c, 2)));
    }
    let total = (b.machine_total - a.machine_total) as f64;
    let busy = (b.machine_busy - a.machine_busy) as f64;
    obj.insert(
        "machine busy (of all cores)".into(),
        json!(round(if total > 0.0 { busy / total } else { 0.0 }, 2)),
    );
    Value::Object(obj)
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: databases, totals, wait-event sampling
// ---------------------------------------------------------------------------------------

fn pg(s: &Settings, db: &str) -> Client {
    Client::connect(&format!("{}/{db}", s.pg), NoTls)
        .unwrap_or_else(|e| panic!("connecting to {db}: {e}"))
}

fn recreate_databases(s: &Settings, dbs: &[&str]) {
    let mut admin = pg(s, "postgres");
    for db in dbs {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
}

fn drop_databases(s: &Settings, dbs: &[&str]) {
    let mut admin = pg(s, "postgres");
    for db in dbs {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    }
}

type Totals = (i64, i64, String, String, i64);

fn write_totals(c: &mut Client) -> Totals {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM orders),
                    (SELECT coalesce(sum(quantity), 0)::bigint FROM order_items),
                    (SELECT coalesce(sum(quantity * price), 0)::numeric(24,2)::text FROM order_items),
                    (SELECT coalesce(sum(total), 0)::numeric(24,2)::text FROM orders),
                    (SELECT count(*) FROM orders)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// The same totals from the read model (customer, product and hourly views).
fn read_totals(c: &mut Client) -> Totals {
    let r = c
        .query_one(
            "SELECT (SELECT coalesce(sum(order_count), 0)::bigint FROM customer_ltv_view),
                    (SELECT coalesce(sum(total_quantity_sold), 0)::bigint FROM product_sales_view),
                    (SELECT coalesce(sum(total_revenue), 0)::numeric(24,2)::text FROM product_sales_view),
                    (SELECT coalesce(sum(total_spent), 0)::numeric(24,2)::text FROM customer_ltv_view),
                    (SELECT coalesce(sum(total_orders), 0)::bigint FROM hourly_sales_view)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// Polls until the read model equals `want`; returns the time from `since`, or None.
fn wait_converged(
    read: &mut Client,
    want: &Totals,
    since: Instant,
    timeout: Duration,
) -> Option<f64> {
    loop {
        let got = read_totals(read);
        if &got == want {
            return Some(since.elapsed().as_secs_f64());
        }
        if since.elapsed() > timeout {
            log(format!("no convergence: write {want:?}, read {got:?}"));
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Samples pg_stat_activity of one database every 20 ms until stopped: which wait event
/// (or CPU) each active backend is in, and what it runs.
struct WaitSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(u64, HashMap<String, u64>)>,
}

impl WaitSampler {
    fn start(s: &Settings, db: &str) -> WaitSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = pg(s, "postgres");
        let (db, flag) = (db.to_string(), stop.clone());
        let handle = thread::spawn(move || {
            let mut counts: HashMap<String, u64> = HashMap::new();
            let mut samples = 0u64;
            while !flag.load(Ordering::Relaxed) {
                samples += 1;
                if let Ok(rows) = c.query(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'),
                            left(regexp_replace(query, '\\s+', ' ', 'g'), 70)
                     FROM pg_stat_activity
                     WHERE datname = $1 AND state = 'active' AND pid <> pg_backend_pid()",
                    &[&db],
                ) {
                    for r in rows {
                        let w: String = r.get(0);
                        let q: String = r.get(1);
                        *counts.entry(format!("{w} | {}", q.trim())).or_insert(0) += 1;
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            (samples, counts)
        });
        WaitSampler { stop, handle }
    }

    /// Top entries as average number of active backends in that state.
    fn finish(self) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, counts) = self.handle.join().unwrap();
        let mut v: Vec<(String, u64)> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let total: f64 = v.iter().map(|(_, n)| *n as f64).sum::<f64>() / samples.max(1) as f64;
        let top: Vec<Value> = v
            .into_iter()
            .take(8)
            .map(|(k, n)| json!({"backends": round(n as f64 / samples.max(1) as f64, 2), "state": k}))
            .collect();
        json!({"avg_active_backends": round(total, 2), "top": top})
    }
}

// ---------------------------------------------------------------------------------------
// Broker clean-up
// ---------------------------------------------------------------------------------------

fn delete_broker_names(s: &Settings, names: &Names) {
    let Ok(mut conn) = amiquip::Connection::insecure_open(&s.broker) else {
        log("could not connect to the broker to delete the bench queues");
        return;
    };
    for q in [&names.product_queue, &names.order_queue, &names.dlq] {
        if let Ok(ch) = conn.open_channel(None) {
            let _ = ch.queue_delete(q.as_str(), amiquip::QueueDeleteOptions::default());
        }
    }
    for x in [&names.exchange, &names.dlx] {
        if let Ok(ch) = conn.open_channel(None) {
            let _ = ch.exchange_delete(x.as_str(), false);
        }
    }
    let _ = conn.close();
}

fn queue_depth(s: &Settings, queue: &str) -> Option<u32> {
    let mut conn = amiquip::Connection::insecure_open(&s.broker).ok()?;
    let ch = conn.open_channel(None).ok()?;
    let n = ch
        .queue_declare_passive(queue)
        .ok()
        .and_then(|q| q.declared_message_count());
    let _ = conn.close();
    n
}

// ---------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------

fn create_products(addr: SocketAddr, n: usize, tag: &str, category: Option<&str>) -> Vec<Product> {
    let mut http = Http::new(addr);
    let mut rng = Rng::new(42);
    (0..n)
        .map(|i| {
            let cents = 100 + rng.below(49_901) as u64;
            let price = format!("{}.{:02}", cents / 100, cents % 100);
            let cat = category.unwrap_or(CATEGORIES[rng.below(CATEGORIES.len())]);
            let body = format!(
                r#"{{"name":"bench-{tag}-{i}","category":"{cat}","price":{price},"stock":1000000000}}"#
            );
            let (status, reply) = http
                .request("POST", "/api/products", Some(&body))
                .expect("creating a product");
            assert_eq!(status, 201, "creating a product: {reply}");
            let v: Value = serde_json::from_str(&reply).unwrap();
            Product {
                id: v["productId"].as_i64().unwrap(),
                price,
            }
        })
        .collect()
}

fn run_ceiling(s: &Settings) -> Result<Value, String> {
    if s.ceiling_seconds == 0 {
        return Err("skipped (BENCH_CEILING_SECONDS=0)".into());
    }
    let script = s.shared_dir.join("pg-ceiling.sh");
    if !script.exists() {
        return Err(format!(
            "skipped: {} not found (set BENCH_SHARED_DIR to the directory holding pg-ceiling.sh)",
            script.display()
        ));
    }
    log(format!(
        "ceiling: {} {} (about {} s)",
        script.display(),
        s.ceiling_seconds,
        4 * s.ceiling_seconds + 10
    ));
    let out = Command::new("bash")
        .arg(&script)
        .arg(s.ceiling_seconds.to_string())
        .output()
        .map_err(|e| format!("failed to run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        Some(v) if out.status.success() => Ok(v),
        _ => Err(format!(
            "pg-ceiling.sh failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn run_loadtest(s: &Settings, log_dir: &Path, tag: &str) -> Result<Value, String> {
    if !s.loadtest {
        return Err("skipped (BENCH_LOADTEST=0)".into());
    }
    let script = s.shared_dir.join("loadtest.py");
    if !script.exists() {
        return Err(format!("skipped: {} not found", script.display()));
    }
    let (w, r) = ("bench_lt_write", "bench_lt_read");
    recreate_databases(s, &[w, r]);
    let names = Names::new(&format!("{tag}-lt"));
    let env = Env::new(s, w, r, &names);
    let all = Proc::spawn(&env, "all", &[], log_dir);
    wait_healthy(env.command, Duration::from_secs(60));
    wait_healthy(env.query, Duration::from_secs(60));
    let json_path = log_dir.join("loadtest.json");
    let _ = fs::remove_file(&json_path);
    log(format!(
        "loadtest.py against a fresh `all` (about {} s)",
        s.seconds + s.query_seconds + 10
    ));
    let out = Command::new("python3")
        .arg(&script)
        .args(["--command-url", &format!("http://{}", env.command)])
        .args(["--query-url", &format!("http://{}", env.query)])
        .args(["--write-db", &format!("{}/{w}", s.pg)])
        .args(["--read-db", &format!("{}/{r}", s.pg)])
        .args(["--order-seconds", &s.seconds.to_string()])
        .args(["--query-seconds", &s.query_seconds.to_string()])
        .args(["--connections", &s.clients.to_string()])
        .arg("--json")
        .arg(&json_path)
        .output();
    all.stop();
    delete_broker_names(s, &names);
    drop_databases(s, &[w, r]);
    let out = out.map_err(|e| format!("failed to run loadtest.py: {e}"))?;
    let _ = fs::write(log_dir.join("loadtest.out"), &out.stdout);
    if !out.status.success() {
        return Err(format!(
            "loadtest.py failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| "loadtest.py wrote no summary".into())
}

struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    target: String,
    ceiling: Option<(String, f64)>,
    met: Option<bool>,
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument would make no sense here.
    let s = Settings::from_env();
    let started = Instant::now();
    let tag = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let log_dir = manifest.join("target/bench-logs");
    fs::create_dir_all(&log_dir).expect("creating target/bench-logs");
    if let Some(dir) = s.json_path.parent() {
        fs::create_dir_all(dir).ok();
    }
    log(format!(
        "binary: {BIN}; child logs in {}",
        log_dir.display()
    ));
    let tuning: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            [
                "COMMAND_HTTP_WORKERS",
                "QUERY_HTTP_WORKERS",
                "WRITE_POOL_SIZE",
                "READ_POOL_SIZE",
                "OUTBOX_",
                "PUBLISH_",
                "CONSUMER_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
        })
        .collect();

    // 1. The ceiling, first, while nothing of ours runs.
    let ceiling = run_ceiling(&s);
    match &ceiling {
        Ok(v) => log(format!("ceiling: {v}")),
        Err(e) => log(format!("ceiling: {e}")),
    }
    let ceil = |k: &str| ceiling.as_ref().ok().and_then(|v| v[k].as_f64());

    // 2. `all` on fresh databases.
    let (wdb, rdb) = ("bench_write", "bench_read");
    recreate_databases(&s, &[wdb, rdb]);
    let names = Names::new(&tag);
    let env = Env::new(&s, wdb, rdb, &names);
    let all = Proc::spawn(&env, "all", &[], &log_dir);
    let all_pid = all.pid();
    wait_healthy(env.command, Duration::from_secs(60));
    wait_healthy(env.query, Duration::from_secs(60));
    wait_healthy(env.consumer, Duration::from_secs(60));
    let mut write = pg(&s, wdb);
    let mut read = pg(&s, rdb);

    log(format!("creating {} products", s.products));
    let products = create_products(env.command, s.products, &tag, None);
    // Let the ProductCreated events land before the burst.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(30) {
        let n: i64 = read
            .query_one("SELECT count(*) FROM product_sales_view", &[])
            .unwrap()
            .get(0);
        if n as usize >= products.len() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }

    log(format!("orders: {} clients for {} s", s.clients, s.seconds));
    let procs = [(all_pid, "all")];
    let sampler = WaitSampler::start(&s, wdb);
    let cpu0 = cpu_snapshot(&procs);
    let orders = load(
        env.command,
        s.clients,
        Until::Time(Duration::from_secs(s.seconds)),
        201,
        |rng| {
            (
                "POST",
                "/api/orders".into(),
                Some(order_body(rng, &products)),
            )
        },
    );
    let burst_end = Instant::now();
    let cpu1 = cpu_snapshot(&procs);
    let orders_waits = sampler.finish();
    let want = write_totals(&mut write);
    let drain = wait_converged(&mut read, &want, burst_end, s.drain_timeout);
    let cpu_orders = cpu_delta(&cpu0, &cpu1);
    log(format!(
        "orders: {:.0}/s p50 {:.1} ms p99 {:.1} ms ({} ok, {} other {:?}, {} errors); drain {:?} s",
        orders.per_second(),
        orders.pct_ms(50.0),
        orders.pct_ms(99.0),
        orders.ok,
        orders.other,
        orders.statuses,
        orders.errors,
        drain
    ));

    // Freshness: one order at a time, poll the query service until it shows it.
    let probe = create_products(env.command, 1, &format!("{tag}-probe"), Some("Probe"))
        .pop()
        .unwrap();
    let mut cmd = Http::new(env.command);
    let mut qry = Http::new(env.query);
    let sales_path = format!("/api/analytics/products/{}/sales", probe.id);
    let t = Instant::now();
    while qry
        .request("GET", &sales_path, None)
        .map(|r| r.0)
        .unwrap_or(0)
        != 200
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the probe product never appeared"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let order = format!(
        r#"{{"customerId":1,"items":[{{"productId":{},"quantity":1,"price":{}}}]}}"#,
        probe.id, probe.price
    );
    let mut fresh_us: Vec<u64> = Vec::with_capacity(s.fresh_samples);
    let mut fresh_timeouts = 0;
    for expected in 1..=s.fresh_samples as i64 {
        let (status, reply) = cmd.request("POST", "/api/orders", Some(&order)).unwrap();
        let t1 = Instant::now();
        assert_eq!(status, 201, "freshness order: {reply}");
        loop {
            if let Ok((200, body)) = qry.request("GET", &sales_path, None) {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if v["totalQuantitySold"].as_i64().unwrap_or(0) >= expected {
                    fresh_us.push(t1.elapsed().as_micros() as u64);
                    break;
                }
            }
            if t1.elapsed() > Duration::from_secs(10) {
                fresh_timeouts += 1;
                break;
            }
            thread::sleep(Duration::from_micros(500));
        }
    }
    fresh_us.sort_unstable();
    log(format!(
        "freshness: p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        pct(&fresh_us, 50.0) / 1000.0,
        pct(&fresh_us, 99.0) / 1000.0,
        fresh_us.last().copied().unwrap_or(0) as f64 / 1000.0
    ));

    log(format!(
        "queries: {} clients for {} s",
        s.clients, s.query_seconds
    ));
    let ids: Vec<i64> = products.iter().map(|p| p.id).collect();
    let cpu2 = cpu_snapshot(&procs);
    let queries = load(
        env.query,
        s.clients,
        Until::Time(Duration::from_secs(s.query_seconds)),
        200,
        |rng| {
            let id = ids[rng.below(ids.len())];
            ("GET", format!("/api/analytics/products/{id}/sales"), None)
        },
    );
    let cpu3 = cpu_snapshot(&procs);
    let cpu_queries = cpu_delta(&cpu2, &cpu3);
    let peak_rss_kib = vm_hwm_kib(all_pid).unwrap_or(0);
    log(format!(
        "queries: {:.0}/s p50 {:.2} ms p99 {:.2} ms; peak RSS {:.1} MiB",
        queries.per_second(),
        queries.pct_ms(50.0),
        queries.pct_ms(99.0),
        peak_rss_kib as f64 / 1024.0
    ));
    all.stop();

    // 3. loadtest.py on its own fresh instance.
    let loadtest = run_loadtest(&s, &log_dir, &tag);
    match &loadtest {
        Ok(v) => log(format!("loadtest.py: {v}")),
        Err(e) => log(format!("loadtest.py: {e}")),
    }

    // 4. Backlogs: outbox → broker with no consumer, then broker → read model.
    let mut backlog = json!(null);
    let mut publisher_eps = None;
    let mut consumer_eps = None;
    if s.backlog > 0 {
        log(format!(
            "backlog: {} orders with OUTBOX_PUBLISHERS=0",
            s.backlog
        ));
        let cmd0 = Proc::spawn(
            &env,
            "command-service",
            &[("OUTBOX_PUBLISHERS", "0")],
            &log_dir,
        );
        wait_healthy(env.command, Duration::from_secs(60));
        let fill = load(
            env.command,
            s.clients,
            Until::Count(s.backlog),
            201,
            |rng| {
                (
                    "POST",
                    "/api/orders".into(),
                    Some(order_body(rng, &products)),
                )
            },
        );
        cmd0.stop();
        let pending = |c: &mut Client| -> i64 {
            c.query_one(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .unwrap()
            .get(0)
        };
        let n0 = pending(&mut write);
        log(format!(
            "backlog: {} orders in {:.1} s ({:.0}/s without publishing); {n0} outbox rows pending",
            fill.ok,
            fill.seconds,
            fill.per_second()
        ));

        // Publisher drain: time from the first published row until none is pending.
        let sampler = WaitSampler::start(&s, wdb);
        let spawned = Instant::now();
        let cmd1 = Proc::spawn(&env, "command-service", &[], &log_dir);
        let procs = [(cmd1.pid(), "command-service")];
        let c0 = cpu_snapshot(&procs);
        let mut first: Option<(Instant, i64)> = None;
        let mut done: Option<Instant> = None;
        let mut metrics = Http::new(env.command);
        while spawned.elapsed() < s.drain_timeout {
            let published = metric(&mut metrics, "outbox_published_total").unwrap_or(0.0) as i64;
            let now = Instant::now();
            if first.is_none() && published > 0 {
                first = Some((now, n0 - published));
            }
            // Confirm in SQL only once the counter says everything went out.
            if published >= n0 && pending(&mut write) == 0 {
                done = Some(now);
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let c1 = cpu_snapshot(&procs);
        let pub_waits = sampler.finish();
        cmd1.stop();
        let depth = queue_depth(&s, &names.order_queue);
        let pub_json = match (first, done) {
            (Some((t0, n_at_t0)), Some(t1)) => {
                let secs = t1.duration_since(t0).as_secs_f64().max(1e-6);
                let eps = n_at_t0 as f64 / secs;
                publisher_eps = Some(eps);
                json!({
                    "events": n0,
                    "events_per_second": round(eps, 0),
                    "seconds_first_publish_to_empty": round(secs, 3),
                    "seconds_from_spawn": round(t1.duration_since(spawned).as_secs_f64(), 3),
                    "order_queue_depth_after": depth,
                    "cpu_cores": cpu_delta(&c0, &c1),
                    "pg_waits": pub_waits,
                })
            }
            _ => json!({"events": n0, "error": "the outbox did not drain", "pg_waits": pub_waits}),
        };
        log(format!("publisher drain: {pub_json}"));

        // Consumer drain: the queue holds the backlog; start a consumer and time it.
        let want = write_totals(&mut write);
        let processed = |c: &mut Client| -> i64 {
            c.query_one("SELECT count(*) FROM processed_events", &[])
                .unwrap()
                .get(0)
        };
        let p0 = processed(&mut read);
        let sampler = WaitSampler::start(&s, rdb);
        let spawned = Instant::now();
        let cons = Proc::spawn(&env, "consumer-service", &[], &log_dir);
        let procs = [(cons.pid(), "consumer-service")];
        let c0 = cpu_snapshot(&procs);
        let mut first: Option<(Instant, i64)> = None;
        let mut converged_at = None;
        let mut metrics = Http::new(env.consumer);
        while spawned.elapsed() < s.drain_timeout {
            // The applied counter first; the full comparison only once every event is in.
            let applied =
                metric(&mut metrics, "consumer_events_applied_total").unwrap_or(0.0) as i64;
            if first.is_none() && applied > 0 {
                first = Some((Instant::now(), p0 + applied));
            }
            if applied >= n0 && read_totals(&mut read) == want {
                converged_at = Some(Instant::now());
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let c1 = cpu_snapshot(&procs);
        let cons_waits = sampler.finish();
        let cons_rss = vm_hwm_kib(cons.pid());
        cons.stop();
        let p_end = processed(&mut read);
        let cons_json = match (first, converged_at) {
            (Some((t0, p_at_t0)), Some(t1)) => {
                let secs = t1.duration_since(t0).as_secs_f64().max(1e-6);
                let eps = (p_end - p_at_t0) as f64 / secs;
                consumer_eps = Some(eps);
                json!({
                    "events": p_end - p0,
                    "events_per_second": round(eps, 0),
                    "seconds_first_apply_to_converged": round(secs, 3),
                    "seconds_from_spawn": round(t1.duration_since(spawned).as_secs_f64(), 3),
                    "peak_rss_mib": cons_rss.map(|k| round(k as f64 / 1024.0, 1)),
                    "cpu_cores": cpu_delta(&c0, &c1),
                    "pg_waits": cons_waits,
                })
            }
            _ => {
                json!({"events": p_end - p0, "error": "the read model did not converge", "pg_waits": cons_waits})
            }
        };
        log(format!("consumer drain: {cons_json}"));
        backlog = json!({
            "fill": {"orders": fill.ok, "seconds": round(fill.seconds, 2), "orders_per_second": round(fill.per_second(), 0),
                     "p99_ms": round(fill.pct_ms(99.0), 2), "note": "command-service alone, OUTBOX_PUBLISHERS=0"},
            "publisher": pub_json,
            "consumer": cons_json,
        });
    }
    drop(write);
    drop(read);
    delete_broker_names(&s, &names);
    drop_databases(&s, &[wdb, rdb]);

    // Report.
    let ratio = |v: f64, k: &str| ceil(k).map(|c| (k.to_string(), v / c));
    let fresh_p50 = pct(&fresh_us, 50.0) / 1000.0;
    let fresh_p99 = pct(&fresh_us, 99.0) / 1000.0;
    let rss_mib = peak_rss_kib as f64 / 1024.0;
    let rows = vec![
        Row {
            name: "orders/s (all, 32 clients)",
            value: orders.per_second(),
            unit: "/s",
            target: ">= 0.8 x order_tx_tps".into(),
            ceiling: ratio(orders.per_second(), "order_tx_tps"),
            met: ratio(orders.per_second(), "order_tx_tps").map(|(_, r)| r >= 0.8),
        },
        Row {
            name: "order latency p50",
            value: orders.pct_ms(50.0),
            unit: "ms",
            target: "-".into(),
            ceiling: None,
            met: None,
        },
        Row {
            name: "order latency p99",
            value: orders.pct_ms(99.0),
            unit: "ms",
            target: "-".into(),
            ceiling: None,
            met: None,
        },
        Row {
            name: "drain after burst",
            value: drain.unwrap_or(f64::INFINITY),
            unit: "s",
            target: "<= 1".into(),
            ceiling: None,
            met: Some(drain.is_some_and(|d| d <= 1.0)),
        },
        Row {
            name: "freshness p50",
            value: fresh_p50,
            unit: "ms",
            target: "<= 10".into(),
            ceiling: None,
            met: Some(fresh_p50 <= 10.0 && fresh_timeouts == 0),
        },
        Row {
            name: "freshness p99",
            value: fresh_p99,
            unit: "ms",
            target: "<= 50".into(),
            ceiling: None,
            met: Some(fresh_p99 <= 50.0 && fresh_timeouts == 0),
        },
        Row {
            name: "queries/s (32 clients)",
            value: queries.per_second(),
            unit: "/s",
            target: ">= 0.5 x select_pk_tps".into(),
            ceiling: ratio(queries.per_second(), "select_pk_tps"),
            met: ratio(queries.per_second(), "select_pk_tps").map(|(_, r)| r >= 0.5),
        },
        Row {
            name: "query latency p99",
            value: queries.pct_ms(99.0),
            unit: "ms",
            target: "<= 10".into(),
            ceiling: None,
            met: Some(queries.pct_ms(99.0) <= 10.0),
        },
        Row {
            name: "publisher drain",
            value: publisher_eps.unwrap_or(f64::NAN),
            unit: "ev/s",
            target: ">= 15000".into(),
            ceiling: None,
            met: publisher_eps.map(|e| e >= 15_000.0),
        },
        Row {
            name: "consumer drain",
            value: consumer_eps.unwrap_or(f64::NAN),
            unit: "ev/s",
            target: ">= 20000".into(),
            ceiling: consumer_eps.and_then(|e| ratio(e, "projection_batch_eps")),
            met: consumer_eps.map(|e| e >= 20_000.0),
        },
        Row {
            name: "peak RSS of all",
            value: rss_mib,
            unit: "MiB",
            target: "<= 64".into(),
            ceiling: None,
            met: Some(rss_mib > 0.0 && rss_mib <= 64.0),
        },
    ];

    println!();
    println!(
        "{:<28} {:>12} {:<5} {:<24} {:<30} {:<4}",
        "figure", "value", "unit", "target", "ratio to ceiling", "met"
    );
    println!("{}", "-".repeat(108));
    for r in &rows {
        let ceiling = match &r.ceiling {
            Some((k, x)) => format!("{x:.2} of {k} ({:.0})", ceil(k).unwrap_or(0.0)),
            None => "-".into(),
        };
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "{:<28} {:>12} {:<5} {:<24} {:<30} {:<4}",
            r.name,
            format!("{:.2}", r.value),
            r.unit,
            r.target,
            ceiling,
            met
        );
    }
    println!();
    match &ceiling {
        Ok(v) => println!("ceiling (pg-ceiling.sh {} s): {v}", s.ceiling_seconds),
        Err(e) => println!("ceiling: {e}"),
    }
    match &loadtest {
        Ok(v) => println!(
            "loadtest.py: orders {}/s p99 {} ms, drain {} s, fresh p50 {} ms p99 {} ms, queries {}/s p99 {} ms",
            v["orders"]["per_second"], v["orders"]["p99_ms"], v["drain"]["seconds"],
            v["fresh"]["p50_ms"], v["fresh"]["p99_ms"], v["queries"]["per_second"], v["queries"]["p99_ms"]
        ),
        Err(e) => println!("loadtest.py: {e}"),
    }
    println!("CPU during the order burst (cores): {cpu_orders}");
    println!("CPU during the queries (cores): {cpu_queries}");
    println!("PostgreSQL during the order burst: {orders_waits}");
    let runtime = started.elapsed().as_secs_f64();
    println!(
        "total runtime {runtime:.0} s; 2-core machine shared with other work: absolute figures are noisy, ratios less so"
    );

    let report = json!({
        "command": "cargo bench --bench pipeline",
        "runtime_seconds": round(runtime, 1),
        "machine": {"cores": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "note": "shared machine: other work ran at the same time; ratios to the ceiling taken in the same run hold better than absolute figures"},
        "settings": {"seconds": s.seconds, "query_seconds": s.query_seconds, "clients": s.clients,
                     "products": s.products, "fresh_samples": s.fresh_samples, "backlog": s.backlog,
                     "ceiling_seconds": s.ceiling_seconds,
                     "tuning_env": tuning.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
        "ceiling": match &ceiling { Ok(v) => v.clone(), Err(e) => json!({"skipped": e}) },
        "orders": {"per_second": round(orders.per_second(), 1), "ok": orders.ok, "other": orders.other,
                   "errors": orders.errors, "p50_ms": round(orders.pct_ms(50.0), 2),
                   "p99_ms": round(orders.pct_ms(99.0), 2), "max_ms": round(orders.pct_ms(100.0), 2),
                   "statuses": orders.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                   "cpu_cores": cpu_orders, "pg_waits": orders_waits},
        "drain_seconds": drain.map(|d| round(d, 3)),
        "freshness": {"samples": fresh_us.len(), "timeouts": fresh_timeouts, "p50_ms": round(fresh_p50, 2),
                      "p90_ms": round(pct(&fresh_us, 90.0) / 1000.0, 2), "p99_ms": round(fresh_p99, 2),
                      "max_ms": round(fresh_us.last().copied().unwrap_or(0) as f64 / 1000.0, 2)},
        "queries": {"per_second": round(queries.per_second(), 1), "ok": queries.ok, "other": queries.other,
                    "errors": queries.errors, "p50_ms": round(queries.pct_ms(50.0), 3),
                    "p99_ms": round(queries.pct_ms(99.0), 3), "cpu_cores": cpu_queries},
        "peak_rss_mib": round(rss_mib, 1),
        "backlog": backlog,
        "loadtest": match &loadtest { Ok(v) => v.clone(), Err(e) => json!({"skipped": e}) },
        "targets": rows.iter().map(|r| json!({
            "figure": r.name, "value": if r.value.is_finite() { json!(round(r.value, 3)) } else { Value::Null },
            "unit": r.unit, "target": r.target,
            "ratio": r.ceiling.as_ref().map(|(k, x)| json!({"to": k, "ratio": round(*x, 3)})),
            "met": r.met})).collect::<Vec<_>>(),
    });
    fs::write(&s.json_path, serde_json::to_string_pretty(&report).unwrap())
        .expect("writing the JSON report");
    println!("JSON: {}", s.json_path.display());
}
