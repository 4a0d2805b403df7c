use clap::Parser;

mod alloc;
mod cli;
mod leader;
mod metrics;
mod reservations;
mod verdicts;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: this sets environment variables.
    if let Err(e) = weir_common::settings::load_from_env_dir() {
        eprintln!("weir-controller: {e}");
        return std::process::ExitCode::FAILURE;
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime").block_on(run())
}

async fn run() -> std::process::ExitCode {
    let args = cli::Args::parse();
    weir_common::init_logging(args.log_format == cli::LogFormat::Json);
    match leader::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
