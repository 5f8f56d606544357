//! The ceilings: what PostgreSQL alone does for the system's transactions, measured with
//! `pgbench` (from PATH) running the scripts in `benches/ceiling/` against databases made
//! for the purpose, in the same run as the pipeline so figures can be stated as ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::{json, Value};

use crate::harness::{pg_base, TestEnv};
use crate::sample::{cpu_delta, cpu_snapshot};
use crate::{log, round};

/// Figures by name (`order_tx_tps`, `select_pk_tps`, ...); empty when skipped.
#[derive(Default, Clone)]
pub struct Ceilings {
    pub tps: BTreeMap<String, f64>,
    /// CPU per transaction while each script ran, by figure: (PostgreSQL, pgbench), in µs.
    /// What the statement costs the server with nothing else around it: the floor of an
    /// order's cost on the database side, whoever sends it.
    pub cpu_us: BTreeMap<String, (f64, f64)>,
    pub note: String,
}

impl Ceilings {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.tps.get(key).copied().filter(|v| *v > 0.0)
    }

    /// PostgreSQL's CPU per transaction of figure `key`, in µs.
    pub fn pg_us(&self, key: &str) -> Option<f64> {
        self.cpu_us.get(key).map(|c| c.0).filter(|v| *v > 0.0)
    }

    pub fn json(&self) -> Value {
        let mut v = json!(self
            .tps
            .iter()
            .map(|(k, x)| (k.clone(), json!(round(*x, 0))))
            .collect::<serde_json::Map<_, _>>());
        v["cpu_us_per_tx"] = json!(self
            .cpu_us
            .iter()
            .map(|(k, (pg, client))| {
                (
                    k.clone(),
                    json!({"postgres": round(*pg, 1), "pgbench": round(*client, 1)}),
                )
            })
            .collect::<serde_json::Map<_, _>>());
        v["note"] = json!(self.note);
        v
    }
}

/// Which database a script runs against.
#[derive(Clone, Copy, PartialEq)]
enum Db {
    /// `write_schema.sql`: the bare tables of the write side.
    LimitsWrite,
    /// `read_schema.sql`: the bare views of the read side.
    LimitsRead,
    /// `pgbench -i -s 10`.
    Pgbench,
    /// Our own write migrations (a harness template clone) with 1,000 products.
    Ours,
}

struct Script {
    file: &'static str,
    key: &'static str,
    clients: u32,
    db: Db,
    /// Events per transaction (the figure is transactions/s times this).
    per_tx: f64,
    /// Extra pgbench arguments.
    args: &'static [&'static str],
}

const SCRIPTS: &[Script] = &[
    Script {
        file: "order_tx.sql",
        key: "order_tx_tps",
        clients: 16,
        db: Db::LimitsWrite,
        per_tx: 1.0,
        args: &[],
    },
    Script {
        file: "order_one_rt.sql",
        key: "order_one_rt_tps",
        clients: 16,
        db: Db::Ours,
        per_tx: 1.0,
        args: &[],
    },
    Script {
        file: "projection_per_event.sql",
        key: "projection_event_tps",
        clients: 4,
        db: Db::LimitsRead,
        per_tx: 1.0,
        args: &[],
    },
    Script {
        file: "projection_batch100.sql",
        key: "projection_batch_eps",
        clients: 2,
        db: Db::LimitsRead,
        per_tx: 100.0,
        args: &[],
    },
    Script {
        file: "select_pk.sql",
        key: "select_pk_tps",
        clients: 16,
        db: Db::Pgbench,
        per_tx: 1.0,
        args: &["-s", "10"],
    },
];

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ceiling")
}

