use std::process::ExitCode;

use branchpoint::ParseFailure;

fn main() -> ExitCode {
    // Before any other thread exists, so that every thread this process
    // starts (libtorch's intra-op threads included) inherits it.
    branchpoint_models::subnormal::flush_subnormals();
    let cli = match branchpoint::parse_with_config(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ParseFailure::Clap(e)) => e.exit(),
        Err(ParseFailure::Config(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match branchpoint::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
