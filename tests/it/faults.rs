//! Fault injection against the real PostgreSQL and RabbitMQ: the broker stopped, the
//! publisher's process killed with SIGKILL, a consumer dying between its commit and its
//! ack, database connections terminated, poison messages, unroutable publishes. Every
//! scenario runs under a steady order load posted over HTTP and ends with the invariant
//! *read model == write model after quiescence*, checked in SQL: nothing lost, nothing
//! doubled, money exact. Each prints one `FAULT-REPORT` line with the figures it saw, which
//! the README's reliability table quotes.

use std::collections::{BTreeMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions, FieldTable};
use cqrs_analytics::app::Role;
use cqrs_analytics::event::Event;
use serde_json::json;
use uuid::Uuid;

use crate::harness::*;

/// How long a load client waits for an answer before calling it a hang.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the read model may take to catch up once the load has stopped.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Load: a few client threads posting orders over real HTTP, recording every outcome.
// ---------------------------------------------------------------------------------------

/// What one request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Status(u16, String),
    /// Connection refused or reset: the server process was not there (SIGKILL scenario).
    Io(String),
    /// No answer within `CLIENT_TIMEOUT`: a hang.
    Timeout,
}

/// Posts one order on a fresh connection, with connect and read timeouts.
pub(crate) fn post_order(addr: SocketAddr, body: &str) -> Outcome {
    post_order_keyed(addr, body, None)
}

/// `post_order`, with an `Idempotency-Key` when `key` is given.
pub(crate) fn post_order_keyed(addr: SocketAddr, body: &str, key: Option<&str>) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return Outcome::Io(e.kind().to_string()),
    };
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let key = key.map_or(String::new(), |k| format!("Idempotency-Key: {k}\r\n"));
    let req = format!(
        "POST /api/orders HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{key}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Outcome::Io(e.kind().to_string());
    }
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Outcome::Timeout
        }
        Err(e) if raw.is_empty() => return Outcome::Io(e.kind().to_string()),
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(&raw);
    match text.get(9..12).and_then(|s| s.parse().ok()) {
        Some(status) => {
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            Outcome::Status(status, body.chars().take(200).collect())
        }
        None if raw.is_empty() => Outcome::Io("empty response".into()),
        None => Outcome::Io(format!("malformed response {text:?}")),
    }
}

/// Every outcome the load saw, with when it came back.
#[derive(Default)]
pub(crate) struct LoadLog {
    outcomes: Vec<(Instant, Outcome)>,
}

impl LoadLog {
    pub(crate) fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|(_, o)| pred(o)).count()
    }

    pub(crate) fn created(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Status(201, _)))
    }

    pub(crate) fn status_5xx(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Status(s, _) if *s >= 500))
    }

    /// A histogram of outcomes, for failure messages.
    pub(crate) fn summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, o) in &self.outcomes {
            let k = match o {
                Outcome::Status(s, _) => s.to_string(),
                Outcome::Io(e) => format!("io:{e}"),
                Outcome::Timeout => "timeout".into(),
            };
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    /// The outcomes other than `allowed` statuses (and, if `io_ok`, I/O errors).
    pub(crate) fn unexpected(&self, allowed: &[u16], io_ok: bool) -> Vec<Outcome> {
        self.outcomes
            .iter()
            .map(|(_, o)| o)
            .filter(|o| match o {
                Outcome::Status(s, _) => !allowed.contains(s),
                Outcome::Io(_) => !io_ok,
                Outcome::Timeout => true,
            })
            .take(10)
            .cloned()
            .collect()
    }
}