/// Runs every script present for `seconds` each. Never fails the bench: a missing pgbench
/// or a failed script leaves that figure out, with a note.
pub fn run(seconds: u64) -> Ceilings {
    let mut c = Ceilings::default();
    if seconds == 0 {
        c.note = "skipped (BENCH_CEILING_SECONDS=0)".into();
        return c;
    }
    if Command::new("pgbench").arg("--version").output().is_err() {
        c.note = "skipped: pgbench is not on PATH".into();
        return c;
    }
    let tag = std::process::id();
    let limits_w = format!("bench_ceiling_{tag}_w");
    let limits_r = format!("bench_ceiling_{tag}_r");
    let select = format!("bench_ceiling_{tag}_s");
    let ours = TestEnv::new();
    let setup = setup_databases(&limits_w, &limits_r, &select, &ours);
    if let Err(e) = setup {
        c.note = format!("skipped: setting up the ceiling databases failed: {e}");
    } else {
        for s in SCRIPTS.iter().filter(|s| dir().join(s.file).exists()) {
            let db = match s.db {
                Db::LimitsWrite => limits_w.clone(),
                Db::LimitsRead => limits_r.clone(),
                Db::Pgbench => select.clone(),
                Db::Ours => ours.write_db.clone(),
            };
            match pgbench(s, &db, seconds) {
                Ok((tps, cores)) => {
                    log(format!("ceiling: {} {:.0}", s.key, tps * s.per_tx));
                    c.tps.insert(s.key.to_string(), tps * s.per_tx);
                    if !cores.is_null() {
                        let us = |group: &str| cores[group].as_f64().unwrap_or(0.0) * 1e6 / tps;
                        c.cpu_us
                            .insert(s.key.to_string(), (us("postgres"), us("pgbench")));
                    }
                }
                Err(e) => c.note.push_str(&format!("{}: {e}; ", s.file)),
            }
        }
        c.note.push_str(&format!("pgbench, {seconds} s per figure"));
    }
    drop_databases(&[&limits_w, &limits_r, &select]);
    c
}

fn admin() -> Client {
    Client::connect(&format!("{}/postgres", pg_base()), NoTls).expect("connecting as a superuser")
}

fn setup_databases(w: &str, r: &str, s: &str, ours: &TestEnv) -> Result<(), String> {
    let mut admin = admin();
    for db in [w, r, s] {
        // Two statements: CREATE DATABASE cannot run in a multi-statement batch.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .map_err(pg_err)?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .map_err(pg_err)?;
    }
    let schema = |db: &str, file: &str| -> Result<(), String> {
        let sql = std::fs::read_to_string(dir().join(file)).map_err(|e| format!("{file}: {e}"))?;
        let mut c = Client::connect(&format!("{}/{db}", pg_base()), NoTls).map_err(pg_err)?;
        c.batch_execute(&sql)
            .map_err(|e| format!("{file}: {}", pg_err(e)))
    };
    schema(w, "write_schema.sql")?;
    schema(r, "read_schema.sql")?;
    ours.write()
        .batch_execute(
            "INSERT INTO products (name, category, price, stock)
             SELECT 'p'||g, 'c'||(g%10), 9.99, 1000000000 FROM generate_series(1,1000) g",
        )
        .map_err(pg_err)?;
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", "10"])
        .arg(format!("{}/{s}", pg_base()))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "pgbench -i: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Transactions per second of one script, and the CPU per process group (cores) over its
/// middle: PostgreSQL's server processes for pgbench's connections end with it, so they
/// are read while they run, from the first second to the last (null for runs under 3 s).
fn pgbench(s: &Script, db: &str, seconds: u64) -> Result<(f64, Value), String> {
    let child = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &s.clients.to_string(), "-T", &seconds.to_string()])
        .args(s.args)
        .arg("-f")
        .arg(dir().join(s.file))
        .arg(format!("{}/{db}", pg_base()))
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut cores = Value::Null;
    if seconds >= 3 {
        std::thread::sleep(Duration::from_secs(1));
        let c0 = cpu_snapshot(&[]);
        std::thread::sleep(Duration::from_secs(seconds - 2));
        cores = cpu_delta(&c0, &cpu_snapshot(&[]));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tps = stdout.lines().find_map(|l| {
        l.strip_prefix("tps = ")?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    });
    match tps {
        Some(t) if out.status.success() => Ok((t, cores)),
        _ => Err(format!(
            "pgbench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn drop_databases(dbs: &[&str]) {
    let mut admin = admin();
    for db in dbs {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    }
}

impl crate::report::Figures for Ceilings {
    fn rows(&self, _: &Ceilings) -> Vec<crate::report::Row> {
        let mut rows: Vec<_> = self
            .tps
            .iter()
            .map(|(k, v)| {
                let row = crate::report::Row::info(k.clone(), *v, "/s");
                match self.cpu_us.get(k) {
                    Some((pg, client)) => row.detail(format!(
                        "a transaction: PostgreSQL {pg:.0} µs, pgbench {client:.0} µs of CPU"
                    )),
                    None => row,
                }
            })
            .collect();
        if rows.is_empty() {
            rows.push(
                crate::report::Row::info("ceilings", f64::NAN, "-").detail(self.note.clone()),
            );
        }
        rows
    }

    fn json(&self) -> Value {
        Ceilings::json(self)
    }
}

/// A PostgreSQL error with the server's message (the crate's Display hides it).
fn pg_err(e: postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}
