use clap::Parser;
use weir_agent::cli::{Cli, LogFormat};

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    if let Err(e) = weir_common::settings::load_from_env_dir() {
        eprintln!("weir-agent: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    weir_common::init_logging(cli.run.log_format == LogFormat::Json);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match runtime.block_on(weir_agent::commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Exit now: the dataplane stays as it is, and nothing left running (a
    // watch, a blocking netlink read) should hold up a SIGTERM.
    runtime.shutdown_background();
    code
}

/// glibc gives each thread that allocates its own arena and keeps freed pages
/// in each; at 5,000 Nodes one arena holds the agent's memory well below the
/// default's (BENCHMARKS.md, B4). The agent allocates little on its hot
/// paths, so one arena costs no measurable contention.
/// Must run before any thread starts.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
