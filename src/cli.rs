//! The command line: the server's flags ([`Config`]) as they always were, or a subcommand.
//! `beach-road --port 8080 ...` (no subcommand) runs the server; `beach-road check ...` runs
//! the probe ([`crate::check`]). Flags of the server before a subcommand are refused.

use clap::{Parser, Subcommand};

use crate::check::CheckArgs;
use crate::config::Config;

/// beach-road: session and signaling server for beach.
#[derive(Parser, Debug, Clone)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// End-to-end probe of a running deployment, for alerting.
    ///
    /// Registers a session, joins a host and a joiner, relays a signal each way and an
    /// offer/answer through the mailbox, then leaves. Exit status 0 and one `ok` line, or
    /// non-zero and one line naming the failed step and why.
    Check(CheckArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_is_the_server() {
        let cli =
            Cli::try_parse_from(["beach-road", "--port", "9000", "--bind", "127.0.0.1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.port, 9000);
        let flat = Config::try_parse_from(["beach-road", "--port", "9000"]).unwrap();
        assert_eq!(
            format!(
                "{:?}",
                Cli::parse_from(["beach-road", "--port", "9000"]).config
            ),
            format!("{flat:?}")
        );
    }

    #[test]
    fn check_subcommand() {
        let cli =
            Cli::try_parse_from(["beach-road", "check", "--url", "https://a.example"]).unwrap();
        let Some(Command::Check(args)) = cli.command else {
            panic!("no check")
        };
        assert_eq!(args.url, "https://a.example");
        assert!(!args.json);
        assert_eq!(args.timeout, std::time::Duration::from_secs(10));
        // Server flags do not mix with the subcommand; the URL's scheme is checked.
        assert!(
            Cli::try_parse_from(["beach-road", "--port", "1", "check", "--url", "http://a"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["beach-road", "check", "--url", "ftp://a"]).is_err());
        assert!(Cli::try_parse_from(["beach-road", "check"]).is_err());
    }
}
