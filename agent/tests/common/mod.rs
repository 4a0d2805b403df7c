//! Helpers for kernel tests: each test gets private network namespaces, so
//! nothing touches the host's own network state.
#![allow(dead_code)]
// Entering a namespace needs unshare(2)/setns(2), which std does not wrap.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use weir_agent::dataplane::netlink::NetlinkKernel;
use weir_agent::dataplane::{DeviceKind, DeviceSpec};
use weir_agent::engine::{Engine, EngineConfig, EngineStatus};
use weir_agent::metrics::Metrics;
use weir_agent::model::{Backend, Peer};

/// Runs `f` on a new thread inside a fresh network namespace, or prints a
/// visible SKIP when the test cannot create one.
pub fn in_fresh_netns<F: FnOnce() + Send + 'static>(test: &str, f: F) {
    if !can_create_netns() {
        eprintln!("SKIP {test}: kernel tests need root (CAP_NET_ADMIN) to create network namespaces");
        return;
    }
    std::thread::spawn(move || {
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        sh("ip link set lo up");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// Moves the calling thread into the named namespace (from `ip netns add`).
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open netns");
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {name}");
}

pub fn can_create_netns() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A named namespace that is deleted when dropped, even if the test panics.
pub struct NamedNetns(pub String);

impl NamedNetns {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(std::process::Stdio::null()).status();
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        NamedNetns(name.to_string())
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Two named namespaces `{prefix}-{pid}-a` and `-b` joined by a veth
/// underlay (`ua` 198.18.0.1/24, `ub` 198.18.0.2/24), with a "pod" address
/// behind each node on lo (10.244.1.1, 10.244.2.1).
pub fn node_pair(prefix: &str) -> (NamedNetns, NamedNetns) {
    let pid = std::process::id();
    let (na, nb) = (NamedNetns::new(&format!("{prefix}-{pid}-a")), NamedNetns::new(&format!("{prefix}-{pid}-b")));
    let (a, b) = (&na.0, &nb.0);
    sh(&format!("ip link add ua netns {a} type veth peer name ub netns {b}"));
    sh(&format!("ip -n {a} addr add 198.18.0.1/24 dev ua && ip -n {a} link set ua up"));
    sh(&format!("ip -n {b} addr add 198.18.0.2/24 dev ub && ip -n {b} link set ub up"));
    sh(&format!("ip -n {a} addr add 10.244.1.1/32 dev lo && ip -n {b} addr add 10.244.2.1/32 dev lo"));
    (na, nb)
}

/// What most two-node tests start from: the pair, their names, and a fresh
/// directory (holding `peers.yaml` when `peers` is given). None, after
/// printing the SKIP line the suite's summary counts, when not root.
pub struct Pair {
    _namespaces: (NamedNetns, NamedNetns),
    pub a: String,
    pub b: String,
    pub dir: ScratchDir,
}

pub fn pair(test: &str, prefix: &str, peers: Option<&str>) -> Option<Pair> {
    if !can_create_netns() {
        eprintln!("SKIP {test}: needs root");
        return None;
    }
    let (na, nb) = node_pair(prefix);
    let dir = temp_dir(prefix);
    if let Some(peers) = peers {
        std::fs::write(dir.join("peers.yaml"), peers).unwrap();
    }
    Some(Pair { a: na.0.clone(), b: nb.0.clone(), _namespaces: (na, nb), dir })
}

/// A fresh per-process directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> ScratchDir {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ScratchDir(dir)
}

/// Removed when dropped, unless the test is failing: the agents' logs in it
/// are then what explains the failure, so it is kept and named.
pub struct ScratchDir(std::path::PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for the failing test", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs a shell command in the calling thread's namespace and returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh");
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn json(cmd: &str) -> serde_json::Value {
    let text = sh(cmd);
    if text.trim().is_empty() {
        return serde_json::Value::Array(vec![]);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("`{cmd}` gave bad JSON: {e}: {text}"))
}

pub fn count(cmd: &str) -> usize {
    json(cmd).as_array().map(|a| a.len()).unwrap_or(0)
}

/// An underlay: a veth pair with 198.18.0.1/24 on `u0`. Returns u0's ifindex.
pub fn underlay() -> u32 {
    sh(
        "ip link add u0 type veth peer name u1 && ip addr add 198.18.0.1/24 dev u0 && ip link set u0 up && ip link set u1 up",
    );
    ifindex("u0")
}

/// /sys shows the namespace it was mounted in, so ask netlink instead.
pub fn ifindex(dev: &str) -> u32 {
    json(&format!("ip -j link show {dev}"))[0]["ifindex"].as_u64().expect("ifindex") as u32
}

pub fn vxlan_spec(underlay_ifindex: u32, local: &str, cidr: &str) -> DeviceSpec {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    DeviceSpec {
        name: "weir.1".into(),
        kind: DeviceKind::Vxlan { vni: 1, port: 8472, on_demand: false },
        local: local.parse().unwrap(),
        underlay_ifindex,
        mtu: 1450,
        mac: None,
        addresses: vec![ipnet::IpNet::new(net.network(), net.max_prefix_len()).unwrap()],
    }
}

pub fn engine(spec: DeviceSpec) -> (Engine<NetlinkKernel>, tokio::sync::watch::Receiver<EngineStatus>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let cfg = EngineConfig {
        backend: Backend::Vxlan,
        device: spec,
        direct: None,
        resync_interval: Duration::from_secs(60),
        on_demand: None,
    };
    let (e, status) = Engine::new(NetlinkKernel::connect().unwrap(), cfg, metrics.clone());
    (e, status, metrics)
}

/// Peer i: underlay 198.19.x.y, MAC 0e:00:00:00:xx:yy, pod CIDR 10.(i/256).(i%256).0/24 shifted into 10.0.0.0/8.
pub fn fake_peer(i: u32) -> Peer {
    let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
    Peer {
        name: format!("fake-{i:05}"),
        underlay_ip: format!("198.19.{hi}.{lo}").parse().unwrap(),
        vtep_mac: format!("0e:00:00:00:{hi:02x}:{lo:02x}").parse().unwrap(),
        pod_cidrs: vec![format!("10.{}.{lo}.0/24", 100 + hi).parse().unwrap()],
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Polls `cond` every 20 ms for up to `limit`; returns the time it took.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A `weir-agent run` process, killed when dropped.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `weir-agent run` in namespace `ns` with peers from
/// `dir/peers.yaml`, its files under `dir/<node>` and its log in
/// `dir/<node>.log`. `wrapper` runs before the agent (e.g. setpriv); `env`
/// adds variables.
pub fn spawn_agent_with(
    ns: &str,
    node: &str,
    iface: &str,
    dir: &std::path::Path,
    wrapper: &[&str],
    env: &[(&str, &str)],
) -> Agent {
    let log = std::fs::File::create(dir.join(format!("{node}.log"))).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(wrapper)
        .args([env!("CARGO_BIN_EXE_weir-agent"), "run"])
        .envs(env.iter().copied())
        .env("NODE_NAME", node)
        .env("WEIR_PEERS_FILE", dir.join("peers.yaml"))
        .env("WEIR_IFACE", iface)
        .env("WEIR_CNI_CONF_DIR", dir.join(node).join("cni"))
        .env("WEIR_RUN_DIR", dir.join(node).join("run"))
        .env("WEIR_METRICS_ADDR", "127.0.0.1:9478")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent(child)
}

/// Polls `cond` every 100 ms for up to `limit`, from a plain thread.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}
