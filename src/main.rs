//! The `piiguard` binary: parse the command line, then hand over to [`piiguard::cli::run`].

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    piiguard::cli::run(piiguard::cli::Cli::parse())
}
