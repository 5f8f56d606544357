//! The command line: `cqrs-analytics <subcommand>`. `Command::parse` reads the arguments,
//! `run` does what they say. `main` maps the outcome to an exit code: 0 clean stop,
//! 1 runtime failure, 2 bad usage or configuration ([`Error::is_config`]).

use std::time::Duration;

use crate::app::{self, Role};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::shutdown::{self, SignalThread};

pub const USAGE: &str = "usage: cqrs-analytics <command-service|consumer-service|query-service|all|migrate|healthcheck PORT|dead-letters list|dead-letters replay --all|dead-letters replay EVENT_ID...|dead-letters discard EVENT_ID...|rebuild-read-model>";

/// How long a starting service waits for its databases to accept migrations.
const MIGRATE_WAIT: Duration = Duration::from_secs(60);

/// A subcommand and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Runs services until SIGINT or SIGTERM.
    Serve(Role),
    /// Applies both schemas and exits.
    Migrate,
    /// Exits 0 when `http://127.0.0.1:PORT/health` answers 200.
    Healthcheck(u16),
    /// `dead-letters list | replay --all | replay EVENT_ID... | discard EVENT_ID...`.
    DeadLetters(crate::ops::dead_letters::Op),
    /// Recomputes the read model from the write model while everything runs.
    RebuildReadModel,
}

impl Command {
    /// The command `args` (without the program name) ask for; None is bad usage.
    pub fn parse(args: &[String]) -> Option<Command> {
        let arg = |i: usize| args.get(i).map(String::as_str);
        // Only `dead-letters` takes arguments of its own; anything else after a command is
        // a mistake (`all --port 1`), not something to ignore.
        let alone = args.len() == 1;
        match arg(0)? {
            "command-service" if alone => Some(Command::Serve(Role::Command)),
            "consumer-service" if alone => Some(Command::Serve(Role::Consumer)),
            "query-service" if alone => Some(Command::Serve(Role::Query)),
            "all" if alone => Some(Command::Serve(Role::All)),
            "migrate" if alone => Some(Command::Migrate),
            "healthcheck" if args.len() == 2 => {
                let port = arg(1)?;
                match port.parse() {
                    Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {
                        Some(Command::Healthcheck(n))
                    }
                    _ => None,
                }
            }
            "dead-letters" => {
                crate::ops::dead_letters::Op::parse(&args[1..]).map(Command::DeadLetters)
            }
            "rebuild-read-model" if alone => Some(Command::RebuildReadModel),
            _ => None,
        }
    }
}

/// Runs `command` to its end: Ok(true) when it did what it was asked, Ok(false) when it
/// said on stdout why it could not (exit code 1).
pub fn run(command: Command) -> Result<bool> {
    match command {
        Command::Serve(role) => serve(&Config::from_env()?, role).map(|()| true),
        Command::Migrate => migrate(&Config::from_env()?).map(|()| true),
        Command::Healthcheck(port) => healthcheck(port).map(|()| true),
        Command::DeadLetters(op) => {
            crate::ops::dead_letters::run(&Config::from_env()?, op, &mut std::io::stdout())
        }
        Command::RebuildReadModel => rebuild(&Config::from_env()?),
    }
}

