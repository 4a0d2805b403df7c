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

    pub const PHASES: [&str; 4] = [DEVICE, "dump", "apply", CHANGE];
    /// Writing the entries of the peers a Node event changed.
    pub const CHANGE: &str = "change";
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

/// Constructors that register what they build, so each metric is named once.
struct Builder(Registry);

impl Builder {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, metric: prometheus::Result<T>) -> T {
        let metric = metric.expect("valid metric definition");
        self.0.register(Box::new(metric.clone())).expect("metric names are unique");
        metric
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::with_opts(Opts::new(name, help)))
    }
    fn gauges(&self, name: &str, help: &str, label: &str) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), &[label]))
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(Opts::new(name, help)))
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }
    fn histogram(&self, name: &str, help: &str) -> Histogram {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())))
    }
    fn histograms(&self, name: &str, help: &str, label: &str) -> HistogramVec {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &[label]))
    }
}

/// From 50 µs (a miss answer) to 2.5 s (a full sync of thousands of peers).
const LATENCY_BUCKETS: [f64; 15] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Metrics {
    pub fn new() -> Self {
        let b = Builder(Registry::new());
        let m = Metrics {
            fdb_entries: b.gauge("weir_fdb_entries", "fdb entries weir owns on its device, as read from the kernel"),
            neigh_entries: b
                .gauge("weir_neigh_entries", "Permanent neighbour entries on weir's device, as read from the kernel"),
            routes: b.gauge("weir_routes", "Routes carrying weir's protocol, as read from the kernel"),
            peers: b.gauges("weir_peers", "Remote nodes by state", "state"),
            l2miss: b.counters("weir_l2miss_total", "L2MISS notifications by result", &["result"]),
            l3miss: b.counters("weir_l3miss_total", "L3MISS notifications by result", &["result"]),
            miss_resolve_seconds: b
                .histogram("weir_miss_resolve_seconds", "Time from a miss received to its entries acked"),
            reconcile_seconds: b.histogram("weir_reconcile_seconds", "Duration of one reconcile pass"),
            reconcile_total: b.counters("weir_reconcile_total", "Reconcile passes by result", &["result"]),
            netlink_ops: b.counters(
                "weir_netlink_ops_total",
                "Netlink writes by op, object and result",
                &["op", "object", "result"],
            ),
            netlink_enobufs: b.counter(
                "weir_netlink_enobufs_total",
                "Netlink notification sockets that overflowed and forced a full resync",
            ),
            drift_repaired: b.counters(
                "weir_drift_repaired_total",
                "Kernel entries found changed behind weir's back and put back",
                &["object"],
            ),
            peer_rejected: b.counters(
                "weir_peer_rejected_total",
                "Nodes skipped because a field failed validation",
                &["reason"],
            ),
            kube_watch_events: b.counters("weir_kube_watch_events_total", "Node watch events by type", &["type"]),
            build_info: b.add(IntGaugeVec::new(
                Opts::new("weir_build_info", "Always 1; labels carry the build"),
                &["version", "backend", "mode"],
            )),
            cni_writes: b.counter("weir_cni_config_writes_total", "Times the CNI config or subnet.env was rewritten"),
            device_recreated: b
                .counter("weir_device_recreated_total", "Times the overlay device had to be created again"),
            phase_seconds: b.histograms("weir_reconcile_phase_seconds", "Time spent per reconcile phase", "phase"),
            firewall_sync: b.counters(
                "weir_firewall_sync_total",
                "Applications of the nftables table inet weir by result",
                &["result"],
            ),
            tunnel_dropped: b.gauge(
                "weir_tunnel_dropped_packets",
                "Tunnel packets dropped because they came from no known node (read from the nft counter)",
            ),
            ready: b.gauge("weir_agent_ready", "1 while /readyz answers 200"),
            registry: b.0,
        };
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
