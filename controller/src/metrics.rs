use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub allocations: IntCounter,
    pub releases: IntCounter,
    pub allocation_failures: IntCounter,
    pub pool_exhausted: IntCounter,
    pub pool_size: IntGaugeVec,
    pub pool_used: IntGaugeVec,
    pub leader: IntGauge,
    pub conflicts: IntGaugeVec,
    pub rejected_nodes: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            allocations: IntCounter::new("weir_controller_allocations_total", "Pod CIDR sets written to Nodes")
                .unwrap(),
            releases: IntCounter::new("weir_controller_releases_total", "Pod CIDR sets freed by Node deletion")
                .unwrap(),
            allocation_failures: IntCounter::new(
                "weir_controller_allocation_failures_total",
                "Patches that failed; their CIDRs stay reserved until the next full rebuild",
            )
            .unwrap(),
            pool_exhausted: IntCounter::new(
                "weir_controller_pool_exhausted_total",
                "Nodes that found no free pod CIDR",
            )
            .unwrap(),
            pool_size: IntGaugeVec::new(
                Opts::new("weir_controller_pool_size", "Node subnets in the pool"),
                &["family"],
            )
            .unwrap(),
            pool_used: IntGaugeVec::new(Opts::new("weir_controller_pool_used", "Node subnets in use"), &["family"])
                .unwrap(),
            leader: IntGauge::new("weir_controller_leader", "1 while this replica holds the lease").unwrap(),
            conflicts: IntGaugeVec::new(
                Opts::new("weir_controller_conflicts", "Nodes rejected because an older Node holds the same value"),
                &["kind"],
            )
            .unwrap(),
            rejected_nodes: IntGaugeVec::new(
                Opts::new("weir_controller_rejected_nodes", "Nodes the peer rules reject, by the field at fault"),
                &["reason"],
            )
            .unwrap(),
        };
        for c in [&m.allocations, &m.releases, &m.allocation_failures, &m.pool_exhausted] {
            m.registry.register(Box::new(c.clone())).unwrap();
        }
        m.registry.register(Box::new(m.pool_size.clone())).unwrap();
        m.registry.register(Box::new(m.pool_used.clone())).unwrap();
        m.registry.register(Box::new(m.leader.clone())).unwrap();
        m.registry.register(Box::new(m.conflicts.clone())).unwrap();
        m.registry.register(Box::new(m.rejected_nodes.clone())).unwrap();
        for kind in crate::verdicts::CONFLICT_KINDS {
            m.conflicts.with_label_values(&[kind]).set(0);
        }
        for reason in crate::verdicts::REASONS {
            m.rejected_nodes.with_label_values(&[reason]).set(0);
        }
        m
    }

    pub fn render(&self) -> String {
        weir_common::metrics::render(&self.registry)
    }
}
