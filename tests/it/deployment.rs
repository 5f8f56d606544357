//! What a deployment relies on: `.env.example` lists every variable the binary reads,
//! `submission.json` says what the contract says, and a malformed variable exits 2.

use std::collections::BTreeSet;
use std::process::Command;

use cqrs_analytics::config::VARIABLES;

fn env_example_keys() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    text.lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .filter(|k| !k.starts_with('#') && !k.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn env_example_lists_every_variable_the_binary_reads() {
    let keys = env_example_keys();
    let missing: Vec<&str> = VARIABLES
        .iter()
        .map(|v| v.name)
        .filter(|k| !keys.contains(*k))
        .collect();
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    assert!(keys.contains("RUST_LOG"));
    // And the code reads no variable outside the table: every env lookup goes through
    // Config::from_env, so a grep for other lookups must find none.
    for path in rust_sources(concat!(env!("CARGO_MANIFEST_DIR"), "/src").as_ref()) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.contains("env::var(") {
                assert!(
                    line.contains("std::env::var(k)"),
                    "{}:{}: reads an environment variable outside config::VARIABLES: {line}",
                    path.display(),
                    i + 1
                );
            }
        }
    }
}

/// docker compose passes every tuning variable on to the services, with the binary's own
/// default: it set none of the retention windows, `CONSUMER_STALL_SECS` or
/// `BROKER_DOWN_GRACE_SECS`, so a value in .env was silently ignored under compose.
#[test]
fn compose_passes_every_tuning_variable_with_the_binarys_default() {
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    // Set by the compose file itself (hosts, roles, ports, migrations by the migrate job).
    let fixed = [
        "DATABASE_URL",
        "READ_DATABASE_URL",
        "BROKER_URL",
        "HTTP_BIND_ADDR",
        "COMMAND_SERVICE_PORT",
        "QUERY_SERVICE_PORT",
        "CONSUMER_SERVICE_PORT",
        "MIGRATE_ON_START",
    ];
    let wrong: Vec<String> = VARIABLES
        .iter()
        .filter(|v| !fixed.contains(&v.name))
        .filter(|v| {
            let line = format!("{}: ${{{}:-{}}}", v.name, v.name, v.default);
            !compose.lines().any(|l| l.trim() == line)
        })
        .map(|v| format!("{}: ${{{}:-{}}}", v.name, v.name, v.default))
        .collect();
    assert!(wrong.is_empty(), "docker-compose.yml lacks {wrong:#?}");
}

/// Every `.rs` file under `dir`, in subdirectories too (src/ also holds the dashboard's
/// assets).
fn rust_sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

#[test]
fn submission_json_names_both_services() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/submission.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"commandServiceUrl": "http://localhost:8080", "queryServiceUrl": "http://localhost:8081"})
    );
}

/// A service whose stop could outlast the supervisor's grace period refuses to start, on one
/// line naming both variables; a one-shot command, which has no drain, is not held to it
/// (here `migrate` gets as far as the database, which refuses its role: exit 1).
#[test]
fn a_service_whose_stop_would_outlast_the_grace_period_refuses_to_start() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
            .args(args)
            .env("SHUTDOWN_DRAIN_TIMEOUT_MS", "60000")
            .env("DATABASE_URL", "postgresql://no_such_role@127.0.0.1:5432/w")
            .env(
                "READ_DATABASE_URL",
                "postgresql://no_such_role@127.0.0.1:5432/r",
            )
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["query-service"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("SHUTDOWN_DRAIN_TIMEOUT_MS (60000 ms)")
            && stderr.contains("STOP_GRACE_PERIOD_SECS (30 s)"),
        "{stderr}"
    );
    let (code, stderr) = run(&["migrate"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains("STOP_GRACE_PERIOD_SECS"), "{stderr}");
}

