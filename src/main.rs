use clap::Parser;

use beach_road::cli::{Cli, Command};

/// jemalloc rather than glibc's malloc: see its entry in Cargo.toml and docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => beach_road::check::main(args),
        None => beach_road::server::main(cli.config),
    }
}
