//! weir-agent: makes the kernel's overlay state match the cluster's nodes.

pub mod cli;
pub mod cni;
pub mod commands;
pub mod dataplane;
pub mod engine;
pub mod firewall;
pub mod health;
pub mod metrics;
pub mod model;
pub mod ondemand;
pub mod peers;
pub mod plan;
pub mod run;
pub mod status;
pub mod underlay;
