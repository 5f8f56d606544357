//! `cqrs-analytics <subcommand>`: argv → `cli::Command` → `cli::run` → exit code: 0 done
//! (or a clean stop), 1 a failure (or a command that said why it did not succeed), 2 bad
//! usage or configuration.

use std::process::ExitCode;

use cqrs_analytics::cli::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = Command::parse(&args) else {
        eprintln!("{}", cli::USAGE);
        return ExitCode::from(2);
    };
    cli::init_logging();
    match cli::run(command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) if e.is_config() => {
            eprintln!("configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
