//! Network partitions between a service and its database, made with iptables: every packet
//! of the connections open at the cut is dropped, both ways, while new connections pass (a
//! peer that vanished, as after a failover to a new host). Neither side is told: no FIN, no
//! RST, nothing acknowledged. The kernel must find the dead connections on both sides
//! (keepalive probes, TCP_USER_TIMEOUT), and the service must go on over new ones, with no
//! event lost or counted twice. With the system's defaults this took 11 to 15 minutes on
//! the client side, and two hours on the server side.
//!
//! Needs root and `iptables` (`.ci/run` installs it).

use std::process::Command;
use std::time::{Duration, Instant};

use cqrs_analytics::app::Role;
use cqrs_analytics::config::parse_amqp_urls;
use serde_json::json;

use crate::harness::*;

/// How long after the cut the pipeline must have caught up: the 30 s in which the kernel
/// gives up a connection, the retries' backoff, and a margin. The system's defaults take
/// 11 minutes or more.
const RECOVERY: Duration = Duration::from_secs(90);

/// iptables rules that drop the packets of some loopback TCP connections; removed on drop.
/// Their client ports are reserved meanwhile (`ip_local_reserved_ports`): once a client has
/// given a cut connection up, a new connection could otherwise get its port, and be cut
/// too (the test's own connections were).
struct Partition {
    rules: Vec<[String; 4]>,
    ports: Vec<i32>,
}

/// The kernel's list of reserved ports, changed by one partition at a time.
static RESERVED_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
const RESERVED_PORTS_FILE: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `ports` to the reserved ports, or takes them out.
fn reserve(ports: &[i32], reserved: bool) {
    let _one_at_a_time = RESERVED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    // The kernel shows consecutive ports as ranges: "52616-52618,60000".
    let list = std::fs::read_to_string(RESERVED_PORTS_FILE).unwrap();
    let mut set = std::collections::BTreeSet::new();
    for entry in list.trim().split(',').filter(|e| !e.is_empty()) {
        let (low, high) = entry.split_once('-').unwrap_or((entry, entry));
        set.extend(low.parse::<i32>().unwrap()..=high.parse::<i32>().unwrap());
    }
    for port in ports {
        if reserved {
            set.insert(*port);
        } else {
            set.remove(port);
        }
    }
    let list: Vec<String> = set.iter().map(i32::to_string).collect();
    // With a newline: an empty write would leave the list as it was.
    std::fs::write(RESERVED_PORTS_FILE, list.join(",") + "\n")
        .unwrap_or_else(|e| panic!("writing {RESERVED_PORTS_FILE} (root is needed): {e}"));
}

impl Partition {
    /// Cuts the connections between `client_ports` and the server's `server_port`.
    fn cut(client_ports: &[i32], server_port: u16) -> Partition {
        reserve(client_ports, true);
        let mut partition = Partition {
            rules: Vec::new(),
            ports: client_ports.to_vec(),
        };
        for client in client_ports {
            for (from, to) in [(*client, server_port as i32), (server_port as i32, *client)] {
                let rule = [
                    "--sport".to_string(),
                    from.to_string(),
                    "--dport".to_string(),
                    to.to_string(),
                ];
                iptables("-I", &rule);
                partition.rules.push(rule);
            }
        }
        partition
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            iptables("-D", rule);
        }
        reserve(&self.ports, false);
    }
}

fn iptables(action: &str, rule: &[String; 4]) {
    let status = Command::new("iptables")
        .args(["-w", action, "INPUT", "-p", "tcp"])
        .args(rule)
        .args(["-j", "DROP"])
        .status()
        .expect("running iptables (root and the iptables package are needed)");
    assert!(status.success(), "iptables {action} {rule:?}: {status}");
}

/// The client ports of the connections `application_name` has open to the database of `url`.
fn client_ports(env: &TestEnv, url: &str, application_name: &str) -> Vec<i32> {
    let db: postgres::Config = url.parse().unwrap();
    let rows = env
        .write()
        .query(
            "SELECT client_port FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2 AND client_port > 0",
            &[&db.get_dbname().unwrap(), &application_name],
        )
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// The port of the database server in `url`.
fn server_port(url: &str) -> u16 {
    let db: postgres::Config = url.parse().unwrap();
    db.get_ports().first().copied().unwrap_or(5432)
}

/// How many of `ports` still have a server process behind them.
fn backends_left(env: &TestEnv, ports: &[i32]) -> i64 {
    env.write()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1)",
            &[&ports],
        )
        .unwrap()
        .get(0)
}

