//! The agent's Prometheus metrics. One registry, passed explicitly.
//!
//! Every label value the code uses is listed once in `labels`, and every
//! series with known labels is exported at 0 from start-up: Prometheus'
//! `rate()` and `absent()` (and the alerts built on them) cannot see the
//! first event of a series that does not exist yet.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The label values of each metric, one definition each.
pub mod labels {
    pub const PEER_STATES: [&str; 3] = [ACCEPTED, REJECTED, PENDING];
    /// Peers in the engine's desired state.
    pub const ACCEPTED: &str = "accepted";
    /// A field failed a peer rule: a bad value, or one an older node holds.
    pub const REJECTED: &str = "rejected";
    /// Not joined yet: no VTEP or pod CIDR published.
    pub const PENDING: &str = "pending";

    pub const MISS_RESULTS: [&str; 3] = [RESOLVED, UNKNOWN, ERROR];
    pub const RESOLVED: &str = "resolved";
    pub const UNKNOWN: &str = "unknown";

    pub const RECONCILE_RESULTS: [&str; 3] = [SUCCESS, PARTIAL, ERROR];
    pub const SUCCESS: &str = "success";
    pub const PARTIAL: &str = "partial";
    pub const ERROR: &str = "error";

    pub const VERBS: [&str; 2] = [REPLACE, DELETE];
    pub const REPLACE: &str = "replace";
    pub const DELETE: &str = "delete";
    pub const OBJECTS: [&str; 4] = [FDB, NEIGH, NEXTHOP, ROUTE];
    pub const FDB: &str = "fdb";
    pub const NEIGH: &str = "neigh";
    pub const NEXTHOP: &str = "nexthop";
    pub const ROUTE: &str = "route";
    pub const WRITE_RESULTS: [&str; 2] = [SUCCESS, ERROR];

    pub const DRIFT_OBJECTS: [&str; 6] = [FDB, NEIGH, NEXTHOP, ROUTE, DEVICE, FIREWALL];
    pub const DEVICE: &str = "device";
    pub const FIREWALL: &str = "firewall";

    /// The field at fault (`weir_common::nodes::Rejection::reason_label`).
    pub const REJECT_REASONS: [&str; 3] = ["public-ip", "vtep-mac", "pod-cidr"];

    pub const WATCH_EVENTS: [&str; 6] = ["apply", "delete", "init", "init_apply", "init_done", ERROR];

    pub const FIREWALL_RESULTS: [&str; 3] = [SUCCESS, REPAIRED, ERROR];
    pub const REPAIRED: &str = "repaired";

    pub const PHASES: [&str; 3] = [DEVICE, "dump", "apply"];
}

