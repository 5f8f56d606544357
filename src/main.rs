//! `cqrs-analytics <subcommand>`: parses the command line and the environment, then hands
//! over to the library. Exit codes: 0 clean stop, 1 runtime failure, 2 bad usage or config.

use std::process::ExitCode;
use std::time::Duration;

use cqrs_analytics::app::{self, Role};
use cqrs_analytics::error::Kind;
use cqrs_analytics::shutdown::SignalThread;
use cqrs_analytics::Config;

const USAGE: &str = "usage: cqrs-analytics <command-service|consumer-service|query-service|all|migrate|healthcheck PORT|dead-letters list|dead-letters replay --all|dead-letters replay EVENT_ID...|rebuild-read-model>";

fn main() -> ExitCode {
    // Timestamps from chrono, which we have anyway: env_logger's own need its `humantime`
    // feature, which pulls in the jiff crate.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            use std::io::Write;
            let now = cqrs_analytics::event::format_timestamp(&cqrs_analytics::event::now_millis());
            writeln!(
                buf,
                "{now} {:<5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            )
        })
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = match args.first().map(String::as_str) {
        Some("command-service") => Role::Command,
        Some("consumer-service") => Role::Consumer,
        Some("query-service") => Role::Query,
        Some("all") => Role::All,
        Some("migrate") => return run_migrate(),
        Some("healthcheck") => return healthcheck(args.get(1)),
        Some("dead-letters") => {
            return operate(|c| {
                cqrs_analytics::dead_letters::run(c, &args[1..], &mut std::io::stdout())
            })
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&config, role) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == Kind::Config => {
            eprintln!("configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run(config: &Config, role: Role) -> cqrs_analytics::Result<()> {
    if config.migrate_on_start {
        for report in app::migrate(config, role, Duration::from_secs(60))? {
            log::info!("migrate: {report}");
        }
    }
    let mut running = app::start(config, role)?;
    let signals = SignalThread::start(running.take_trigger().expect("a fresh trigger"))?;
    running.shutdown().wait();
    running.stop();
    signals.join();
    Ok(())
}

fn run_migrate() -> ExitCode {
    match Config::from_env().and_then(|c| app::migrate(&c, Role::All, Duration::from_secs(60))) {
        Ok(reports) => {
            // One line per database on stdout: what a deployment log should show.
            for report in reports {
                println!("migrate: {report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == Kind::Config => {
            eprintln!("configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("migration failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs an operator's command: exit 0 when it returns Ok(true), 1 when Ok(false) (it said
/// why) or on a failure, 2 on bad usage or configuration.
fn operate(command: impl FnOnce(&Config) -> cqrs_analytics::Result<bool>) -> ExitCode {
    match Config::from_env().and_then(|c| command(&c)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) if e.kind() == Kind::Config => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Exits 0 when `http://127.0.0.1:PORT/health` answers 200: the container health check,
/// since the runtime image has no curl.
fn healthcheck(port: Option<&String>) -> ExitCode {
    let Some(port) = port.and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match cqrs_analytics::http::get_status(("127.0.0.1", port), "/health", Duration::from_secs(3)) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("health returned {status}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("health check failed: {e}");
            ExitCode::from(1)
        }
    }
}
