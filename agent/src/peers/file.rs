//! `--peers-file`: a static peer list for hosts without Kubernetes and for
//! tests that need no API server. Re-read whenever its modification time changes.
//!
//! ```yaml
//! - name: node-1
//!   publicIP: 198.18.0.11
//!   vtepMAC: 0e:00:00:00:00:01
//!   podCIDRs: [10.244.1.0/24]
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::validate::NodeInfo;
use crate::model::Backend;

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileEntry {
    name: String,
    #[serde(rename = "publicIP")]
    public_ip: String,
    #[serde(rename = "vtepMAC", default)]
    vtep_mac: Option<String>,
    #[serde(rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
    #[serde(default)]
    backend: Option<String>,
}

pub fn parse(text: &str, default_backend: Backend) -> Result<Vec<NodeInfo>, String> {
    let entries: Vec<FileEntry> = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            name: e.name,
            // File order decides conflicts, like creation time does in a cluster.
            created: i as i64,
            public_ip: Some(e.public_ip),
            vtep_mac: e.vtep_mac,
            backend: Some(e.backend.unwrap_or_else(|| default_backend.as_str().to_string())),
            pod_cidrs: e.pod_cidrs,
            addresses: vec![],
        })
        .collect())
}

pub fn read(path: &Path, default_backend: Backend) -> Result<Vec<NodeInfo>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text, default_backend).map_err(|e| format!("{}: {e}", path.display()))
}

/// Calls `on_change` with the file's nodes now and after every change. A file
/// that fails to parse is reported and the last good content stays in force.
pub async fn watch(path: PathBuf, default_backend: Backend, mut on_change: impl FnMut(Vec<NodeInfo>)) {
    let mut seen: Option<SystemTime> = None;
    loop {
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if mtime != seen {
            seen = mtime;
            match read(&path, default_backend) {
                Ok(nodes) => on_change(nodes),
                Err(e) => {
                    tracing::warn!(error = %e, "peers file unreadable; keeping the last good peer set")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::model::Backend;

    #[test]
    fn parses_the_documented_format() {
        let nodes = super::parse(
            "- name: node-1\n  publicIP: 198.18.0.11\n  vtepMAC: 0e:00:00:00:00:01\n  podCIDRs: [10.244.1.0/24]\n",
            Backend::Vxlan,
        )
        .unwrap();
        assert_eq!(nodes[0].name, "node-1");
        assert_eq!(nodes[0].pod_cidrs, vec!["10.244.1.0/24"]);
        assert_eq!(nodes[0].backend.as_deref(), Some("vxlan"));
    }

    #[test]
    fn unknown_fields_are_an_error_that_names_them() {
        let e =
            super::parse("- name: a\n  publicIP: 1.2.3.4\n  podCIDRs: []\n  vtepMac: x\n", Backend::Vxlan).unwrap_err();
        assert!(e.contains("vtepMac"), "{e}");
    }
}