/// Posts an order, waits for the read model, cuts the connections between `client_ports()`
/// (asked after that first order) and `server_port`, posts ten more orders (the command
/// service's own connections are never cut, so each is accepted), and checks that the read
/// model catches up within `RECOVERY`. Returns the partition (healed on drop), the ports it
/// cut and when.
fn orders_across_a_cut(
    env: &TestEnv,
    app: &App,
    client_ports: impl FnOnce() -> Vec<i32>,
    server_port: u16,
) -> (Partition, Vec<i32>, Instant) {
    let product = create_product(app.command(), "Cable", "Parts", 4.25, 1000);
    let order = |customer: i64| {
        let body =
            json!({"customerId": customer, "items": [{"productId": product, "quantity": 1}]});
        let r = post_json(app.command(), "/api/orders", &body);
        assert_eq!(r.status, 201, "{}", r.body);
    };
    order(1);
    assert_converges(env, Duration::from_secs(10));
    let ports = client_ports();
    assert!(!ports.is_empty(), "no connection to cut");
    let partition = Partition::cut(&ports, server_port);
    let cut = Instant::now();
    for customer in 2..12 {
        order(customer);
    }
    assert_converges(env, RECOVERY);
    (partition, ports, cut)
}

/// Cuts the connections of `application_name` to the database of `url` under orders, and
/// checks that the read model catches up within `RECOVERY`, and that the server has let go
/// of the cut connections' processes by then.
fn cut_from_the_database(env: &TestEnv, url: &str, application_name: &str) {
    let app = env.start(Role::All);
    let (partition, ports, cut) = orders_across_a_cut(
        env,
        &app,
        || client_ports(env, url, application_name),
        server_port(url),
    );
    let caught_up = cut.elapsed();
    wait_until(
        "the server to end the cut connections' processes",
        RECOVERY.saturating_sub(cut.elapsed()),
        || (backends_left(env, &ports) == 0).then_some(()),
    );
    eprintln!(
        "partition: {} connections of {application_name} cut; caught up after {caught_up:?}, server processes gone after {:?}",
        ports.len(),
        cut.elapsed()
    );
    drop(partition);
}

/// The consumer's read-database connections are cut in the middle of the pipeline's work.
#[test]
fn a_consumer_cut_off_from_its_database_goes_on_over_new_connections() {
    let env = TestEnv::new();
    cut_from_the_database(&env, &env.read_url(), "consumer-service");
}

/// The query cache's listener cut off from the read database: it hears neither the changes
/// nor that its connection is dead. Trusted no longer than 10 s after its last sign of life
/// (`read::cache`), it then lets every request read the database. Without that, the kept
/// answer stayed until the kernel gave the connection up (30 s).
#[test]
fn a_query_cache_whose_listener_is_cut_off_answers_from_the_database_within_seconds() {
    use crate::cache::{answered_product, set_sold, sold};
    let env = TestEnv::new();
    let app = env.start(Role::All);
    let q = app.query();
    let product = answered_product(&app, "Heard");
    assert_eq!(sold(q, product), 0);
    let url = env.read_url();
    let ports = client_ports(&env, &url, "query-service-cache");
    assert_eq!(ports.len(), 1, "the listener's connection");
    let partition = Partition::cut(&ports, server_port(&url));
    let cut = Instant::now();
    set_sold(&env, product, 8);
    assert_eq!(sold(q, product), 0, "the answer is kept at first");
    wait_until(
        "the answer from the database",
        Duration::from_secs(25),
        || (sold(q, product) == 8).then_some(()),
    );
    let took = cut.elapsed();
    eprintln!("partition: the cache stepped aside {took:?} after the cut");
    // At most 1 s of quiet, a round trip never answered, and 10 s of trust.
    assert!(took < Duration::from_secs(13), "{took:?}");
    assert_ne!(get(q, "/health").json()["responseCache"], "on");
    drop(partition);
    app.stop();
}

/// The outbox publishers' write-database connections are cut: orders are still accepted,
/// and published once the publishers have new connections.
#[test]
fn a_publisher_cut_off_from_its_database_goes_on_over_new_connections() {
    let env = TestEnv::new();
    cut_from_the_database(&env, &env.write_url(), "outbox-publisher");
}

/// The client ports of the established loopback TCP connections to `port`.
fn connections_to(port: u16) -> Vec<i32> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |address: &str| i32::from_str_radix(address.rsplit(':').next()?, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            (*state == "01" && port_of(remote)? == i32::from(port)).then(|| port_of(local))?
        })
        .collect()
}

/// Every AMQP connection of the services (the publishers', the consumer's, the query
/// service's queue probe) is cut, through a proxy in front of the broker so that the test
/// can tell them from other tests' connections: no heartbeat, ack or confirm gets through
/// either way. Each side must find out from the missing heartbeats; the services reconnect,
/// what was unconfirmed is published again and what was unacked delivered again, and the
/// read model ends exact.
#[test]
fn services_cut_off_from_the_broker_go_on_over_new_connections() {
    let env = TestEnv::new();
    let proxy = TcpProxy::start(broker_host_port());
    let targets = parse_amqp_urls(&broker_url_via(proxy.port)).unwrap();
    let app = env.start_with(Role::All, |c| c.broker_targets = targets);
    let (partition, ports, cut) =
        orders_across_a_cut(&env, &app, || connections_to(proxy.port), proxy.port);
    eprintln!(
        "partition: {} broker connections cut; caught up after {:?}",
        ports.len(),
        cut.elapsed()
    );
    drop(partition);
}
