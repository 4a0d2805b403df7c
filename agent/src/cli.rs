//! Flags. Every flag has an environment variable, so the DaemonSet can set
//! them from a ConfigMap.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::model::{Backend, Mode};

#[derive(Parser, Debug)]
#[command(name = "weir-agent", version, about = "weir's per-node overlay agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Program and keep programming the overlay (the default).
    Run,
    /// Show the running agent's peers and whether the kernel matches; exits 1 on drift.
    Status(StatusArgs),
    /// Remove everything weir created on this node (for uninstall).
    Cleanup,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, value_enum, default_value = "table", env = "WEIR_STATUS_OUTPUT")]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// This node's name; its Node object supplies the pod CIDRs.
    #[arg(long, env = "NODE_NAME", global = true)]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub api: weir_common::ApiArgs,
    #[arg(long, value_enum, default_value = "vxlan", env = "WEIR_BACKEND", global = true)]
    pub backend: Backend,
    #[arg(long, value_enum, default_value = "full", env = "WEIR_MODE", global = true)]
    pub mode: Mode,
    #[arg(long, default_value_t = 1, env = "WEIR_VNI", global = true)]
    pub vni: u32,
    #[arg(long, default_value_t = 8472, env = "WEIR_VXLAN_PORT", global = true)]
    pub vxlan_port: u16,
    /// Overlay MTU; default underlay MTU minus the encapsulation overhead.
    #[arg(long, env = "WEIR_MTU", global = true)]
    pub mtu: Option<u32>,
    /// Underlay interface: a name, or a regex matched against all names.
    #[arg(long, env = "WEIR_IFACE", global = true)]
    pub iface: Option<String>,
    /// Underlay IP; takes precedence over --iface.
    #[arg(long, env = "WEIR_PUBLIC_IP", global = true)]
    pub public_ip: Option<IpAddr>,
    /// The cluster's pod network(s), comma separated; peers' CIDRs must lie inside.
    #[arg(long, env = "WEIR_CLUSTER_CIDR", value_delimiter = ',', global = true)]
    pub cluster_cidr: Vec<IpNet>,
    #[arg(long, default_value = "/etc/cni/net.d", env = "WEIR_CNI_CONF_DIR", global = true)]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = "/run/weir", env = "WEIR_RUN_DIR", global = true)]
    pub run_dir: PathBuf,
    #[arg(long, default_value = "0.0.0.0:9478", env = "WEIR_METRICS_ADDR", global = true)]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "60s", value_parser = parse_duration, env = "WEIR_RESYNC_INTERVAL", global = true)]
    pub resync_interval: Duration,
    #[arg(long, value_enum, default_value = "text", env = "WEIR_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
    /// Masquerade pod traffic leaving the cluster CIDR.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "WEIR_IP_MASQ", global = true)]
    pub ip_masq: bool,
    /// On-demand mode: remove a peer's fdb and neighbour entries after this
    /// long without traffic (0 keeps them while the peer exists).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "WEIR_IDLE_TIMEOUT", global = true)]
    pub idle_timeout: Duration,
    /// On-demand mode: receive buffer of the miss socket, in bytes.
    #[arg(long, default_value_t = 8 << 20, env = "WEIR_MISS_RCVBUF", global = true)]
    pub miss_rcvbuf: usize,
    /// Route pod traffic to peers on this node's underlay subnet directly
    /// through the underlay, unencapsulated; only other peers use the tunnel
    /// (flannel's DirectRouting, Calico's CrossSubnet).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "WEIR_DIRECT_ROUTING", global = true)]
    pub direct_routing: bool,
    /// Manage the nftables table `inet weir` (masquerade, tunnel ingress filter).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "WEIR_FIREWALL", global = true)]
    pub firewall: bool,
    /// How often the nftables table is checked for drift.
    #[arg(long, default_value = "10s", value_parser = parse_duration, env = "WEIR_FIREWALL_CHECK_INTERVAL", global = true)]
    pub firewall_check_interval: Duration,
    /// Read peers from this YAML file instead of the Kubernetes API.
    #[arg(long, env = "WEIR_PEERS_FILE", global = true)]
    pub peers_file: Option<PathBuf>,
    /// Where to write the node's `net.*` sysctls (accept_ra on weir's device).
    /// A container's /proc/sys is read-only and runc mounts nothing inside
    /// /proc, so the DaemonSet mounts the host's /proc/sys/net elsewhere.
    #[arg(long, default_value = "/proc/sys/net", env = "WEIR_SYSCTL_NET_DIR", global = true)]
    pub sysctl_net_dir: PathBuf,
}

/// Accepts `90`, `90s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn every_flag_has_an_env_var() {
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no env var");
        }
    }
}