pub struct Metrics {
    pub registry: Registry,
    pub fdb_entries: IntGauge,
    pub neigh_entries: IntGauge,
    pub routes: IntGauge,
    pub peers: IntGaugeVec,
    pub l2miss: IntCounterVec,
    pub l3miss: IntCounterVec,
    pub miss_resolve_seconds: Histogram,
    pub reconcile_seconds: Histogram,
    pub reconcile_total: IntCounterVec,
    pub netlink_ops: IntCounterVec,
    pub netlink_enobufs: IntCounter,
    pub drift_repaired: IntCounterVec,
    pub peer_rejected: IntCounterVec,
    pub kube_watch_events: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub cni_writes: IntCounter,
    pub device_recreated: IntCounter,
    pub phase_seconds: HistogramVec,
    pub firewall_sync: IntCounterVec,
    pub tunnel_dropped: IntGauge,
    pub ready: IntGauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Self {
        let latency_buckets = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let m = Metrics {
            registry: Registry::new(),
            fdb_entries: IntGauge::with_opts(opts(
                "weir_fdb_entries",
                "fdb entries weir owns on its device, as read from the kernel",
            ))
            .unwrap(),
            neigh_entries: IntGauge::with_opts(opts(
                "weir_neigh_entries",
                "Permanent neighbour entries on weir's device, as read from the kernel",
            ))
            .unwrap(),
            routes: IntGauge::with_opts(opts(
                "weir_routes",
                "Routes carrying weir's protocol, as read from the kernel",
            ))
            .unwrap(),
            peers: IntGaugeVec::new(opts("weir_peers", "Remote nodes by state"), &["state"]).unwrap(),
            l2miss: IntCounterVec::new(opts("weir_l2miss_total", "L2MISS notifications by result"), &["result"])
                .unwrap(),
            l3miss: IntCounterVec::new(opts("weir_l3miss_total", "L3MISS notifications by result"), &["result"])
                .unwrap(),
            miss_resolve_seconds: Histogram::with_opts(
                HistogramOpts::new("weir_miss_resolve_seconds", "Time from a miss received to its entries acked")
                    .buckets(latency_buckets.clone()),
            )
            .unwrap(),
            reconcile_seconds: Histogram::with_opts(
                HistogramOpts::new("weir_reconcile_seconds", "Duration of one reconcile pass")
                    .buckets(latency_buckets.clone()),
            )
            .unwrap(),
            reconcile_total: IntCounterVec::new(
                opts("weir_reconcile_total", "Reconcile passes by result"),
                &["result"],
            )
            .unwrap(),
            netlink_ops: IntCounterVec::new(
                opts("weir_netlink_ops_total", "Netlink writes by op, object and result"),
                &["op", "object", "result"],
            )
            .unwrap(),
            netlink_enobufs: IntCounter::with_opts(opts(
                "weir_netlink_enobufs_total",
                "Netlink notification sockets that overflowed and forced a full resync",
            ))
            .unwrap(),
            drift_repaired: IntCounterVec::new(
                opts("weir_drift_repaired_total", "Kernel entries found changed behind weir's back and put back"),
                &["object"],
            )
            .unwrap(),
            peer_rejected: IntCounterVec::new(
                opts("weir_peer_rejected_total", "Nodes skipped because a field failed validation"),
                &["reason"],
            )
            .unwrap(),
            kube_watch_events: IntCounterVec::new(
                opts("weir_kube_watch_events_total", "Node watch events by type"),
                &["type"],
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                opts("weir_build_info", "Always 1; labels carry the build"),
                &["version", "backend", "mode"],
            )
            .unwrap(),
            cni_writes: IntCounter::with_opts(opts(
                "weir_cni_config_writes_total",
                "Times the CNI config or subnet.env was rewritten",
            ))
            .unwrap(),
            device_recreated: IntCounter::with_opts(opts(
                "weir_device_recreated_total",
                "Times the overlay device had to be created again",
            ))
            .unwrap(),
            phase_seconds: HistogramVec::new(
                HistogramOpts::new("weir_reconcile_phase_seconds", "Time spent per reconcile phase")
                    .buckets(latency_buckets),
                &["phase"],
            )
            .unwrap(),
            firewall_sync: IntCounterVec::new(
                opts("weir_firewall_sync_total", "Applications of the nftables table inet weir by result"),
                &["result"],
            )
            .unwrap(),
            tunnel_dropped: IntGauge::with_opts(opts(
                "weir_tunnel_dropped_packets",
                "Tunnel packets dropped because they came from no known node (read from the nft counter)",
            ))
            .unwrap(),
            ready: IntGauge::with_opts(opts("weir_agent_ready", "1 while /readyz answers 200")).unwrap(),
        };
        let r = &m.registry;
        r.register(Box::new(m.fdb_entries.clone())).unwrap();
        r.register(Box::new(m.neigh_entries.clone())).unwrap();
        r.register(Box::new(m.routes.clone())).unwrap();
        r.register(Box::new(m.peers.clone())).unwrap();
        r.register(Box::new(m.l2miss.clone())).unwrap();
        r.register(Box::new(m.l3miss.clone())).unwrap();
        r.register(Box::new(m.miss_resolve_seconds.clone())).unwrap();
        r.register(Box::new(m.reconcile_seconds.clone())).unwrap();
        r.register(Box::new(m.reconcile_total.clone())).unwrap();
        r.register(Box::new(m.netlink_ops.clone())).unwrap();
        r.register(Box::new(m.netlink_enobufs.clone())).unwrap();
        r.register(Box::new(m.drift_repaired.clone())).unwrap();
        r.register(Box::new(m.peer_rejected.clone())).unwrap();
        r.register(Box::new(m.kube_watch_events.clone())).unwrap();
        r.register(Box::new(m.build_info.clone())).unwrap();
        r.register(Box::new(m.cni_writes.clone())).unwrap();
        r.register(Box::new(m.device_recreated.clone())).unwrap();
        r.register(Box::new(m.phase_seconds.clone())).unwrap();
        r.register(Box::new(m.firewall_sync.clone())).unwrap();
        r.register(Box::new(m.tunnel_dropped.clone())).unwrap();
        r.register(Box::new(m.ready.clone())).unwrap();
        m.export_known_labels();
        m
    }

    fn export_known_labels(&self) {
        use labels::*;
        for state in PEER_STATES {
            self.peers.with_label_values(&[state]);
        }
        for result in MISS_RESULTS {
            self.l2miss.with_label_values(&[result]);
            self.l3miss.with_label_values(&[result]);
        }
        for result in RECONCILE_RESULTS {
            self.reconcile_total.with_label_values(&[result]);
        }
        for verb in VERBS {
            for object in OBJECTS {
                for result in WRITE_RESULTS {
                    self.netlink_ops.with_label_values(&[verb, object, result]);
                }
            }
        }
        for object in DRIFT_OBJECTS {
            self.drift_repaired.with_label_values(&[object]);
        }
        for reason in REJECT_REASONS {
            self.peer_rejected.with_label_values(&[reason]);
        }
        for event in WATCH_EVENTS {
            self.kube_watch_events.with_label_values(&[event]);
        }
        for result in FIREWALL_RESULTS {
            self.firewall_sync.with_label_values(&[result]);
        }
        for phase in PHASES {
            self.phase_seconds.with_label_values(&[phase]);
        }
    }

    pub fn render(&self) -> String {
        weir_common::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's series as the README lists them, in its "Endpoints and
    /// metrics" section: the list operators read is the list tested.
    fn readme_series() -> Vec<&'static str> {
        let readme = include_str!("../../README.md");
        let section = readme.split("### Endpoints and metrics").nth(1).expect("README section");
        let section = section.split("\n##").next().unwrap_or(section);
        let names: Vec<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("weir_"))
            .map(|s| s.split('{').next().unwrap_or(s))
            .collect();
        assert!(names.len() >= 15, "found only {names:?} in the README");
        names
    }

    #[test]
    fn known_series_exist_at_zero_before_any_event() {
        let m = Metrics::new();
        m.build_info.with_label_values(&["0", "vxlan", "full"]).set(1);
        let text = m.render();
        for name in readme_series() {
            assert!(text.lines().any(|l| l.starts_with(name)), "{name} missing from a fresh /metrics");
        }
        for line in [
            "weir_l3miss_total{result=\"resolved\"} 0",
            "weir_peer_rejected_total{reason=\"pod-cidr\"} 0",
            "weir_peers{state=\"rejected\"} 0",
            "weir_netlink_ops_total{object=\"route\",op=\"delete\",result=\"error\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing");
        }
    }
}
