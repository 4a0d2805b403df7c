use clap::Parser;
use weir_agent::cli::{Cli, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    weir_common::init_logging(cli.run.log_format == LogFormat::Json);
    match weir_agent::commands::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
