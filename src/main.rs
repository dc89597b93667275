use clap::Parser;

use beach_road::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => beach_road::check::main(args),
        None => beach_road::server::main(cli.config),
    }
}