#[test]
fn malformed_variable_exits_2_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .arg("query-service")
        .env("QUERY_HTTP_WORKERS", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("QUERY_HTTP_WORKERS"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .arg("bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn healthcheck_subcommand_reports_the_health_of_a_port() {
    // The container health check: the runtime image has no curl.
    let env = crate::harness::TestEnv::new();
    let app = env.start(cqrs_analytics::app::Role::Query);
    let port = app.query().port().to_string();
    let ok = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", &port])
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let down = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", &closed])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    let usage = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .args(["healthcheck", "x"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

/// A `dead-letters` command of the wrong shape is bad usage like any other: exit 2 and the
/// usage line, before any variable is read. It was reported as a "configuration error".
#[test]
fn a_dead_letters_command_of_the_wrong_shape_prints_the_usage() {
    for args in [
        &["dead-letters", "replay"][..],
        &["dead-letters", "purge"],
        &["dead-letters", "replay", "x", "--all"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
            .args(args)
            .env("CONSUMER_THREADS", "not read")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("usage: cqrs-analytics ")
                && stderr.contains("dead-letters replay --all"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn static_checks_accept_every_compose_v2_version_line() {
    // What `docker compose version` prints, release by release; only v1 is refused.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/static-checks.sh");
    let answer = |line: &str| {
        Command::new("bash")
            .args([script, "--is-compose-v2", line])
            .status()
            .unwrap()
            .success()
    };
    for v2 in [
        "Docker Compose version v2.40.3",
        "Docker Compose version 2.26.1-4", // Debian trixie's plugin: no "v"
        "Docker Compose version v2.0.0-rc.3",
        "Docker Compose version v5.0.0", // after v2 came v5
        "docker-compose version 2.2.3",  // the standalone binary of early v2
        "2.26.1",                        // --short
        "v2.40.3",
    ] {
        assert!(answer(v2), "{v2:?} is a Compose v2 but was refused");
    }
    for not_v2 in [
        "docker-compose version 1.29.2, build unknown",
        "docker-compose version 1.25.0, build 0a186604",
        "1.29.2",
        "",
        "docker: 'compose' is not a docker command.",
    ] {
        assert!(
            !answer(not_v2),
            "{not_v2:?} is not a Compose v2 but was accepted"
        );
    }
}

/// `migrate: DB at HOST:PORT: ...` lines, as (database, rest).
fn migrate_lines(stdout: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let l = l
                .strip_prefix("migrate: ")
                .unwrap_or_else(|| panic!("{l:?}"));
            let (db, rest) = l.split_once(" at ").unwrap_or_else(|| panic!("{l:?}"));
            let (_, rest) = rest.split_once(": ").unwrap_or_else(|| panic!("{l:?}"));
            (db.to_string(), rest.to_string())
        })
        .collect()
}

fn latest(migrations: &[cqrs_analytics::db::Migration]) -> i32 {
    migrations.iter().map(|m| m.version).max().unwrap()
}

#[test]
fn migrate_prints_one_line_per_database_with_the_versions_applied() {
    use cqrs_analytics::db::{READ_MIGRATIONS, WRITE_MIGRATIONS};
    let env = crate::harness::TestEnv::new();
    // The write database is migrated (a template clone); the read database starts empty.
    let mut admin = postgres::Client::connect(
        &format!("{}/postgres", crate::harness::pg_base()),
        postgres::NoTls,
    )
    .unwrap();
    for sql in ["DROP DATABASE {} WITH (FORCE)", "CREATE DATABASE {}"] {
        admin
            .batch_execute(&sql.replace("{}", &env.read_db))
            .unwrap();
    }
    let all_read: Vec<String> = READ_MIGRATIONS
        .iter()
        .map(|m| m.version.to_string())
        .collect();
    let first = env.binary("migrate").output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        migrate_lines(&first.stdout),
        vec![
            (
                env.write_db.clone(),
                format!("up to date (schema version {})", latest(WRITE_MIGRATIONS))
            ),
            (
                env.read_db.clone(),
                format!(
                    "applied {} (schema version {})",
                    all_read.join(", "),
                    latest(READ_MIGRATIONS)
                )
            ),
        ],
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    let again = env.binary("migrate").output().unwrap();
    assert!(again.status.success());
    let lines = migrate_lines(&again.stdout);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines.iter().all(|(_, rest)| rest.starts_with("up to date")),
        "{lines:?}"
    );
}

/// Whether `role` may open a session on `db` of the scratch server; any refusal other than
/// "no CONNECT privilege" or "no such role" fails the test.
fn can_connect(pg: &crate::harness::ScratchPostgres, role: &str, db: &str) -> bool {
    use postgres::error::SqlState;
    match postgres::Client::connect(&pg.url(role, db), postgres::NoTls) {
        Ok(_) => true,
        Err(e)
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                || e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION) =>
        {
            false
        }
        Err(e) => panic!("{role}@{db}: {e} {:?}", e.as_db_error()),
    }
}

/// A fresh server with `db`, set up the way the postgres image does it: the role script run
/// by the owner, then `cqrs-analytics migrate` as the owner.
fn scratch_database(script: &str, db: &str) -> crate::harness::ScratchPostgres {
    let pg = crate::harness::ScratchPostgres::start();
    let mut owner =
        postgres::Client::connect(&pg.url("postgres", "postgres"), postgres::NoTls).unwrap();
    owner
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let out = Command::new("bash")
        .arg(format!(
            "{}/deploy/postgres/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pg
}

#[test]
fn role_scripts_keep_app_roles_out_of_the_maintenance_databases() {
    let write = scratch_database("write-db-roles.sh", "write_db");
    let read = scratch_database("read-db-roles.sh", "read_db");
    let migrate = Command::new(env!("CARGO_BIN_EXE_cqrs-analytics"))
        .arg("migrate")
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", write.url("postgres", "write_db"))
        .env("READ_DATABASE_URL", read.url("postgres", "read_db"))
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let cases = [
        (&write, "command_app", "write_db", true),
        (&write, "query_app", "write_db", true),
        (&write, "command_app", "postgres", false),
        (&write, "command_app", "template1", false),
        (&write, "query_app", "postgres", false),
        (&write, "consumer_app", "write_db", false),
        (&write, "postgres", "postgres", true), // the owner keeps its maintenance database
        (&read, "consumer_app", "read_db", true),
        (&read, "query_app", "read_db", true),
        (&read, "consumer_app", "postgres", false),
        (&read, "consumer_app", "template1", false),
        (&read, "query_app", "postgres", false),
        (&read, "command_app", "read_db", false),
    ];
    for (pg, role, db, allowed) in cases {
        assert_eq!(
            can_connect(pg, role, db),
            allowed,
            "{role} connecting to {db}: want allowed={allowed}"
        );
    }
    // The migrations' grants still hold with the revokes: each role reaches what it needs.
    let mut command =
        postgres::Client::connect(&write.url("command_app", "write_db"), postgres::NoTls).unwrap();
    command
        .query_one("SELECT count(*) FROM products", &[])
        .unwrap();
    // place_order runs with the caller's rights: command_app's grants must cover all it
    // writes (sequence, order, items, stock, outbox); no other role may call it.
    let mut owner =
        postgres::Client::connect(&write.url("postgres", "write_db"), postgres::NoTls).unwrap();
    owner
        .batch_execute(
            "INSERT INTO products (name, category, price, stock) VALUES ('p', 'c', 1, 5)",
        )
        .unwrap();
    let place = "SELECT r_outcome FROM place_order(ARRAY[1]::bigint[], ARRAY[2], \
                 ARRAY[NULL]::bigint[], 7, gen_random_uuid(), '2026-02-11T16:35:00.000Z', 'key', 'request')";
    let outcome: String = command.query_one(place, &[]).unwrap().get(0);
    assert_eq!(outcome, "ok");
    // The outbox's rows go only through the pruner's function (write migration 009), which
    // deletes published rows alone: command_app held DELETE on the outbox.
    let before: i64 = owner
        .query_one("SELECT count(*) FROM outbox", &[])
        .unwrap()
        .get(0);
    assert!(command.batch_execute("DELETE FROM outbox").is_err());
    owner
        .batch_execute(
            "UPDATE outbox SET created_at = now() - interval '2 hours';
             INSERT INTO outbox (topic, payload, created_at, published_at)
             VALUES ('order-events', '{}', now() - interval '2 hours', now())",
        )
        .unwrap();
    let prune = "SELECT removed FROM prune_outbox(0, 3600, 9223372036854775807, 100)";
    let removed: i64 = command.query_one(prune, &[]).unwrap().get(0);
    let after: i64 = owner
        .query_one("SELECT count(*) FROM outbox", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        (before, removed, after),
        (1, 1, 1),
        "the unpublished row stays"
    );
    let mut query =
        postgres::Client::connect(&write.url("query_app", "write_db"), postgres::NoTls).unwrap();
    query.query_one("SELECT count(*) FROM outbox", &[]).unwrap();
    assert!(query.query_one(prune, &[]).is_err());
    assert!(query.query_one(place, &[]).is_err());
    assert!(query
        .query_one("SELECT count(*) FROM products", &[])
        .is_err());
    let mut consumer =
        postgres::Client::connect(&read.url("consumer_app", "read_db"), postgres::NoTls).unwrap();
    consumer
        .query_one("SELECT count(*) FROM processed_events", &[])
        .unwrap();
    // processed_events likewise (read migration 013), keeping at least the last minute.
    assert!(consumer
        .batch_execute("DELETE FROM processed_events")
        .is_err());
    let mut read_owner =
        postgres::Client::connect(&read.url("postgres", "read_db"), postgres::NoTls).unwrap();
    read_owner
        .batch_execute(
            "INSERT INTO processed_events (event_id, event_type, event_timestamp, processed_at)
             VALUES (gen_random_uuid(), 'OrderCreated', now(), now() - interval '2 minutes'),
                    (gen_random_uuid(), 'OrderCreated', now(), now() - interval '30 seconds')",
        )
        .unwrap();
    let prune = "SELECT removed FROM prune_processed_events('-infinity', 0, 100)";
    let removed: i64 = consumer.query_one(prune, &[]).unwrap().get(0);
    assert_eq!(removed, 1, "the last minute stays");
    let mut query_read =
        postgres::Client::connect(&read.url("query_app", "read_db"), postgres::NoTls).unwrap();
    assert!(query_read.query_one(prune, &[]).is_err());
    // The flush barrier the consumer runs before every ack (read migration 010).
    consumer
        .batch_execute(cqrs_analytics::read::projection::FLUSH_BARRIER)
        .unwrap();
    assert!(consumer.batch_execute("CREATE TABLE x (i int)").is_err());
    // A batch in one statement (read migration 011's check), then the long way.
    let event = cqrs_analytics::event::Event::parse(
        br#"{"eventId":"0192f1c4-0000-7000-8000-000000000001","eventType":"ProductCreated",
             "timestamp":"2026-11-26T12:00:00.000Z","productId":1,"name":"n","category":"c",
             "price":1.50,"stock":5}"#,
    )
    .unwrap();
    let mut consumer = cqrs_analytics::db::Conn::new(consumer);
    for applied in [1, 0] {
        let counts = cqrs_analytics::read::projection::apply_batch(
            &mut consumer,
            std::slice::from_ref(&event),
        )
        .unwrap();
        assert_eq!(counts.applied, applied);
    }
}

#[test]
fn compose_file_keeps_infrastructure_on_loopback_and_builds_one_image() {
    // `.ci/static-checks.sh` checks the same on the resolved configuration with Compose
    // itself; this reads the file as written, so it runs where Compose is not installed.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for container_port in [":5432\"", ":5672\"", ":15672\""] {
        let published: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("- \"") && l.ends_with(container_port))
            .collect();
        assert!(!published.is_empty(), "no port mapping to {container_port}");
        for l in published {
            assert!(
                l.starts_with("- \"${INFRA_BIND_ADDR:-127.0.0.1}:"),
                "published beyond loopback by default: {l}"
            );
        }
    }
    for (var, port) in [("COMMAND_HOST_PORT", 8080), ("QUERY_HOST_PORT", 8081)] {
        let mapping = format!("- \"${{{var}:-{port}}}:{port}\"");
        assert!(lines.contains(&mapping.as_str()), "missing {mapping}");
        assert!(env_example_keys().contains(var), ".env.example lacks {var}");
    }
    assert!(env_example_keys().contains("INFRA_BIND_ADDR"));
    // The four app services merge the one anchor that names the image and builds it.
    let count = |needle: &str| lines.iter().filter(|l| l.starts_with(needle)).count();
    assert_eq!(count("build:"), 1, "one build section, in the x-app anchor");
    assert_eq!(
        count("image: ${APP_IMAGE"),
        1,
        "one image name, in the x-app anchor"
    );
    let merges = lines.iter().filter(|l| **l == "<<: *app").count();
    assert_eq!(merges, 4, "four app services merge the anchor");
}

/// One database under two host names (`127.0.0.1` and `127.1`) passes the check that the
/// write and read databases differ, which compares the URLs. `migrate` then applied the
/// read model's migrations to the write database; now the ledger's first migration says
/// which model a database holds, and the other one is refused (exit 2), nothing applied.
#[test]
fn migrate_refuses_a_database_that_holds_the_other_model() {
    let env = crate::harness::TestEnv::new();
    let write = env.write_url();
    assert!(
        write.contains("@127.0.0.1:"),
        "the test needs a 127.0.0.1 URL: {write}"
    );
    let alias = write.replace("@127.0.0.1:", "@127.1:");
    let out = env
        .binary("migrate")
        .env("READ_DATABASE_URL", &alias)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("holds the other model"), "{stderr}");
    let names: Vec<String> = env
        .write()
        .query("SELECT name FROM schema_migrations", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let write_names: Vec<&str> = cqrs_analytics::db::WRITE_MIGRATIONS
        .iter()
        .map(|m| m.name)
        .collect();
    assert!(
        names.iter().all(|n| write_names.contains(&n.as_str())),
        "read migrations recorded in the write database: {names:?}"
    );
}

/// A process whose pools together may open more connections to its database server than
/// the server accepts says so at start, naming the variables; one within the limit says
/// what it may open. Nothing told before: under load requests failed with "too many
/// clients".
#[test]
fn a_process_sized_beyond_its_database_server_says_so() {
    use crate::harness::{wait_until, ChildService, ScratchPostgres, TestEnv};
    use std::time::Duration;
    let pg = ScratchPostgres::start_with("-c max_connections=20");
    let env = TestEnv::new();
    let run = |pools: &[(&str, &str)], name: &str| {
        let mut cmd = env.binary("all");
        cmd.env("DATABASE_URL", pg.url("postgres", "write_db"))
            .env("READ_DATABASE_URL", pg.url("postgres", "read_db"))
            .env("RUST_LOG", "warn,cqrs_analytics::app=info")
            .env("COMMAND_SERVICE_PORT", "0")
            .env("QUERY_SERVICE_PORT", "0")
            .env("CONSUMER_SERVICE_PORT", "0")
            .envs(pools.iter().copied());
        let mut child =
            ChildService::spawn(&mut cmd, "command-service", &format!("{name}-{}", env.id));
        let log = wait_until("the pool check", Duration::from_secs(20), || {
            let log = child.log();
            log.contains("the connection pools of this process may open")
                .then_some(log)
        });
        child.terminate(Duration::from_secs(20));
        log
    };
    // 2 + 3 publishers' + 1 pruner's on the write side, 3 consumer + 1 pruner + 2 query +
    // 1 query cache listener on the read side, 2 of the query service on the write side:
    // 15 of 17.
    let small = run(
        &[("WRITE_POOL_SIZE", "2"), ("READ_POOL_SIZE", "2")],
        "pools-small",
    );
    let server = format!("database server 127.0.0.1:{} (", pg.port);
    assert!(small.contains("may open 15 connections"), "{small}");
    assert!(small.contains(&server), "{small}");
    assert!(small.contains("of the 17 it accepts"), "{small}");
    assert!(!small.contains("too many clients"), "{small}");
    let big = run(&[], "pools-default");
    assert!(
        big.contains("may open 35 connections")
            && big.contains("more than the 17 it accepts")
            && big.contains("Lower WRITE_POOL_SIZE, READ_POOL_SIZE or CONSUMER_THREADS"),
        "{big}"
    );
}
