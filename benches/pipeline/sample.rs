//! What bounds a figure: CPU per process group from /proc, and PostgreSQL's wait events
//! sampled from `pg_stat_activity` while a phase runs.

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::{json, Value};

use crate::harness::pg_base;
use crate::round;

/// CPU ticks (user + system) per process group, plus the machine's busy/total ticks.
#[derive(Clone)]
pub struct CpuSnap {
    by_group: HashMap<String, u64>,
    machine_busy: u64,
    machine_total: u64,
    at: Instant,
}

/// Groups every process on the machine: ours by the role given in `mine`, PostgreSQL,
/// RabbitMQ, the bench itself, everything else. Two groups are also split into parts,
/// under keys `group: part` beside the group's own (so sums over groups skip keys with
/// ": "): ours by thread name (`cqrs-analytics all: publisher`), PostgreSQL's processes by
/// the `application_name` of their session or their `backend_type`
/// (`postgres: command-service`, `postgres: walwriter`).
pub fn cpu_snapshot(mine: &[(u32, &str)]) -> CpuSnap {
    let mut snap = CpuSnap {
        by_group: HashMap::new(),
        machine_busy: 0,
        machine_total: 0,
        at: Instant::now(),
    };
    let me = std::process::id();
    let pg_roles = pg_roles();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((comm, ticks)) = proc_ticks(pid) else {
            continue;
        };
        let group = if pid == me {
            "bench client".to_string()
        } else if let Some((_, n)) = mine.iter().find(|(p, _)| *p == pid) {
            add_threads(&mut snap.by_group, pid, &format!("cqrs-analytics {n}"));
            format!("cqrs-analytics {n}")
        } else {
            match comm.as_str() {
                "postgres" => {
                    let role = pg_roles.get(&pid).map_or("other", String::as_str);
                    *snap
                        .by_group
                        .entry(format!("postgres: {role}"))
                        .or_insert(0) += ticks;
                    "postgres".into()
                }
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq".into(),
                "pgbench" => "pgbench".into(),
                _ => "other".into(),
            }
        };
        *snap.by_group.entry(group).or_insert(0) += ticks;
    }
    if let Ok(s) = fs::read_to_string("/proc/stat") {
        let v: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        snap.machine_total = v.iter().sum();
        // Everything but idle and iowait.
        snap.machine_busy =
            snap.machine_total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
    }
    snap
}

/// Adds the ticks of each thread of `pid` to `group: thread name`; threads of one pool
/// (`consumer-0`, `consumer-1`) share a part.
fn add_threads(by_group: &mut HashMap<String, u64>, pid: u32, group: &str) {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten() {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let Some((name, ticks)) = ticks_of(&stat) else {
            continue;
        };
        let name = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        *by_group.entry(format!("{group}: {name}")).or_insert(0) += ticks;
    }
}

/// PostgreSQL's processes by pid: the session's `application_name`, else the process'
/// `backend_type`. Empty if the server cannot be asked.
fn pg_roles() -> HashMap<u32, String> {
    let Ok(mut c) = Client::connect(&format!("{}/postgres", pg_base()), NoTls) else {
        return HashMap::new();
    };
    let sql = "SELECT pid, coalesce(nullif(application_name, ''), backend_type, 'other')
               FROM pg_stat_activity WHERE pid <> pg_backend_pid()";
    let rows = c.query(sql, &[]).unwrap_or_default();
    rows.iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, String>(1)))
        .collect()
}

/// (comm, utime + stime) of a process.
fn proc_ticks(pid: u32) -> Option<(String, u64)> {
    ticks_of(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// (comm, utime + stime) of a `stat` line of /proc.
fn ticks_of(stat: &str) -> Option<(String, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((stat[open + 1..close].to_string(), tick(11) + tick(12)))
}

/// CPU used between two snapshots, in cores (1.0 = one core busy the whole time).
pub fn cpu_delta(a: &CpuSnap, b: &CpuSnap) -> Value {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
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
    let total = b.machine_total.saturating_sub(a.machine_total) as f64;
    let busy = b.machine_busy.saturating_sub(a.machine_busy) as f64;
    let share = if total > 0.0 { busy / total } else { 0.0 };
    obj.insert("machine busy (of all cores)".into(), json!(round(share, 2)));
    Value::Object(obj)
}

/// Samples `pg_stat_activity` of one database at a fixed interval until finished: which
/// wait event (or CPU) each active backend is in, and what it runs.
pub struct WaitSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(u64, HashMap<String, u64>)>,
}

/// What a sampler saw.
pub struct Waits {
    /// Average number of active backends.
    pub active: f64,
    /// Share of sampled active backends that waited on a heavyweight lock (`Lock:*`).
    pub lock_share: f64,
    /// The most frequent states, as JSON (average backends per state).
    pub top: Value,
}

impl WaitSampler {
    pub fn start(db: &str, every: Duration) -> WaitSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = Client::connect(&format!("{}/postgres", pg_base()), NoTls)
            .expect("connecting to PostgreSQL for wait sampling");
        let (db, flag) = (db.to_string(), stop.clone());
        let handle = thread::spawn(move || {
            let mut counts: HashMap<String, u64> = HashMap::new();
            let mut samples = 0u64;
            let sql = "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'),
                              left(regexp_replace(query, '\\s+', ' ', 'g'), 70)
                       FROM pg_stat_activity
                       WHERE datname = $1 AND state = 'active' AND pid <> pg_backend_pid()";
            while !flag.load(Ordering::Relaxed) {
                samples += 1;
                for r in c.query(sql, &[&db]).unwrap_or_default() {
                    let (w, q): (String, String) = (r.get(0), r.get(1));
                    *counts.entry(format!("{w} | {}", q.trim())).or_insert(0) += 1;
                }
                thread::sleep(every);
            }
            (samples, counts)
        });
        WaitSampler { stop, handle }
    }

    pub fn finish(self) -> Waits {
        self.stop.store(true, Ordering::Relaxed);
        let (samples, counts) = self.handle.join().unwrap();
        let samples = samples.max(1) as f64;
        let mut v: Vec<(String, u64)> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let all: u64 = v.iter().map(|(_, n)| n).sum();
        let locked: u64 = v
            .iter()
            .filter(|(k, _)| k.starts_with("Lock:"))
            .map(|(_, n)| n)
            .sum();
        let top: Vec<Value> = v
            .into_iter()
            .take(8)
            .map(|(k, n)| json!({"backends": round(n as f64 / samples, 2), "state": k}))
            .collect();
        Waits {
            active: all as f64 / samples,
            lock_share: if all > 0 {
                locked as f64 / all as f64
            } else {
                0.0
            },
            top: Value::Array(top),
        }
    }
}

impl Waits {
    pub fn json(&self) -> Value {
        json!({"avg_active_backends": round(self.active, 2),
               "lock_share": round(self.lock_share, 3), "top": self.top})
    }
}
