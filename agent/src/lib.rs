//! weir-agent: makes the kernel's overlay state match the cluster's nodes.

pub mod model;
pub mod plan;