/// A steady order load: `threads` clients posting orders for `products` (a few ms apart)
/// until stopped. Stops and joins its threads on drop too, so a failing test cleans up.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<LoadLog>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr, products: &[i64], threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let threads = (0..threads)
            .map(|t| {
                let (stop, log, products) = (stop.clone(), log.clone(), products.to_vec());
                thread::spawn(move || {
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ ((t as u64 + 1) * 0x1234_5678);
                    let mut next = move |n: u64| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % n
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let first = next(products.len() as u64) as usize;
                        let mut items = vec![(products[first], next(3) + 1)];
                        if next(2) == 0 {
                            let second = (first + 1) % products.len();
                            items.push((products[second], next(2) + 1));
                        }
                        let items: Vec<String> = items
                            .iter()
                            .map(|(p, q)| format!(r#"{{"productId":{p},"quantity":{q}}}"#))
                            .collect();
                        let body = format!(
                            r#"{{"customerId":{},"items":[{}]}}"#,
                            next(40) + 1,
                            items.join(",")
                        );
                        // Every other client sends its orders with an Idempotency-Key.
                        let key = (t % 2 == 1).then(|| Uuid::new_v4().to_string());
                        let outcome = post_order_keyed(addr, &body, key.as_deref());
                        let failed = !matches!(outcome, Outcome::Status(201, _));
                        log.lock().unwrap().outcomes.push((Instant::now(), outcome));
                        // Back off a little more after a failure, as a real client would.
                        thread::sleep(Duration::from_millis(if failed { 50 } else { 8 }));
                    }
                })
            })
            .collect();
        Load { stop, log, threads }
    }

    pub(crate) fn created(&self) -> usize {
        self.log.lock().unwrap().created()
    }

    /// Stops the clients, joins them and returns what they saw.
    pub(crate) fn stop(mut self) -> LoadLog {
        self.halt();
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Four products in two categories with plenty of stock; returns their ids.
pub(crate) fn seed_products(addr: SocketAddr) -> Vec<i64> {
    [
        ("Laptop", "Electronics", 1299.99),
        ("Mouse", "Electronics", 19.99),
        ("Mug", "Home & Garden", 5.25),
        ("Sticker", "Home & Garden", 0.10),
    ]
    .iter()
    .map(|(n, c, p)| create_product(addr, n, c, *p, 10_000_000))
    .collect()
}

// ---------------------------------------------------------------------------------------
// Observation: metrics, ledgers, recovery time, the report line.
// ---------------------------------------------------------------------------------------

/// The event ids of every outbox row committed so far.
pub(crate) fn outbox_event_ids(env: &TestEnv) -> Vec<Uuid> {
    env.write()
        .query("SELECT (payload->>'eventId')::uuid FROM outbox", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// How many of `ids` the read model has applied.
pub(crate) fn applied_among(env: &TestEnv, ids: &[Uuid]) -> usize {
    let n: i64 = env
        .read()
        .query_one(
            "SELECT count(*) FROM processed_events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .unwrap()
        .get(0);
    n as usize
}

/// Waits until every event committed before `since` (the end of the fault) is applied in
/// the read model, while the load goes on; returns the time that took.
fn wait_recovered(env: &TestEnv, since: Instant, timeout: Duration) -> Duration {
    let ids = outbox_event_ids(env);
    wait_until(
        "every event committed before the fault ended to reach the read model",
        timeout,
        || (applied_among(env, &ids) == ids.len()).then_some(()),
    );
    since.elapsed()
}

/// Waits for the read model to equal the write model, printing both sides if it does not,
/// then runs the harness's full check (every view).
pub(crate) fn converge(env: &TestEnv) {
    let (mut w, mut r) = (env.write(), env.read());
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let (want, got) = (write_totals(&mut w), read_totals(&mut r));
        if want == got {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the read model did not converge within {CONVERGE_TIMEOUT:?}:\n  write (orders, qty, revenue, spend) = {want:?}\n  read                                 = {got:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_converges(env, Duration::from_secs(1));
}

/// Events lost (committed in the outbox, never applied) and orders applied more than once,
/// measured after convergence.
fn ledger(env: &TestEnv) -> (usize, i64) {
    let ids = outbox_event_ids(env);
    let lost = ids.len() - applied_among(env, &ids);
    let (write_orders, ..) = write_totals(&mut env.write());
    let (read_orders, ..) = read_totals(&mut env.read());
    (lost, (read_orders - write_orders).max(0))
}

fn report(scenario: &str, env: &TestEnv, log: &LoadLog, recovery: Duration, extra: &str) {
    let (lost, duplicates_applied) = ledger(env);
    eprintln!(
        "FAULT-REPORT {scenario} lost={lost} duplicates_applied={duplicates_applied} status_5xx={} recovery_ms={} orders_created={} {extra}",
        log.status_5xx(),
        recovery.as_millis(),
        log.created(),
    );
    assert_eq!(lost, 0, "{scenario}: events lost");
    assert_eq!(duplicates_applied, 0, "{scenario}: duplicates applied");
}

/// Waits until the load has had `n` more orders accepted.
fn wait_for_orders(load: &Load, n: usize, what: &str) {
    let target = load.created() + n;
    wait_until(what, Duration::from_secs(10), || {
        (load.created() >= target).then_some(())
    });
}

// ---------------------------------------------------------------------------------------
// 1. The broker stopped and started again.
// ---------------------------------------------------------------------------------------

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("running rabbitmqctl {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Restarts the broker's application when dropped, so a failing test never leaves the
/// shared broker stopped for the tests that follow.
struct BrokerStopped;

impl BrokerStopped {
    fn stop() -> BrokerStopped {
        rabbitmqctl(&["stop_app"]).unwrap();
        BrokerStopped
    }

    fn start(self) {
        drop(self);
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["start_app"]) {
            eprintln!("{e}");
        }
        if let Err(e) = rabbitmqctl(&["await_startup"]) {
            eprintln!("{e}");
        }
    }
}

#[test]
fn broker_outage_accepts_every_order_and_drains_the_outbox() {
    let env = TestEnv::exclusive();
    let command = env.start(Role::Command);
    let consumer = env.start(Role::Consumer);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_for_orders(&load, 50, "orders before the outage");

    let outage = BrokerStopped::stop();
    let stopped_at = Instant::now();
    let before = load.created();
    thread::sleep(Duration::from_secs(4));
    let during_outage = load.created() - before;
    let unpublished: i64 = unpublished(&env);
    outage.start();
    let fault_end = Instant::now();
    let outage_ms = (fault_end - stopped_at).as_millis();

    let recovery = wait_recovered(&env, fault_end, Duration::from_secs(20));
    wait_for_orders(&load, 50, "orders after the outage");
    let log = load.stop();
    converge(&env);
    let unexpected = log.unexpected(&[201], false);
    assert!(
        unexpected.is_empty(),
        "every order during the outage must get 201; saw {:?}: {unexpected:?}",
        log.summary()
    );
    assert!(
        during_outage > 0 && unpublished > 0,
        "the outage should have accepted orders ({during_outage}) and left them in the outbox ({unpublished})"
    );
    let reconnects = counter(command.command(), "outbox_session_errors_total");
    let consumer_reconnects = counter(consumer.consumer(), "consumer_session_errors_total");
    report(
        "broker_outage",
        &env,
        &log,
        recovery,
        &format!(
            "outage_ms={outage_ms} accepted_during_outage={during_outage} outbox_backlog={unpublished} publisher_session_errors={reconnects} consumer_session_errors={consumer_reconnects}"
        ),
    );
}

// ---------------------------------------------------------------------------------------
// 2. The publisher's process killed with SIGKILL and restarted.
// ---------------------------------------------------------------------------------------

/// The real binary running `command-service` for this test on `port` (0: a port the kernel
/// picks); killed on drop.
fn spawn_command_service(env: &TestEnv, port: u16, generation: u32) -> ChildService {
    let mut cmd = env.binary("command-service");
    cmd.env("RUST_LOG", "info")
        .env("COMMAND_SERVICE_PORT", port.to_string())
        .env("COMMAND_HTTP_WORKERS", "8")
        .env("WRITE_POOL_SIZE", "8")
        .env("OUTBOX_POLL_INTERVAL_MS", "200")
        .env("BROKER_RECONNECT_MAX_MS", "500")
        .env("MIGRATE_ON_START", "true");
    ChildService::spawn(
        &mut cmd,
        "command-service",
        &format!("faults-{}-{generation}", env.id),
    )
}

/// Widens the window between "the broker confirmed the batch" and "the outbox rows are
/// marked published" to 300 ms, so that a SIGKILL reliably lands inside it: the marking
/// UPDATE sleeps in a statement trigger (on the test's own database only).
pub(crate) const SLOW_MARK: &str = "
CREATE FUNCTION it_slow_mark() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
CREATE TRIGGER it_slow_mark BEFORE UPDATE ON outbox
FOR EACH STATEMENT EXECUTE FUNCTION it_slow_mark();";

#[test]
fn publisher_killed_mid_stream_delivers_duplicates_but_applies_none() {
    let env = TestEnv::new();
    let consumer = env.start(Role::Consumer);
    let first = spawn_command_service(&env, 0, 1);
    // The restarted process listens where the first did: the load's clients reconnect.
    let port = first.addr.port();
    let products = seed_products(first.addr);
    let load = Load::start(first.addr, &products, 4);
    wait_for_orders(&load, 50, "orders before the kill");

    env.write().batch_execute(SLOW_MARK).unwrap();
    // Kill while a confirmed batch is waiting to be marked: those messages are in the
    // broker and will be published again by the next process.
    let write_db = env.write_db.clone();
    let mut probe = env.write();
    let marking: i32 = wait_until(
        "the publisher to be marking a confirmed batch",
        Duration::from_secs(10),
        || {
            probe
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1
                     AND query LIKE 'EXECUTE outbox_mark%' AND wait_event = 'PgSleep'",
                    &[&write_db],
                )
                .unwrap()
                .map(|row| row.get(0))
        },
    );
    first.kill9();
    let killed_at = Instant::now();
    // The mark and its COMMIT went to the server as one query, which the server finishes
    // after the client has died (marking rows the broker did confirm: no duplicates). A
    // process killed before it sent them leaves the rows unmarked: end the backend too.
    probe
        .execute("SELECT pg_terminate_backend($1)", &[&marking])
        .unwrap();
    env.write()
        .batch_execute("DROP TRIGGER it_slow_mark ON outbox")
        .unwrap();
    let in_limbo: i64 = unpublished(&env);
    thread::sleep(Duration::from_millis(500));
    let second = spawn_command_service(&env, port, 2);
    let fault_end = Instant::now();
    let downtime_ms = (fault_end - killed_at).as_millis();

    let recovery = wait_recovered(&env, fault_end, Duration::from_secs(20));
    wait_for_orders(&load, 50, "orders after the restart");
    let log = load.stop();
    converge(&env);
    let unexpected = log.unexpected(&[201], true);
    assert!(
        unexpected.is_empty(),
        "orders must get 201 or no answer at all (process down); saw {:?}: {unexpected:?}",
        log.summary()
    );
    let down = (killed_at - Duration::from_millis(500))..(fault_end + Duration::from_millis(500));
    let refused_outside: Vec<&Outcome> = log
        .outcomes
        .iter()
        .filter(|(t, o)| matches!(o, Outcome::Io(_)) && !down.contains(t))
        .map(|(_, o)| o)
        .collect();
    assert!(
        refused_outside.is_empty(),
        "connection failures outside the kill window: {refused_outside:?}"
    );
    let duplicates = counter(consumer.consumer(), "consumer_duplicates_dropped_total");
    let applied = counter(consumer.consumer(), "consumer_events_applied_total");
    let events = outbox_event_ids(&env).len() as u64;
    assert_eq!(
        applied, events,
        "every event applied exactly once (applied counter vs outbox rows)"
    );
    assert!(
        duplicates > 0,
        "the kill landed between confirm and mark, so the restarted publisher must have \
         republished at least one event (duplicates dropped = {duplicates})"
    );
    let io_errors = log.count(|o| matches!(o, Outcome::Io(_)));
    report(
        "publisher_sigkill",
        &env,
        &log,
        recovery,
        &format!(
            "duplicates_delivered={duplicates} unpublished_at_kill={in_limbo} downtime_ms={downtime_ms} refused_while_down={io_errors}"
        ),
    );
    drop(second);
}

// ---------------------------------------------------------------------------------------
// 3. A consumer that commits and dies before acking.
// ---------------------------------------------------------------------------------------

#[test]
fn consumer_dying_after_commit_before_ack_changes_nothing_on_redelivery() {
    const TAKEN: usize = 40;
    let env = TestEnv::new();
    let command = env.start(Role::Command);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_until(
        "order events waiting in the queue",
        Duration::from_secs(10),
        || (env.queue_depth(&env.broker.order_queue) as usize >= TAKEN).then_some(()),
    );

    // The doomed consumer, driven by hand: take deliveries, apply and commit them, then
    // vanish without a single ack.
    let (conn, ch) = env.amqp();
    ch.qos(0, TAKEN as u16, false).unwrap();
    let deliveries = ch
        .basic_consume(env.broker.order_queue.as_str(), ConsumerOptions::default())
        .unwrap();
    let mut events = Vec::with_capacity(TAKEN);
    while events.len() < TAKEN {
        match deliveries.receiver().recv_timeout(Duration::from_secs(5)) {
            Ok(ConsumerMessage::Delivery(d)) => events.push(Event::parse(&d.body).unwrap()),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    let pool = cqrs_analytics::db::pool(
        &env.config().read_db,
        1,
        &env.config().db,
        "doomed",
        cqrs_analytics::db::Session::Plain,
    );
    let counts =
        cqrs_analytics::read::projection::apply_batch(&mut pool.get().unwrap(), &events).unwrap();
    assert_eq!(counts.applied, TAKEN, "the doomed consumer's commit");
    drop(deliveries);
    drop(ch);
    drop(conn.close());
    let ids: Vec<Uuid> = events.iter().map(Event::event_id).collect();
    assert_eq!(applied_among(&env, &ids), TAKEN, "committed before dying");

    let consumer = env.start(Role::Consumer);
    let fault_end = Instant::now();
    let recovery = wait_recovered(&env, fault_end, Duration::from_secs(20));
    wait_for_orders(&load, 50, "orders after the consumer restarted");
    let log = load.stop();
    converge(&env);
    let unexpected = log.unexpected(&[201], false);
    assert!(unexpected.is_empty(), "{:?}: {unexpected:?}", log.summary());
    let duplicates = counter(consumer.consumer(), "consumer_duplicates_dropped_total");
    assert!(
        duplicates >= TAKEN as u64,
        "the {TAKEN} committed-but-unacked events must be redelivered and dropped as \
         duplicates; the counter says {duplicates}"
    );
    report(
        "consumer_dies_before_ack",
        &env,
        &log,
        recovery,
        &format!("committed_unacked={TAKEN} duplicates_delivered={duplicates}"),
    );
}

// ---------------------------------------------------------------------------------------
// 4. Database connections terminated under load.
// ---------------------------------------------------------------------------------------

/// Every connection of both databases is ended four times, 0.7 s apart, under a load of
/// orders: each order is answered 201 (a statement whose connection was ended runs again on
/// another, `CommandService::write`; 9 to 12 of about 1,300 were answered 503 before), none
/// is lost or applied twice, and the pools heal by themselves.
#[test]
fn terminated_db_connections_lose_no_order_and_pools_recover() {
    let env = TestEnv::new();
    let command = env.start(Role::Command);
    let _consumer = env.start(Role::Consumer);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_for_orders(&load, 50, "orders before the terminations");

    let mut admin =
        postgres::Client::connect(&format!("{}/postgres", pg_base()), postgres::NoTls).unwrap();
    let dbs = vec![env.write_db.clone(), env.read_db.clone()];
    let mut terminated = 0;
    for _ in 0..4 {
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
                &[&dbs],
            )
            .unwrap();
        terminated += rows.len();
        thread::sleep(Duration::from_millis(700));
    }
    let fault_end = Instant::now();
    assert!(terminated > 0, "no backend was terminated");

    // The pools must heal by themselves: a fresh order gets 201 again.
    let probe = format!(
        r#"{{"customerId":1,"items":[{{"productId":{},"quantity":1}}]}}"#,
        products[0]
    );
    let first_201 = wait_until(
        "an order to succeed after the terminations",
        Duration::from_secs(10),
        || {
            matches!(
                post_order(command.command(), &probe),
                Outcome::Status(201, _)
            )
            .then(Instant::now)
        },
    );
    let recovery = wait_recovered(&env, fault_end, Duration::from_secs(20));
    let healed_at = Instant::now();
    wait_for_orders(&load, 100, "orders after the terminations");
    let log = load.stop();
    converge(&env);

    let unexpected = log.unexpected(&[201], false);
    assert!(
        unexpected.is_empty(),
        "every order must get 201 within {CLIENT_TIMEOUT:?}; saw {:?}: {unexpected:?}",
        log.summary()
    );
    let late_failures: Vec<&Outcome> = log
        .outcomes
        .iter()
        .filter(|(t, o)| *t > healed_at && !matches!(o, Outcome::Status(201, _)))
        .map(|(_, o)| o)
        .collect();
    assert!(
        late_failures.is_empty(),
        "once healed, every request must succeed: {late_failures:?}"
    );
    report(
        "db_connections_terminated",
        &env,
        &log,
        recovery,
        &format!(
            "backends_terminated={terminated} status_503={} first_201_after_ms={}",
            log.count(|o| matches!(o, Outcome::Status(503, _))),
            (first_201 - fault_end).as_millis()
        ),
    );
}

// ---------------------------------------------------------------------------------------
// 5. Poison messages go to the dead-letter queue while the rest keep flowing.
// ---------------------------------------------------------------------------------------

#[test]
fn poison_messages_are_dead_lettered_while_good_ones_flow() {
    let env = TestEnv::new();
    let command = env.start(Role::Command);
    let consumer = env.start(Role::Consumer);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_for_orders(&load, 50, "orders before the poison");

    // (a) not JSON at all; (b) a well-formed OrderCreated that cannot be applied.
    let garbage_id = format!("poison-garbage-{}", env.id);
    let (overflow_event, overflow) = overflowing_order(products[0]);
    let (conn, ch) = env.amqp();
    let injected = Instant::now();
    publish_raw(&env, "order-events", &garbage_id, b"this is not an event {");
    publish_raw(
        &env,
        "order-events",
        &overflow_event.to_string(),
        overflow.as_bytes(),
    );
    let created_at_injection = load.created();

    let dlq = &env.broker.dead_letter_queue;
    // A liveness deadline, not a speed target: each attempt replays a whole batch of good
    // events one at a time, which takes seconds on a loaded machine (the time is reported).
    let dead_lettered_after = wait_until(
        "both poison messages in the dead-letter queue",
        Duration::from_secs(90),
        || (env.queue_depth(dlq) >= 2).then(|| injected.elapsed()),
    );
    let flowed_meanwhile = load.created() - created_at_injection;
    let log = load.stop();
    converge(&env);

    let mut dead: HashSet<String> = HashSet::new();
    while let Some(m) = ch.basic_get(dlq.as_str(), false).unwrap() {
        dead.insert(
            m.delivery
                .properties
                .message_id()
                .clone()
                .unwrap_or_default(),
        );
        m.ack(&ch).unwrap();
    }
    drop(conn.close());
    let expected: HashSet<String> = [garbage_id, overflow_event.to_string()].into();
    assert_eq!(
        dead, expected,
        "exactly the poison messages are dead-lettered"
    );
    assert_eq!(
        applied_among(&env, &[overflow_event]),
        0,
        "the poison event must not be recorded as processed"
    );
    let customer: i64 = env
        .read()
        .query_one(
            "SELECT count(*) FROM customer_ltv_view WHERE customer_id = 999999",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(customer, 0, "the poison event must leave no trace");
    let unexpected = log.unexpected(&[201], false);
    assert!(unexpected.is_empty(), "{:?}: {unexpected:?}", log.summary());
    let requeued = counter(consumer.consumer(), "consumer_requeued_total");
    let dead_counter = counter(consumer.consumer(), "consumer_dead_lettered_total");
    assert_eq!(dead_counter, 2, "consumer_dead_lettered_total");
    // Failures are counted in the read DB, across consumer threads: exactly max attempts.
    let config = env.config();
    let bound = u64::from(config.consumer_attempts_max) - 1;
    assert_eq!(requeued, bound, "requeues before dead-lettering");
    let attempts: i32 = env
        .read()
        .query_one("SELECT max(attempts) FROM event_failures", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        attempts as u32, config.consumer_attempts_max,
        "recorded attempts"
    );
    // Reported, not asserted: the poison's life can be shorter than one order. That good
    // events are applied while a poison message is retried is pinned by the next test.
    report(
        "poison_message",
        &env,
        &log,
        dead_lettered_after,
        &format!(
            "dead_lettered={dead_counter} poison_attempts={} orders_accepted_during_poison={flowed_meanwhile}",
            requeued + 1
        ),
    );
}

/// A well-formed OrderCreated that parses (every field in range) but can never be applied:
/// quantity × price overflows the cents the projection sums in, on every attempt.
fn overflowing_order(product: i64) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let body = format!(
        r#"{{"eventId":"{id}","eventType":"OrderCreated","timestamp":"{}","orderId":999999,"customerId":999999,"items":[{{"productId":{product},"productName":"Poison","category":"Poison","quantity":2,"price":92233720368547758.06}}],"total":1.00}}"#,
        cqrs_analytics::event::format_timestamp(&cqrs_analytics::event::now_millis()),
    );
    assert!(
        Event::parse(body.as_bytes()).is_ok(),
        "the overflow event must parse, or it tests nothing new: {body}"
    );
    (id, body)
}

/// How many times the consumers have recorded `key` as failed (0 if never, or forgotten).
fn failed_attempts(env: &TestEnv, key: &str) -> i32 {
    env.read()
        .query_opt(
            "SELECT attempts FROM event_failures WHERE message_key = $1",
            &[&key],
        )
        .unwrap()
        .map_or(0, |r| r.get(0))
}

#[test]
fn good_events_are_applied_while_a_poison_message_is_still_retried() {
    let env = TestEnv::new();
    let command = env.start(Role::Command);
    // The poison cannot reach the dead-letter queue during the test: what is measured is
    // the flow while it is being retried, however fast or slow the machine.
    let max_attempts = 1000;
    let consumer = env.start_with(Role::Consumer, |c| c.consumer_attempts_max = max_attempts);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_for_orders(&load, 20, "orders before the poison");

    let (poison, body) = overflowing_order(products[0]);
    let key = poison.to_string();
    publish_raw(&env, "order-events", &key, body.as_bytes());
    wait_until(
        "the poison's first failure",
        Duration::from_secs(30),
        || (failed_attempts(&env, &key) >= 1).then_some(()),
    );
    // Orders accepted from now on are published after the poison, behind it in the queue.
    let before: HashSet<Uuid> = outbox_event_ids(&env).into_iter().collect();
    wait_for_orders(&load, 30, "orders after the poison's first failure");
    let after: Vec<Uuid> = outbox_event_ids(&env)
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(
        after.len() >= 30,
        "{} new events in the outbox",
        after.len()
    );
    wait_until(
        "every order accepted after the poison's first failure applied",
        Duration::from_secs(60),
        || (applied_among(&env, &after) == after.len()).then_some(()),
    );
    let attempts = failed_attempts(&env, &key);
    let log = load.stop();
    assert!(
        (1..max_attempts as i32).contains(&attempts),
        "the poison must still be in its retries ({attempts} of {max_attempts} attempts)"
    );
    assert_eq!(
        applied_among(&env, &[poison]),
        0,
        "the poison is not applied"
    );
    assert_eq!(env.queue_depth(&env.broker.dead_letter_queue), 0);
    let unexpected = log.unexpected(&[201], false);
    assert!(unexpected.is_empty(), "{:?}: {unexpected:?}", log.summary());
    eprintln!(
        "POISON-FLOW applied_behind_poison={} poison_attempts_meanwhile={attempts} requeued={}",
        after.len(),
        counter(consumer.consumer(), "consumer_requeued_total")
    );
}

// ---------------------------------------------------------------------------------------
// 6. Unroutable publishes stay in the outbox.
// ---------------------------------------------------------------------------------------

#[test]
fn unroutable_publishes_stay_in_the_outbox_until_routable() {
    let env = TestEnv::new();
    let command = env.start(Role::Command);
    let _consumer = env.start(Role::Consumer);
    let products = seed_products(command.command());
    let load = Load::start(command.command(), &products, 4);
    wait_for_orders(&load, 50, "orders before the unbinding");

    let (conn, ch) = env.amqp();
    ch.queue_unbind(
        env.broker.order_queue.as_str(),
        env.broker.exchange.as_str(),
        "order-events",
        FieldTable::new(),
    )
    .unwrap();
    let returned_before = counter(command.command(), "outbox_returned_total");
    let watermark: i64 = env
        .write()
        .query_one("SELECT coalesce(max(id), 0) FROM outbox", &[])
        .unwrap()
        .get(0);
    let unbound_at = Instant::now();
    wait_for_orders(&load, 100, "orders while unroutable");
    thread::sleep(Duration::from_millis(500));
    let stuck = |published: bool| -> i64 {
        env.write()
            .query_one(
                &format!(
                    "SELECT count(*) FROM outbox WHERE id > $1 AND topic = 'order-events'
                     AND published_at IS {} NULL",
                    if published { "NOT" } else { "" }
                ),
                &[&watermark],
            )
            .unwrap()
            .get(0)
    };
    let (held, leaked) = (stuck(false), stuck(true));
    let returned = counter(command.command(), "outbox_returned_total") - returned_before;
    assert!(held > 0, "orders were created while the queue was unbound");
    assert_eq!(
        leaked, 0,
        "no unroutable order event may be marked published ({held} held)"
    );
    assert!(
        returned >= held as u64,
        "outbox_returned_total grew by {returned}, fewer than the {held} held rows"
    );

    cqrs_analytics::broker::declare_topology(&ch, &env.broker).unwrap();
    drop(conn.close());
    let fault_end = Instant::now();
    let unbound_ms = (fault_end - unbound_at).as_millis();
    let recovery = wait_recovered(&env, fault_end, Duration::from_secs(20));
    wait_for_orders(&load, 50, "orders after the rebinding");
    let log = load.stop();
    converge(&env);
    assert_eq!(stuck(false), 0, "the outbox drained after the rebinding");
    let unexpected = log.unexpected(&[201], false);
    assert!(unexpected.is_empty(), "{:?}: {unexpected:?}", log.summary());
    report(
        "unroutable_publish",
        &env,
        &log,
        recovery,
        &format!("held_in_outbox={held} returned={returned} unbound_ms={unbound_ms}"),
    );
}

// ---------------------------------------------------------------------------------------
// 7. What a database error says in a log line.
// ---------------------------------------------------------------------------------------

#[test]
fn database_errors_show_their_sqlstate_and_the_servers_message() {
    // postgres::Error's own Display says only "db error"; a log line must say what happened.
    let env = TestEnv::new();
    let mut holder = env.write();
    let mut waiter = env.write();
    let mut tx = holder.transaction().unwrap();
    tx.batch_execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    waiter.batch_execute("SET lock_timeout = '50ms'").unwrap();
    let e = cqrs_analytics::Error::from(waiter.query("SELECT 1 FROM products", &[]).unwrap_err());
    let shown = e.to_string();
    assert!(
        shown.contains("55P03 canceling statement due to lock timeout"),
        "{shown}"
    );
    assert!(
        e.is_transient(),
        "a lock timeout is worth retrying: {shown}"
    );
    tx.rollback().unwrap();
}

/// A plain TCP proxy in front of PostgreSQL for one test: `mute` makes the connections open
/// now drop what the server sends them, `cut` then closes them; connections accepted later
/// are forwarded whole. Its threads end when their sockets close; the listener's when the
/// proxy is dropped.
/// The client's and the server's socket of each proxied connection, and whether it is muted.
type Proxied = Arc<Mutex<Vec<(TcpStream, TcpStream, Arc<AtomicBool>)>>>;

struct MutingProxy {
    port: u16,
    open: Proxied,
    stop: Arc<AtomicBool>,
}

impl MutingProxy {
    fn start(upstream: SocketAddr) -> MutingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open: Proxied = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns, stopped) = (open.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(mut client), Ok(mut server)) = (client, TcpStream::connect(upstream))
                else {
                    continue;
                };
                let muted = Arc::new(AtomicBool::new(false));
                let (mut c, mut s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                conns.lock().unwrap().push((
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    muted.clone(),
                ));
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c, &mut s);
                    let _ = s.shutdown(std::net::Shutdown::Both);
                });
                thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !muted.load(Ordering::SeqCst) && client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        MutingProxy { port, open, stop }
    }

    fn mute(&self) {
        for (_, _, muted) in self.open.lock().unwrap().iter() {
            muted.store(true, Ordering::SeqCst);
        }
    }

    fn cut(&self) {
        for (client, server, muted) in self.open.lock().unwrap().iter() {
            if muted.load(Ordering::SeqCst) {
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for MutingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for (client, server, _) in self.open.lock().unwrap().iter() {
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A command service whose one write connection goes through a `MutingProxy` (the request
/// after a mute takes the muted connection).
fn command_behind_a_muting_proxy(
    env: &TestEnv,
    tweak: impl FnOnce(&mut cqrs_analytics::Config),
) -> (MutingProxy, App) {
    let pg: postgres::Config = env.write_url().parse().unwrap();
    let host = match &pg.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("the tests' server must be on TCP, not {other:?}"),
    };
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), pg.get_ports()[0]))
        .unwrap()
        .next()
        .unwrap();
    let proxy = MutingProxy::start(upstream);
    let via_proxy = format!(
        "postgresql://{}@127.0.0.1:{}/{}",
        pg.get_user().unwrap_or("postgres"),
        proxy.port,
        env.write_db
    );
    let app = env.start_with(Role::Command, |c| {
        c.write_db = via_proxy.parse().unwrap();
        c.write_pool_size = 1;
        tweak(c);
    });
    (proxy, app)
}

/// The two writes whose lost connections the tests below settle: an order of 2 units of
/// `product` for `customer`, and a product named `name`; each with the table it writes.
fn two_writes(
    product: i64,
    customer: i64,
    name: &str,
) -> [(&'static str, serde_json::Value, &'static str); 2] {
    [
        (
            "/api/orders",
            json!({"customerId": customer, "items": [{"productId": product, "quantity": 2}]}),
            "orders",
        ),
        (
            "/api/products",
            json!({"name": name, "category": "Answers", "price": 1.0, "stock": 1}),
            "products",
        ),
    ]
}

fn rows(env: &TestEnv, table: &str) -> i64 {
    env.write()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .unwrap()
        .get(0)
}

/// `r` is the 201 of `table`'s newest row, and `table` has one row more than `before`.
fn assert_written_once(env: &TestEnv, r: &Reply, path: &str, table: &str, before: i64) {
    assert_eq!(r.status, 201, "{path}: {}", r.body);
    let newest: i64 = env
        .write()
        .query_one(&format!("SELECT max(id) FROM {table}"), &[])
        .unwrap()
        .get(0);
    let field = if table == "orders" {
        "orderId"
    } else {
        "productId"
    };
    assert_eq!(r.json()[field], json!(newest), "{path}");
    assert_eq!(rows(env, table), before + 1, "{path}: written once");
}

/// The connection of an order's statement is lost after the order committed (its answer
/// never arrives): the service looks the order up by its event id on a fresh connection
/// and answers the 201 it would have given, and counts it. It answered 503, so a client
/// retrying without an Idempotency-Key placed the order twice. The same for a product.
#[test]
fn a_write_that_committed_before_its_connection_was_lost_is_answered_201() {
    let env = TestEnv::new();
    let (proxy, app) = command_behind_a_muting_proxy(&env, |_| {});
    let a = app.command();
    let product = create_product(a, "Lost", "Answers", 3.0, 10);
    let orders_before = counter(a, "orders_created_total");
    for (path, body, table) in two_writes(product, 5, "Lost too") {
        // The same request first, so that its statement is prepared on the connection (the
        // mute would drop the answer to the prepare).
        assert_eq!(post_json(a, path, &body).status, 201);
        let before = rows(&env, table);
        proxy.mute();
        let request = thread::spawn(move || post_json(a, path, &body));
        wait_until("the write committed", Duration::from_secs(20), || {
            (rows(&env, table) == before + 1).then_some(())
        });
        proxy.cut();
        let r = request.join().unwrap();
        assert_written_once(&env, &r, path, table, before);
    }
    assert_eq!(counter(a, "orders_created_total"), orders_before + 2);
}

/// The connection of a write is lost while its statement waits for a lock on the server: it
/// has not committed, and would once the lock is released. The service ends that server
/// process, finds nothing written and runs the statement once more: 201, written once. It
/// answered 503 and the lost statement then committed, so a client was told that an order
/// which was placed was not. The same for a product.
#[test]
fn a_write_whose_connection_was_lost_before_it_committed_is_written_once() {
    let env = TestEnv::new();
    let (proxy, app) = command_behind_a_muting_proxy(&env, |c| {
        // The lost statement must not give up waiting for the test's lock by itself.
        c.db.lock = Duration::from_secs(30);
    });
    let a = app.command();
    let product = create_product(a, "Held", "Answers", 3.0, 10);
    let orders_before = counter(a, "orders_created_total");
    let waiting = |env: &TestEnv| -> Vec<i32> {
        env.write()
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'command-service' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    for (path, body, table) in two_writes(product, 6, "Held too") {
        // Prepared on the connection first, as a request would have.
        assert_eq!(post_json(a, path, &body).status, 201);
        let before = rows(&env, table);
        let mut holder = env.write();
        let mut lock = holder.transaction().unwrap();
        lock.batch_execute(&format!("LOCK TABLE {table} IN SHARE MODE"))
            .unwrap();
        let request = thread::spawn(move || post_json(a, path, &body));
        let lost = wait_until(
            "the write waits for the lock",
            Duration::from_secs(20),
            || waiting(&env).first().copied(),
        );
        proxy.mute();
        proxy.cut();
        wait_until(
            "the write waits again on a new connection, or is answered",
            Duration::from_secs(20),
            || (request.is_finished() || waiting(&env).iter().any(|&p| p != lost)).then_some(()),
        );
        let gone: i64 = env
            .write()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&lost],
            )
            .unwrap()
            .get(0);
        lock.rollback().unwrap();
        let r = request.join().unwrap();
        assert_written_once(&env, &r, path, table, before);
        assert_eq!(gone, 0, "{path}: the lost statement's process was ended");
    }
    let stock: i32 = env
        .write()
        .query_one("SELECT stock FROM products WHERE id = $1", &[&product])
        .unwrap()
        .get(0);
    assert_eq!(stock, 10 - 2 - 2, "two orders of 2 units, each taken once");
    assert_eq!(counter(a, "orders_created_total"), orders_before + 2);
}
