//! IPIP on this machine's kernel: the datapath where the kernel has ipip, and
//! a clear startup error where it does not. The datapath itself is also proven
//! under Debian's 6.1 kernel by `e2e/vm/run`.

mod common;

use std::process::Command;

use common::*;
use weir_agent::dataplane::{DeviceKind, DeviceSpec, Kernel, KernelError};

fn kernel_has_ipip() -> bool {
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("weir-ipip-probe-{}-{n}", std::process::id());
    let _ns = NamedNetns::new(&probe);
    Command::new("ip").args(["-n", &probe, "link", "add", "t0", "type", "ipip"]).status().is_ok_and(|s| s.success())
}

fn ipip_spec(underlay: u32) -> DeviceSpec {
    DeviceSpec {
        name: DeviceSpec::IPIP_NAME.into(),
        kind: DeviceKind::Ipip,
        local: "198.18.0.1".parse().unwrap(),
        underlay_ifindex: underlay,
        mtu: 1480,
        mac: None,
        addresses: vec!["10.244.1.0/32".parse().unwrap()],
    }
}

#[test]
fn ipip_device_is_created_or_the_missing_module_is_named() {
    if !can_create_netns() {
        eprintln!("SKIP ipip_device_is_created_or_the_missing_module_is_named: needs root");
        return;
    }
    let has_ipip = kernel_has_ipip();
    in_fresh_netns("ipip_device", move || {
        runtime().block_on(async {
            let u = underlay();
            let mut k = weir_agent::dataplane::netlink::NetlinkKernel::connect().unwrap();
            match k.ensure_device(&ipip_spec(u)).await {
                Ok(status) => {
                    assert!(has_ipip);
                    let link = &json("ip -j -d link show weir.ipip")[0];
                    assert_eq!(link["mtu"], 1480);
                    assert_eq!(link["linkinfo"]["info_data"]["local"], "198.18.0.1");
                    assert!(status.ifindex > 0);
                }
                Err(e) => {
                    assert!(!has_ipip, "kernel has ipip but the device failed: {e}");
                    assert!(matches!(e, KernelError::MissingDeviceType { kind: "ipip", module: "ipip" }), "{e:?}");
                    let text = e.to_string();
                    assert!(text.contains("ipip") && text.contains("modprobe ipip"), "{text}");
                    eprintln!("SKIP ipip datapath on this kernel (no ipip module); the error an operator sees: {text}");
                }
            }
        })
    });
}

#[test]
fn agent_stops_at_startup_naming_the_missing_module() {
    if !can_create_netns() || kernel_has_ipip() {
        eprintln!("SKIP agent_stops_at_startup_naming_the_missing_module: needs root and a kernel without ipip");
        return;
    }
    let ns = NamedNetns::new(&format!("weir-ipip-start-{}", std::process::id()));
    sh(&format!(
        "ip -n {0} link add u0 type veth peer name u1 && ip -n {0} addr add 198.18.0.1/24 dev u0 && ip -n {0} link set u0 up",
        ns.0
    ));
    let dir = temp_dir("weir-ipip");
    std::fs::write(dir.join("peers.yaml"), "- {name: a, publicIP: 198.18.0.1, podCIDRs: [10.244.1.0/24]}\n").unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_weir-agent"),
            "run",
            "--backend",
            "ipip",
            "--firewall=false",
        ])
        .env("NODE_NAME", "a")
        .env("WEIR_PEERS_FILE", dir.join("peers.yaml"))
        .env("WEIR_IFACE", "u0")
        .env("WEIR_CNI_CONF_DIR", dir.join("cni"))
        .env("WEIR_RUN_DIR", dir.join("run"))
        .env("WEIR_METRICS_ADDR", "127.0.0.1:9478")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must exit");
    assert!(stderr.contains("no ipip device support") && stderr.contains("modprobe ipip"), "{stderr}");
    assert!(!stderr.contains("os error"), "not a raw errno: {stderr}");
}
