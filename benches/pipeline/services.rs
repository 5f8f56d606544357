//! The system under test: the release binary run as child processes against a fresh pair of
//! databases and unique broker names from the test harness (`TestEnv`), on free loopback
//! ports. Every tuning variable set in the environment of `cargo bench` (see
//! `.env.example`) reaches every child, so knobs can be compared run against run.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use cqrs_analytics::config::VARIABLES;
use postgres::{Client, NoTls};

use crate::client::Http;
use crate::harness::{self, free_port, TestEnv};
use crate::log;

/// Variables the harness sets for each child itself (databases, broker, names).
const SET_BY_HARNESS: &[&str] = &[
    "DATABASE_URL",
    "READ_DATABASE_URL",
    "BROKER_URL",
    "HTTP_BIND_ADDR",
    "COMMAND_SERVICE_PORT",
    "QUERY_SERVICE_PORT",
    "CONSUMER_SERVICE_PORT",
    "BROKER_EXCHANGE",
    "BROKER_PRODUCT_QUEUE",
    "BROKER_ORDER_QUEUE",
    "BROKER_DEAD_LETTER_EXCHANGE",
    "BROKER_DEAD_LETTER_QUEUE",
];

/// Tuning variables from the bench's own environment, passed on to every child.
pub fn tuning() -> Vec<(String, String)> {
    VARIABLES
        .iter()
        .map(|v| v.name)
        .filter(|k| !SET_BY_HARNESS.contains(k))
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Fresh databases, unique broker names and three free ports.
pub struct Stack {
    pub env: TestEnv,
    pub command: SocketAddr,
    pub query: SocketAddr,
    pub consumer: SocketAddr,
}

impl Stack {
    pub fn new() -> Stack {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Stack {
            env: TestEnv::new(),
            command: addr(free_port()),
            query: addr(free_port()),
            consumer: addr(free_port()),
        }
    }

    /// Starts `role` (a subcommand of the binary) with `extra` variables on top of the
    /// tuning ones; its stderr goes to `log_dir`.
    pub fn spawn(&self, role: &str, extra: &[(&str, String)], log_dir: &Path) -> Service {
        let log_path = log_dir.join(format!("{role}-{}.log", self.env.id));
        let log_file = fs::File::create(&log_path).expect("creating a log file");
        let mut cmd = self.env.binary(role);
        cmd.env("COMMAND_SERVICE_PORT", self.command.port().to_string())
            .env("QUERY_SERVICE_PORT", self.query.port().to_string())
            .env("CONSUMER_SERVICE_PORT", self.consumer.port().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        if let Ok(v) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        for (k, v) in tuning() {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning the release binary");
        Service {
            name: role.to_string(),
            child: Some(child),
        }
    }

    pub fn write(&self) -> Client {
        self.env.write()
    }

    pub fn read(&self) -> Client {
        self.env.read()
    }
}

/// A child process of the binary; stopped gracefully by `stop`, killed on drop.
pub struct Service {
    name: String,
    child: Option<Child>,
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM (graceful), then SIGKILL after 15 s.
    pub fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        log(format!(
            "{} did not stop within 15 s; killing it",
            self.name
        ));
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `addr` answers `GET /health` with 200.
pub fn wait_healthy(addr: SocketAddr) {
    let mut http = Http::new(addr);
    harness::wait_until(
        &format!("{addr} to be healthy"),
        Duration::from_secs(60),
        || matches!(http.request("GET", "/health", None), Ok((200, _))).then_some(()),
    );
}

/// Sum of a Prometheus counter's samples from a service's /metrics (cheap to poll,
/// unlike counting rows in SQL, which costs PostgreSQL CPU during the measurement).
pub fn metric(http: &mut Http, name: &str) -> Option<f64> {
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
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Outbox rows not yet published.
pub fn outbox_pending(write: &mut Client) -> i64 {
    write
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Polls until the read model equals the write model (the harness' totals); returns the
/// seconds from `since`, or None after `timeout`.
pub fn wait_converged(stack: &Stack, since: Instant, timeout: Duration) -> Option<f64> {
    let want = harness::write_totals(&mut stack.write());
    let mut read = stack.read();
    loop {
        let got = harness::read_totals(&mut read);
        if got == want {
            return Some(since.elapsed().as_secs_f64());
        }
        if since.elapsed() > timeout {
            log(format!("no convergence: write {want:?}, read {got:?}"));
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether every view of the read model equals the write model, checked in SQL.
pub fn read_equals_write(stack: &Stack) -> bool {
    let want = harness::write_totals(&mut stack.write());
    let mut read = stack.read();
    let (hourly_orders, hourly_revenue, category_revenue) =
        harness::read_secondary_totals(&mut read);
    harness::read_totals(&mut read) == want
        && hourly_orders == want.0
        && hourly_revenue == want.3
        && category_revenue == want.2
}

/// Replaces database `target` by a copy of `source` (which nobody may be connected to):
/// the same filled write model for several rounds.
pub fn clone_database(source: &str, target: &str) {
    let mut admin = Client::connect(&format!("{}/postgres", harness::pg_base()), NoTls)
        .expect("connecting as a superuser");
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {target} WITH (FORCE)"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {target} TEMPLATE {source}"))
        .expect("cloning a database");
}

/// A CHECKPOINT before a timed measurement: what earlier phases left dirty (dropped
/// databases, bulk loads) is written out now, not by the checkpointer and the kernel's
/// flush threads in the middle of the measurement (they took 0.4-0.7 cores during the
/// broker-alone phase that followed the backlog's clean-up).
pub fn checkpoint() {
    let mut admin = Client::connect(&format!("{}/postgres", harness::pg_base()), NoTls)
        .expect("connecting as a superuser");
    admin.batch_execute("CHECKPOINT").expect("CHECKPOINT");
}
