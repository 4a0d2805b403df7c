use clap::Parser;

mod alloc;
mod cli;
mod conflicts;
mod leader;
mod metrics;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
