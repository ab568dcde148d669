use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = branchpoint::cli::Cli::parse();
    match branchpoint::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
