//! weir-agent: makes the kernel's overlay state match the cluster's nodes.

pub mod dataplane;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod plan;
