//! The agent's Prometheus metrics. One registry, passed explicitly.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

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
        m
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
