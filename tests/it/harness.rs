//! The test harness: a fresh pair of databases per test, cloned from migrated templates
//! (`CREATE DATABASE .. TEMPLATE ..`, dropped `WITH (FORCE)` on drop), unique broker names
//! per test, services started in-process on port 0, and a tiny HTTP client over a real
//! loopback socket. Everything is real: PostgreSQL, RabbitMQ, HTTP.
//!
//! `benches/pipeline` compiles this file too (`#[path]`): keep it free of references to
//! other test modules.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cqrs_analytics::app::{self, Role, Running};
use cqrs_analytics::config::{BrokerNames, Config};
use cqrs_analytics::db;
use postgres::{Client, NoTls};
use serde_json::Value;

/// The server the tests use; override with TEST_PG_URL (a superuser URL without a database).
pub fn pg_base() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".into())
}

pub fn broker_url() -> String {
    std::env::var("TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn admin() -> Client {
    Client::connect(&format!("{}/postgres", pg_base()), NoTls)
        .expect("connecting to PostgreSQL as a superuser")
}

/// Template databases named after a hash of the migrations, so a schema change makes new ones.
fn templates() -> &'static (String, String) {
    static T: OnceLock<(String, String)> = OnceLock::new();
    T.get_or_init(|| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for m in db::WRITE_MIGRATIONS.iter().chain(db::READ_MIGRATIONS) {
            for b in m.sql.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
        let w = format!("it_tpl_write_{h:016x}");
        let r = format!("it_tpl_read_{h:016x}");
        let mut admin = admin();
        // Serialise template creation across test processes.
        admin.execute("SELECT pg_advisory_lock(7345)", &[]).unwrap();
        for (name, migrations) in [(&w, db::WRITE_MIGRATIONS), (&r, db::READ_MIGRATIONS)] {
            let exists = admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[name])
                .unwrap()
                .is_some();
            if !exists {
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .unwrap();
                db::migrate(
                    &format!("{}/{name}", pg_base()).parse().unwrap(),
                    migrations,
                    Duration::from_secs(5),
                )
                .unwrap();
            }
        }
        // Templates of older schemas are of no further use, but another checkout on this
        // machine (a branch with other migrations, a benchmark) may be cloning them right now:
        // only a run that knows it is alone (.ci/run sets IT_DROP_STALE_TEMPLATES) drops them.
        let keep = std::env::var_os("IT_DROP_STALE_TEMPLATES").is_none();
        let stale = admin
            .query(
                "SELECT datname FROM pg_database
                 WHERE datname LIKE 'it\\_tpl\\_%' AND datname NOT IN ($1, $2)",
                &[&w, &r],
            )
            .unwrap();
        for row in stale.iter().filter(|_| !keep) {
            let name: String = row.get(0);
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
        admin
            .execute("SELECT pg_advisory_unlock(7345)", &[])
            .unwrap();
        (w, r)
    })
}

/// Tests that stop or restart a shared service (the broker) hold this lock for writing;
/// every other test holds it for reading, so they never overlap.
static SHARED_SERVICES: RwLock<()> = RwLock::new(());

