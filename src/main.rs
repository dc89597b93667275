use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = beach_road::config::Config::parse();
    beach_road::server::main(config)
}
