//! The CNI config and subnet.env that let the standard bridge and host-local
//! plugins give pods their addresses. Written atomically, and only on change.

use std::io::Write;
use std::path::Path;

use ipnet::IpNet;
use serde_json::json;

pub const CONFLIST_NAME: &str = "10-weir.conflist";

pub struct CniInputs<'a> {
    pub pod_cidrs: &'a [IpNet],
    pub cluster_cidrs: &'a [IpNet],
    pub mtu: u32,
    pub ip_masq: bool,
    /// host-local's state; per node, because nodes in the lab share one filesystem.
    pub ipam_dir: &'a Path,
}

pub fn conflist(i: &CniInputs) -> String {
    let ranges: Vec<_> = i.pod_cidrs.iter().map(|c| json!([{ "subnet": c.to_string() }])).collect();
    let mut routes: Vec<_> = i.cluster_cidrs.iter().map(|c| json!({ "dst": c.to_string() })).collect();
    if routes.is_empty() {
        routes = i.pod_cidrs.iter().map(|c| json!({ "dst": c.trunc().to_string() })).collect();
    }
    let doc = json!({
        "cniVersion": "1.0.0",
        "name": "weir",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": i.mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": i.ipam_dir.display().to_string(),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    serde_json::to_string_pretty(&doc).expect("JSON value serialises") + "\n"
}

/// flannel-compatible names with weir's prefix, for scripts that source it.
pub fn subnet_env(i: &CniInputs) -> String {
    let join = |v: &[IpNet]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",");
    let subnets: Vec<IpNet> =
        i.pod_cidrs.iter().filter_map(|c| c.hosts().next().and_then(|h| IpNet::new(h, c.prefix_len()).ok())).collect();
    format!(
        "WEIR_NETWORK={}\nWEIR_SUBNET={}\nWEIR_MTU={}\nWEIR_IPMASQ={}\n",
        join(i.cluster_cidrs),
        join(&subnets),
        i.mtu,
        i.ip_masq
    )
}

/// Writes `content` to `path` through a temporary file and rename, unless the
/// file already holds exactly that. Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(false);
    }
    replace_file(path, content, true)?;
    Ok(true)
}

/// Replaces `path` through a rename, so a reader sees the old content or the
/// new, never a torn file; `durable` also waits for the disk.
pub fn replace_file(path: &Path, content: &str, durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("weir")));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content.as_bytes())?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_bridge_host_local_and_portmap() {
        let pod = ["10.244.1.0/24".parse().unwrap()];
        let cluster = ["10.244.0.0/16".parse().unwrap()];
        let i = CniInputs {
            pod_cidrs: &pod,
            cluster_cidrs: &cluster,
            mtu: 1450,
            ip_masq: true,
            ipam_dir: Path::new("/run/weir/ipam"),
        };
        let v: serde_json::Value = serde_json::from_str(&conflist(&i)).unwrap();
        assert_eq!(v["plugins"][0]["mtu"], 1450);
        assert_eq!(v["plugins"][0]["ipMasq"], false);
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(v["plugins"][0]["ipam"]["routes"][0]["dst"], "10.244.0.0/16");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert!(subnet_env(&i).contains("WEIR_SUBNET=10.244.1.1/24"));
    }

    #[test]
    fn writes_only_on_change() {
        let dir = std::env::temp_dir().join(format!("weir-cni-{}", std::process::id()));
        let p = dir.join("a.conf");
        assert!(write_if_changed(&p, "x").unwrap());
        assert!(!write_if_changed(&p, "x").unwrap());
        assert!(write_if_changed(&p, "y").unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
