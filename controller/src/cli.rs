use std::net::SocketAddr;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

#[derive(Parser, Debug, Clone)]
#[command(name = "weir-controller", version, about = "weir's pod CIDR allocator (leader-elected)")]
pub struct Args {
    /// One IPv4 and/or one IPv6 range, comma separated.
    #[arg(long, env = "WEIR_CLUSTER_CIDR", value_delimiter = ',', required = true)]
    pub cluster_cidr: Vec<IpNet>,
    #[arg(long, default_value_t = 24, env = "WEIR_NODE_CIDR_MASK_SIZE_IPV4")]
    pub node_cidr_mask_size_ipv4: u8,
    #[arg(long, default_value_t = 64, env = "WEIR_NODE_CIDR_MASK_SIZE_IPV6")]
    pub node_cidr_mask_size_ipv6: u8,
    #[arg(long, default_value = "0.0.0.0:9479", env = "WEIR_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub api: weir_common::ApiArgs,
    /// This replica's identity in the Lease (the Pod name in a Deployment).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, default_value = "kube-system", env = "WEIR_LEASE_NAMESPACE")]
    pub lease_namespace: String,
    #[arg(long, default_value = "weir-controller", env = "WEIR_LEASE_NAME")]
    pub lease_name: String,
    /// Seconds a lease stays valid without renewal; a takeover waits this long.
    #[arg(long, default_value_t = 15, env = "WEIR_LEASE_DURATION")]
    pub lease_duration: u64,
    #[arg(long, value_enum, default_value = "text", env = "WEIR_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_has_an_env_var() {
        use clap::CommandFactory;
        for arg in super::Args::command().get_arguments() {
            let id = arg.get_id().as_str();
            if !matches!(id, "help" | "version") {
                assert!(arg.get_env().is_some(), "--{id} has no env var");
            }
        }
    }
}
