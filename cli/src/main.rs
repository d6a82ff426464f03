//! The `voltool` binary. Exit codes: 0 success, 1 failure, 2 usage error.

fn main() -> std::process::ExitCode {
    voltool_cli::main_with(std::env::args_os())
}
