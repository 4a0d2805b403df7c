//! Nodes as weir sees them, and the rules that decide which make valid
//! peers. Both binaries apply the same rules: the agent to choose its peers,
//! weir-controller to tell operators (Events, metrics) why a Node is ignored.

#[cfg(test)]
mod fixtures;
mod incremental;
mod index;
mod rules;
mod types;

use k8s_openapi::api::core::v1::Node;

pub use incremental::IncrementalRules;
pub use index::{Change, NodeIndex};
pub use rules::{Accepted, Local, Outcome, Rejection, Rules, Skip, Verdict, clip};
pub use types::{Backend, CidrSet, Mac, MacError};

pub const ANN_PUBLIC_IP: &str = "weir.dev/public-ip";
pub const ANN_VTEP_MAC: &str = "weir.dev/vtep-mac";
pub const ANN_BACKEND: &str = "weir.dev/backend";
pub const ANN_VNI: &str = "weir.dev/vni";
pub const FIELD_POD_CIDRS: &str = "spec.podCIDRs";

/// The few fields of a Node weir needs. Everything else is dropped on
/// arrival so memory does not grow with managedFields, images or status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// Seconds since the epoch; older nodes win conflicts.
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub public_ip: Option<String>,
    #[serde(default)]
    pub vtep_mac: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    /// status.addresses; empty means "not listed", which skips that check.
    #[serde(default)]
    pub addresses: Vec<String>,
}

pub fn trim(node: &Node) -> NodeInfo {
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
    let spec = node.spec.as_ref();
    let mut pod_cidrs = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        created: node.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
        public_ip: get(ANN_PUBLIC_IP),
        vtep_mac: get(ANN_VTEP_MAC),
        backend: get(ANN_BACKEND),
        pod_cidrs,
        addresses: node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|a| a.iter().map(|a| a.address.clone()).collect())
            .unwrap_or_default(),
    }
}