/// The same rule across processes (two test runs on one machine share the broker): a file
/// lock, shared or exclusive, held beside the in-process lock for the test's lifetime.
fn services_file_lock(exclusive: bool) -> std::fs::File {
    let path = std::env::temp_dir().join("cqrs-analytics-it-services.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("opening the services lock file");
    if exclusive {
        file.lock().expect("locking the services lock file");
    } else {
        file.lock_shared().expect("locking the services lock file");
    }
    file
}

enum ServiceGuard {
    Shared(RwLockReadGuard<'static, ()>, std::fs::File),
    Exclusive(RwLockWriteGuard<'static, ()>, std::fs::File),
}

/// A pair of fresh databases and unique broker names for one test.
pub struct TestEnv {
    _guard: ServiceGuard,
    pub id: String,
    pub write_db: String,
    pub read_db: String,
    pub broker: BrokerNames,
}

impl TestEnv {
    /// An environment for a test that leaves the shared services running.
    pub fn new() -> TestEnv {
        let guard = SHARED_SERVICES.read().unwrap_or_else(|e| e.into_inner());
        Self::with_guard(ServiceGuard::Shared(guard, services_file_lock(false)))
    }

    /// An environment for a test that stops shared services: no other test runs meanwhile.
    pub fn exclusive() -> TestEnv {
        let guard = SHARED_SERVICES.write().unwrap_or_else(|e| e.into_inner());
        Self::with_guard(ServiceGuard::Exclusive(guard, services_file_lock(true)))
    }

    fn with_guard(guard: ServiceGuard) -> TestEnv {
        let (tw, tr) = templates();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let write_db = format!("it_{id}_w");
        let read_db = format!("it_{id}_r");
        let mut admin = admin();
        admin
            .batch_execute(&format!("CREATE DATABASE {write_db} TEMPLATE {tw}"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {read_db} TEMPLATE {tr}"))
            .unwrap();
        let broker = BrokerNames {
            exchange: format!("it.{id}.events"),
            product_queue: format!("it.{id}.product-events"),
            order_queue: format!("it.{id}.order-events"),
            dead_letter_exchange: format!("it.{id}.dlx"),
            dead_letter_queue: format!("it.{id}.dlq"),
            queue_type: cqrs_analytics::config::QueueType::Classic,
        };
        TestEnv {
            _guard: guard,
            id,
            write_db,
            read_db,
            broker,
        }
    }

    pub fn write_url(&self) -> String {
        format!("{}/{}", pg_base(), self.write_db)
    }

    pub fn read_url(&self) -> String {
        format!("{}/{}", pg_base(), self.read_db)
    }

    /// A configuration for this test: its databases and broker names, ports 0, small pools.
    pub fn config(&self) -> Config {
        let mut c = Config::from_lookup(|k| match k {
            "DATABASE_URL" => Some(self.write_url()),
            "READ_DATABASE_URL" => Some(self.read_url()),
            "BROKER_URL" => Some(broker_url()),
            "HTTP_BIND_ADDR" => Some("127.0.0.1".into()),
            _ => None,
        })
        .unwrap();
        c.command_port = 0;
        c.query_port = 0;
        c.consumer_port = 0;
        c.command_http_workers = 8;
        c.query_http_workers = 4;
        c.write_pool_size = 8;
        c.read_pool_size = 4;
        c.outbox_poll_interval = Duration::from_millis(200);
        c.broker_reconnect_max = Duration::from_millis(500);
        c.db.retry_max = Duration::from_millis(500);
        c.broker = self.broker.clone();
        c
    }

    pub fn write(&self) -> Client {
        Client::connect(&self.write_url(), NoTls).unwrap()
    }

    pub fn read(&self) -> Client {
        Client::connect(&self.read_url(), NoTls).unwrap()
    }

    /// Starts `role` in-process with this test's configuration.
    pub fn start(&self, role: Role) -> App {
        self.start_with(role, |_| {})
    }

    pub fn start_with(&self, role: Role, tweak: impl FnOnce(&mut Config)) -> App {
        let mut config = self.config();
        tweak(&mut config);
        let running = app::start(&config, role).expect("starting the services");
        App {
            running: Some(running),
        }
    }

    /// An AMQP channel on the test broker (declares this test's topology).
    pub fn amqp(&self) -> (amiquip::Connection, amiquip::Channel) {
        let mut conn = amiquip::Connection::insecure_open(&broker_url()).unwrap();
        let ch = conn.open_channel(None).unwrap();
        cqrs_analytics::broker::declare_topology(&ch, &self.broker).unwrap();
        (conn, ch)
    }

    /// The real binary running `subcommand` against this test's databases and broker names,
    /// listening on loopback, with a clean environment (PATH only) and `RUST_LOG=warn`.
    pub fn binary(&self, subcommand: &str) -> std::process::Command {
        let b = &self.broker;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"));
        cmd.arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", self.write_url())
            .env("READ_DATABASE_URL", self.read_url())
            .env("BROKER_URL", broker_url())
            .env("HTTP_BIND_ADDR", "127.0.0.1")
            .env("BROKER_EXCHANGE", &b.exchange)
            .env("BROKER_PRODUCT_QUEUE", &b.product_queue)
            .env("BROKER_ORDER_QUEUE", &b.order_queue)
            .env("BROKER_DEAD_LETTER_EXCHANGE", &b.dead_letter_exchange)
            .env("BROKER_DEAD_LETTER_QUEUE", &b.dead_letter_queue)
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Messages ready in a queue of this test.
    pub fn queue_depth(&self, queue: &str) -> u32 {
        QueueDepths::open().total(&[queue]) as u32
    }
}

/// Messages ready in queues, read over one AMQP channel kept open (a passive declare per
/// queue). The bench's publisher drain polls it, which costs the database nothing, where a
/// scrape of the command service's /metrics counts the pending outbox in SQL.
pub struct QueueDepths {
    conn: amiquip::Connection,
    channel: amiquip::Channel,
}

impl QueueDepths {
    pub fn open() -> QueueDepths {
        let mut conn = amiquip::Connection::insecure_open(&broker_url()).unwrap();
        let channel = conn.open_channel(None).unwrap();
        QueueDepths { conn, channel }
    }

    /// The messages ready in all of `queues`; 0 while one is not declared yet (the broker
    /// then closes the channel, so a new one is opened).
    pub fn total(&mut self, queues: &[&str]) -> i64 {
        let mut sum = 0;
        for q in queues {
            match self.channel.queue_declare_passive(*q) {
                Ok(declared) => sum += i64::from(declared.declared_message_count().unwrap_or(0)),
                Err(_) => {
                    self.channel = self.conn.open_channel(None).unwrap();
                    return 0;
                }
            }
        }
        sum
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let mut admin = admin();
        for name in [&self.write_db, &self.read_db] {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
        if let Ok(mut conn) = amiquip::Connection::insecure_open(&broker_url()) {
            if let Ok(ch) = conn.open_channel(None) {
                let b = &self.broker;
                for q in [&b.product_queue, &b.order_queue, &b.dead_letter_queue] {
                    let _ = ch.queue_delete(q.as_str(), Default::default());
                }
                for x in [&b.exchange, &b.dead_letter_exchange] {
                    let _ = ch.exchange_delete(x.as_str(), false);
                }
            }
            let _ = conn.close();
        }
    }
}

/// Running services, stopped (and every thread joined) on drop.
pub struct App {
    running: Option<Running>,
}

impl App {
    fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn command(&self) -> SocketAddr {
        self.running().command_addr.expect("command service")
    }

    pub fn query(&self) -> SocketAddr {
        self.running().query_addr.expect("query service")
    }

    pub fn consumer(&self) -> SocketAddr {
        self.running().consumer_addr.expect("consumer service")
    }

    /// The supervision of the app's publishers and consumers (restarts, panic injection).
    pub fn supervision(&self) -> &std::sync::Arc<cqrs_analytics::supervise::Supervision> {
        self.running().supervision()
    }

    pub fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

/// A response as the tests see it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A loopback port that was free a moment ago (for a child process to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one request on a fresh connection and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_request(addr, method, path, headers, body).unwrap_or_else(|raw| {
        panic!(
            "malformed response to {method} {path}: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// `request`, giving back the bytes received when they are not a response (e.g. none: the
/// connection was reset).
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::result::Result<Reply, Vec<u8>> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body; a broken pipe is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw).ok_or(raw)
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.get(9..12)?.parse().ok()?;
    Some(Reply {
        status,
        body: body.to_string(),
        headers: head.to_string(),
    })
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"")
}

/// Creates a product and returns its id.
pub fn create_product(addr: SocketAddr, name: &str, category: &str, price: f64, stock: i64) -> i64 {
    let r = post_json(
        addr,
        "/api/products",
        &serde_json::json!({"name": name, "category": category, "price": price, "stock": stock}),
    );
    assert_eq!(r.status, 201, "create product: {}", r.body);
    r.json()["productId"].as_i64().unwrap()
}

/// Polls `f` until it returns Some or `timeout` passes; panics with `what` on timeout.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Rows in the write model's tables: (products, orders, order_items, outbox,
/// idempotency_keys). A rejected request must leave all five unchanged.
pub fn write_counts(env: &TestEnv) -> (i64, i64, i64, i64, i64) {
    let r = env
        .write()
        .query_one(
            "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM orders),
                    (SELECT count(*) FROM order_items), (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM idempotency_keys)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// Outbox rows not yet published.
pub fn unpublished(env: &TestEnv) -> i64 {
    env.write()
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Write-side totals: (orders, items quantity, revenue as text, customer spend as text).
pub fn write_totals(c: &mut Client) -> (i64, i64, String, String) {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM orders),
                    (SELECT coalesce(sum(quantity), 0)::bigint FROM order_items),
                    (SELECT coalesce(sum(quantity * price), 0)::numeric(24,2)::text FROM order_items),
                    (SELECT coalesce(sum(total), 0)::numeric(24,2)::text FROM orders)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// The same totals from the read model, each from a different view.
pub fn read_totals(c: &mut Client) -> (i64, i64, String, String) {
    let r = c
        .query_one(
            "SELECT (SELECT coalesce(sum(order_count), 0)::bigint FROM customer_ltv_view),
                    (SELECT coalesce(sum(total_quantity_sold), 0)::bigint FROM product_sales_view),
                    (SELECT coalesce(sum(total_revenue), 0)::numeric(24,2)::text FROM product_sales_view),
                    (SELECT coalesce(sum(total_spent), 0)::numeric(24,2)::text FROM customer_ltv_view)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Hourly and category totals must agree with the write side too.
pub fn read_secondary_totals(c: &mut Client) -> (i64, String, String) {
    let r = c
        .query_one(
            "SELECT (SELECT coalesce(sum(total_orders), 0)::bigint FROM hourly_sales_view),
                    (SELECT coalesce(sum(total_revenue), 0)::numeric(24,2)::text FROM hourly_sales_view),
                    (SELECT coalesce(sum(total_revenue), 0)::numeric(24,2)::text FROM category_metrics_view)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until the read model equals the write model (every view), then asserts it.
pub fn assert_converges(env: &TestEnv, timeout: Duration) {
    let mut w = env.write();
    let mut r = env.read();
    let expected = write_totals(&mut w);
    wait_until("the read model to equal the write model", timeout, || {
        (read_totals(&mut r) == expected).then_some(())
    });
    let (hourly_orders, hourly_revenue, category_revenue) = read_secondary_totals(&mut r);
    assert_eq!(hourly_orders, expected.0, "hourly order count");
    assert_eq!(hourly_revenue, expected.3, "hourly revenue");
    assert_eq!(category_revenue, expected.2, "category revenue");
}

/// A private PostgreSQL server in a temporary directory, for tests that change what is
/// server-wide (roles, the `postgres` database's privileges) and so must not touch the
/// shared server. initdb refuses to run as root, so as root the server runs as the
/// `postgres` system user. Stopped (immediate mode) and deleted on drop.
pub struct ScratchPostgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl ScratchPostgres {
    pub fn start() -> ScratchPostgres {
        Self::start_with("")
    }

    /// A scratch server started with more `-c name=value` options.
    pub fn start_with(options: &str) -> ScratchPostgres {
        let bin = pg_bindir();
        let dir = std::env::temp_dir().join(format!(
            "cqrs-it-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let scratch = ScratchPostgres {
            port: free_port(),
            dir,
            bin,
        };
        if is_root() {
            let ok = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&scratch.dir)
                .status()
                .unwrap();
            assert!(ok.success(), "chown of {}", scratch.dir.display());
        }
        let data = scratch.dir.join("data");
        scratch.pg("initdb", |c| {
            c.arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]);
        });
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {options}",
            scratch.port,
            scratch.dir.display()
        );
        scratch.pg("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(scratch.dir.join("log"))
                .args(["-o", &options, "-w", "start"]);
        });
        scratch
    }

    /// `postgresql://ROLE@127.0.0.1:PORT/DB` (trust authentication).
    pub fn url(&self, role: &str, db: &str) -> String {
        format!("postgresql://{role}@127.0.0.1:{}/{db}", self.port)
    }

    /// A PostgreSQL program, run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        if !is_root() {
            return std::process::Command::new(&path);
        }
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
        ])
        .arg(&path);
        c
    }

    /// Runs a PostgreSQL program; panics on failure.
    fn pg(&self, program: &str, args: impl FnOnce(&mut std::process::Command)) {
        let mut cmd = self.command(program);
        args(&mut cmd);
        let out = cmd.output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// The directory of initdb and pg_ctl: `pg_config --bindir`, else the newest
/// /usr/lib/postgresql/N/bin (Debian), else wherever PATH finds them.
fn pg_bindir() -> std::path::PathBuf {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| std::path::PathBuf::from(""))
}

/// The real binary as a child process, its stderr in a log file; killed on drop.
pub struct ChildService {
    pub child: Child,
    pub addr: SocketAddr,
    log_path: std::path::PathBuf,
}

impl ChildService {
    /// Spawns `cmd` (from `TestEnv::binary`) with its stderr in a file named after
    /// `log_name`, finds the address `service` (e.g. `command-service`) listens on in the
    /// line it logs when it starts, and waits until its `/health` answers 200.
    ///
    /// The caller sets the service's port variable, best to 0: the service then binds a
    /// port the kernel picks, where a port found free beforehand may be taken by another
    /// test's server before the child binds it (and the test would talk to that server).
    pub fn spawn(cmd: &mut Command, service: &str, log_name: &str) -> ChildService {
        let log_path = std::env::temp_dir().join(format!("{log_name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        // The listening line is logged at info level by the http module.
        let filter = cmd
            .get_envs()
            .find(|(k, _)| *k == "RUST_LOG")
            .and_then(|(_, v)| v?.to_str().map(str::to_owned))
            .unwrap_or_else(|| "warn".into());
        let child = cmd
            .env("RUST_LOG", format!("{filter},cqrs_analytics::http=info"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning the cqrs-analytics binary");
        let mut child_service = ChildService {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
        };
        child_service.addr = child_service.wait_listening(service);
        child_service.wait_healthy();
        child_service
    }

    /// The address in `{service} listening on http://{addr}`, once the child has logged it.
    fn wait_listening(&mut self, service: &str) -> SocketAddr {
        let needle = format!("{service} listening on http://");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            // Only whole lines: the last one may still be being written.
            let whole = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(addr) = whole
                .lines()
                .find_map(|l| l.split_once(&needle)?.1.trim().parse().ok())
            {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the service exited with {status}; log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "{service} did not say where it listens; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the service exited with {status}; log:\n{}", self.log());
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ =
                    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                let mut raw = Vec::new();
                let _ = s.read_to_end(&mut raw);
                if raw.starts_with(b"HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the service did not become healthy; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A line of the process's /proc status, e.g. `Threads` or `VmRSS`, as a number.
    pub fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the child's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status:\n{status}"))
    }

    /// SIGKILL: no shutdown hook, no flush, no graceful anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// The value at `addr`'s /metrics of `name`: a metric name (the sum of its samples over
/// all their labels) or one sample with its labels (`name{label="value"}`); panics if the
/// service exports no such sample.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    let any_labels = !name.contains('{');
    let samples: Vec<f64> = r
        .body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || (any_labels && rest.starts_with('{')))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!samples.is_empty(), "no metric {name} in:\n{}", r.body);
    samples.iter().sum()
}

/// A counter's value: `metric` as a whole number.
pub fn counter(addr: SocketAddr, name: &str) -> u64 {
    metric(addr, name) as u64
}

/// Publishes `body` by hand to the test's exchange, persistent and mandatory, with
/// `message_id`, and waits for the broker's confirm: what a duplicate delivery or a poison
/// message looks like to the consumers.
pub fn publish_raw(env: &TestEnv, routing_key: &str, message_id: &str, body: &[u8]) {
    let (conn, ch) = env.amqp();
    ch.enable_publisher_confirms().unwrap();
    let confirms = ch.listen_for_publisher_confirms().unwrap();
    let properties = amiquip::AmqpProperties::default()
        .with_message_id(message_id.to_string())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let publish = amiquip::Publish {
        body,
        routing_key: routing_key.into(),
        mandatory: true,
        immediate: false,
        properties,
    };
    ch.basic_publish(env.broker.exchange.as_str(), publish)
        .unwrap();
    confirms
        .recv_timeout(Duration::from_secs(5))
        .expect("a confirm");
    conn.close().unwrap();
}

/// A TCP proxy on a loopback port in front of `upstream` (the shared broker), for a broker
/// endpoint a test can kill while it is in use without touching the broker: `kill` cuts
/// every proxied connection and closes the port, as a dead node would. It can also act as
/// a node that refuses AMQP (`ProxyMode::Refuse`), or as a cluster node whose channels wait
/// on a dead peer (`ProxyMode::StallChannels`, `stall_open_connections`): the connection
/// stays up and its heartbeats flow, but nothing the broker sends on a channel (answers to
/// declares and consumes, confirms, deliveries) reaches the client, except channel.open-ok.
pub struct TcpProxy {
    pub port: u16,
    state: Arc<ProxyState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// What a [`TcpProxy`] does with the connections it accepts from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Forward = 0,
    /// Closes them at once, before the AMQP handshake.
    Refuse = 1,
    /// Forwards the handshake and channel.open-ok, withholds every other channel frame.
    StallChannels = 2,
}

/// One proxied connection: both sockets, whether it has closed, whether its channels stall.
struct Proxied {
    client: TcpStream,
    server: TcpStream,
    closed: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
}

#[derive(Default)]
struct ProxyState {
    killed: AtomicBool,
    /// A `ProxyMode` for new connections.
    mode: std::sync::atomic::AtomicU8,
    /// How long each frame the broker sends on a channel (see [`TcpProxy::delay_channels`])
    /// is held back, in ms.
    delay_ms: AtomicU64,
    /// Every proxied connection, and the threads copying between its sockets.
    conns: std::sync::Mutex<Vec<Proxied>>,
    pumps: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl TcpProxy {
    pub fn start(upstream: (String, u16)) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let s = state.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.killed.load(Ordering::SeqCst) {
                    return; // drops the listener: the port is closed
                }
                let Ok(client) = client else { continue };
                let mode = s.mode.load(Ordering::SeqCst);
                if mode == ProxyMode::Refuse as u8 {
                    continue; // dropped: closed before the handshake
                }
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let closed = Arc::new(AtomicBool::new(false));
                let stalled = Arc::new(AtomicBool::new(mode == ProxyMode::StallChannels as u8));
                s.conns.lock().unwrap().push(Proxied {
                    client: client.try_clone().unwrap(),
                    server: server.try_clone().unwrap(),
                    closed: closed.clone(),
                    stalled: stalled.clone(),
                });
                let mut pumps = s.pumps.lock().unwrap();
                let (c, up) = (closed.clone(), client.try_clone().unwrap());
                let down = server.try_clone().unwrap();
                pumps.push(std::thread::spawn(move || {
                    pump(up, down);
                    c.store(true, Ordering::SeqCst);
                }));
                let state = s.clone();
                pumps.push(std::thread::spawn(move || {
                    pump_frames(server, client, &stalled, &state.delay_ms);
                    closed.store(true, Ordering::SeqCst);
                }));
            }
        });
        TcpProxy {
            port,
            state,
            accept: Some(accept),
        }
    }

    /// Connections proxied so far that are still open.
    pub fn open_connections(&self) -> usize {
        let conns = self.state.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| !c.closed.load(Ordering::SeqCst))
            .count()
    }

    /// Sets what happens to the connections accepted from now on.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// From now on, the open connections' channels stall (see [`ProxyMode::StallChannels`]).
    pub fn stall_open_connections(&self) {
        for c in self.state.conns.lock().unwrap().iter() {
            c.stalled.store(true, Ordering::SeqCst);
        }
    }

    /// From now on, every connection's channel frames from the broker (answers, confirms,
    /// deliveries; not channel.open-ok) are held back `delay` each: a slow node, not a
    /// silent one. `Duration::ZERO` ends it.
    pub fn delay_channels(&self, delay: Duration) {
        let ms = delay.as_millis() as u64;
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Cuts every connection and closes the port; joins every thread of the proxy.
    pub fn kill(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.state.killed.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        accept.join().unwrap();
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.client.shutdown(std::net::Shutdown::Both);
            let _ = c.server.shutdown(std::net::Shutdown::Both);
        }
        for pump in self.state.pumps.lock().unwrap().drain(..) {
            pump.join().unwrap();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Copies the broker's frames from `from` to `to` until either side closes, then closes
/// both. While `stalled`, frames on a channel other than 0 are dropped, except the channel
/// class's methods (open-ok, close-ok), and the others are held back `delay_ms` each: AMQP
/// frames are a type byte, a channel (u16), a payload size (u32), the payload (a method's
/// starts with its class id) and 0xCE.
fn pump_frames(mut from: TcpStream, mut to: TcpStream, stalled: &AtomicBool, delay_ms: &AtomicU64) {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    'copy: while let Ok(n @ 1..) = from.read(&mut chunk) {
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while buf.len() - at >= 7 {
            let size = u32::from_be_bytes(buf[at + 3..at + 7].try_into().unwrap()) as usize;
            let end = at + 7 + size + 1;
            if buf.len() < end {
                break;
            }
            let channel = u16::from_be_bytes([buf[at + 1], buf[at + 2]]);
            let method_class =
                (buf[at] == 1 && size >= 2).then(|| u16::from_be_bytes([buf[at + 7], buf[at + 8]]));
            let on_a_channel = channel != 0 && method_class != Some(20);
            let withheld = stalled.load(Ordering::SeqCst) && on_a_channel;
            let delay = delay_ms.load(Ordering::SeqCst);
            if on_a_channel && delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if !withheld && to.write_all(&buf[at..end]).is_err() {
                break 'copy;
            }
            at = end;
        }
        buf.drain(..at);
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The test broker's URL with its host and port replaced by 127.0.0.1:`port` (a proxy's).
pub fn broker_url_via(port: u16) -> String {
    let url = broker_url();
    let (scheme_user, rest) = url.rsplit_once('@').expect("TEST_BROKER_URL has user@host");
    let path = rest.find(['/', '?']).map_or("", |i| &rest[i..]);
    format!("{scheme_user}@127.0.0.1:{port}{path}")
}

/// The test broker's host and port, for a proxy in front of it.
pub fn broker_host_port() -> (String, u16) {
    let targets = cqrs_analytics::config::parse_amqp_urls(&broker_url()).unwrap();
    (targets[0].host.clone(), targets[0].port)
}
