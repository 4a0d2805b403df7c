//! Subcommand dispatch, `status` and `cleanup`.

use std::process::ExitCode;

use crate::cli::{Cli, Command, OutputFormat, RunArgs, StatusArgs};
use crate::dataplane::DeviceSpec;
use crate::dataplane::netlink::{NetlinkKernel, delete_link};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => crate::run::run(cli.run).await.map(|_| ExitCode::SUCCESS),
        Command::Status(s) => status(&cli.run, &s),
        Command::Cleanup => cleanup(&cli.run).await,
    }
}

fn status(args: &RunArgs, s: &StatusArgs) -> anyhow::Result<ExitCode> {
    let port = args.metrics_addr.port();
    let (code, body) = weir_common::http::get(&format!("127.0.0.1:{port}"), "/status")
        .map_err(|e| anyhow::anyhow!("cannot reach the agent on 127.0.0.1:{port}: {e}"))?;
    anyhow::ensure!(code == 200, "agent answered {code}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    match s.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Table => {
            for key in [
                "device_ready",
                "synced",
                "vtep_mac",
                "peers",
                "fdb_entries",
                "neigh_entries",
                "routes",
                "last_error",
            ] {
                println!("{key:<14} {}", v[key]);
            }
            for r in v["rejected"].as_array().into_iter().flatten() {
                println!("rejected       {r}");
            }
        }
    }
    let healthy = v["last_error"].is_null() && v["synced"] == true;
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Removes weir's devices; the kernel drops their fdb, neighbour and route
/// entries with them. The CNI config is removed so no new pod uses weir.
async fn cleanup(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let k = NetlinkKernel::connect()?;
    for name in [
        DeviceSpec::vxlan_name(args.vni),
        DeviceSpec::IPIP_NAME.to_string(),
    ] {
        if delete_link(&k.handle(), &name).await? {
            tracing::info!(device = %name, "removed");
        }
    }
    for path in [
        args.cni_conf_dir.join(crate::cni::CONFLIST_NAME),
        args.run_dir.join("subnet.env"),
    ] {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
