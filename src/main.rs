//! The `piiguard` binary: parse the command line, then hand over to [`piiguard::cli::run`].

use std::process::ExitCode;

use clap::Parser as _;

/// mimalloc instead of glibc malloc: a call allocates and frees dozens of small buffers (HTTP/2
/// frames, protobuf messages, audit records), where glibc's free lists and consolidation cost
/// several percent of the server's CPU (bench/RESULTS.md). Secrets are zeroized before they are
/// freed (`Zeroizing`, `SecretBox`), whatever the allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    piiguard::cli::run(piiguard::cli::Cli::parse())
}