/// Serves until SIGINT or SIGTERM, then stops in order. A signal that comes while the
/// databases are still awaited at start-up is a stop too: exit 0, nothing started.
fn serve(config: &Config, role: Role) -> Result<()> {
    config.check_stop_deadline()?;
    let (trigger, stop_requested) = shutdown::channel();
    let signals = SignalThread::start(trigger)?;
    if config.migrate_on_start {
        match app::migrate(config, role, MIGRATE_WAIT, Some(&stop_requested)) {
            Ok(reports) => reports
                .iter()
                .for_each(|report| log::info!("migrate: {report}")),
            Err(e) if e.is_stopped() => {
                log::info!("{e}; stopped before the services started");
                signals.join();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    let running = app::start(config, role)?;
    stop_requested.wait();
    stop_watchdog(config.stop_deadline());
    running.stop();
    signals.join();
    Ok(())
}

/// Ends the process with exit code 1 if the stop has not finished within `limit`: a thread
/// blocked in a call that has no timeout of its own (an AMQP handshake with a node that
/// accepted the connection and says nothing, for up to `BROKER_CONNECT_TIMEOUT_MS`) would
/// otherwise hold the exit for as long. Leaving then is as safe as a crash: unacked
/// deliveries are redelivered, claimed outbox rows published again, each applied once.
fn stop_watchdog(limit: Duration) {
    std::thread::Builder::new()
        .name("stop-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            log::error!(
                "still stopping {} ms after the request (a thread is blocked on the broker or a database); exiting now",
                limit.as_millis()
            );
            std::process::exit(1);
        })
        .map(drop)
        .unwrap_or_else(|e| log::warn!("no stop watchdog: {e}"));
}

/// Progress and the outcome on stderr: stdout stays free for a pipe. SIGINT and SIGTERM stop
/// it before the switch (exit 1, said on stderr), not in the middle of a transaction.
fn rebuild(config: &Config) -> Result<bool> {
    let (trigger, stop_requested) = shutdown::channel();
    let signals = SignalThread::start(trigger)?;
    let done = crate::ops::rebuild::run(config, &mut std::io::stderr(), &stop_requested);
    signals.join();
    done
}

fn migrate(config: &Config) -> Result<()> {
    // One line per database on stdout: what a deployment log should show.
    for report in app::migrate(config, Role::All, MIGRATE_WAIT, None)? {
        println!("migrate: {report}");
    }
    Ok(())
}

/// The container health check, since the runtime image has no curl.
fn healthcheck(port: u16) -> Result<()> {
    let timeout = Duration::from_secs(3);
    match crate::http::get_status(("127.0.0.1", port), "/health", timeout) {
        Ok(200) => Ok(()),
        Ok(status) => Err(Error::unavailable(format!("health returned {status}"))),
        Err(e) => Err(Error::unavailable("health check failed").with_cause(e)),
    }
}

/// Logs to stderr with RFC 3339 timestamps from chrono, which we have anyway: env_logger's
/// own need its `humantime` feature, which pulls in the jiff crate.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            use std::io::Write;
            let now = crate::event::format_timestamp(&crate::event::now_millis());
            writeln!(
                buf,
                "{now} {:<5} {}: {}",
                record.level(),
                record.target(),
                record.args()
            )
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dead_letters::Op;

    #[test]
    fn arguments_parse_into_commands() {
        let parse =
            |args: &[&str]| Command::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(parse(&["all"]), Some(Command::Serve(Role::All)));
        assert_eq!(
            parse(&["healthcheck", "8080"]),
            Some(Command::Healthcheck(8080))
        );
        assert_eq!(parse(&["healthcheck"]), None);
        let dead_letters = |op| Some(Command::DeadLetters(op));
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect();
        assert_eq!(parse(&["dead-letters", "list"]), dead_letters(Op::List));
        assert_eq!(
            parse(&["dead-letters", "replay", "--all"]),
            dead_letters(Op::Replay(None))
        );
        assert_eq!(
            parse(&["dead-letters", "replay", "a", "b", "a"]),
            dead_letters(Op::Replay(Some(ids(&["a", "b"]))))
        );
        assert_eq!(
            parse(&["dead-letters", "discard", "-", "a"]),
            dead_letters(Op::Discard(ids(&["-", "a"])))
        );
        for wrong in [
            &["dead-letters"][..],
            &["dead-letters", "list", "x"],
            &["dead-letters", "replay"],
            &["dead-letters", "replay", "--all", "a"],
            &["dead-letters", "replay", "a", "--all"],
            &["dead-letters", "replay", "-"],
            &["dead-letters", "discard"],
            &["dead-letters", "discard", "--all"],
            &["dead-letters", "purge"],
        ] {
            assert_eq!(parse(wrong), None, "{wrong:?}");
        }
        assert_eq!(
            parse(&["rebuild-read-model"]),
            Some(Command::RebuildReadModel)
        );
        assert_eq!(parse(&["rebuild-read-model", "now"]), None);
        assert_eq!(parse(&["all", "extra"]), None);
        assert_eq!(parse(&["command-service", "--port", "1"]), None);
        assert_eq!(parse(&["migrate", "extra"]), None);
        assert_eq!(parse(&["healthcheck", "8080", "extra"]), None);
        assert_eq!(parse(&["healthcheck", "0"]), None);
        assert_eq!(parse(&["healthcheck", "+8080"]), None);
        assert_eq!(parse(&["bogus"]), None);
        assert_eq!(parse(&[]), None);
    }
}
