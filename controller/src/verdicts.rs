//! What weir-controller tells operators about Nodes the peer rules reject: a
//! Warning Event on the Node, so that `kubectl describe node` says why every
//! agent ignores it, and gauges by reason. The rules are the agents' own
//! (`weir_common::nodes`), applied to the whole cluster at once: one Event
//! per problem from the one leader, not one from every agent. Pure.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use weir_common::nodes::{NodeInfo, Rejection, Rules};

/// An unchanged rejection is reported again at most this often.
pub const REPEAT: Duration = Duration::from_secs(600);

/// The conflict kinds, as `weir_controller_conflicts{kind}` labels them.
pub const CONFLICT_KINDS: [&str; 3] = ["pod-cidr-overlap", "vtep-mac", "public-ip"];
/// The fields at fault, as `weir_controller_rejected_nodes{reason}` labels them.
pub const REASONS: [&str; 3] = ["public-ip", "vtep-mac", "pod-cidr"];

pub struct Verdicts {
    rules: Rules,
    /// Per node, the rejection last reported and when.
    reported: HashMap<String, (String, Instant)>,
}

/// The gauges' values after a judgement.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub conflicts: BTreeMap<&'static str, i64>,
    pub rejected: BTreeMap<&'static str, i64>,
}

fn conflict_kind(r: &Rejection) -> Option<&'static str> {
    r.held_by.as_ref()?;
    Some(match r.reason_label() {
        "pod-cidr" => "pod-cidr-overlap",
        other => other,
    })
}

impl Verdicts {
    pub fn new(cluster_cidrs: Vec<IpNet>) -> Self {
        let rules = Rules { backend: None, underlay_is_v4: None, cluster_cidrs, local: None };
        Verdicts { rules, reported: HashMap::new() }
    }

    /// Judges every node. Returns the rejections to report now (new ones,
    /// changed ones, and unchanged ones last reported `REPEAT` ago) and
    /// the gauges.
    pub fn judge<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = &'a NodeInfo>,
        now: Instant,
    ) -> (Vec<Rejection>, Counts) {
        let out = self.rules.validate(nodes);
        let mut counts = Counts::default();
        for kind in CONFLICT_KINDS {
            counts.conflicts.insert(kind, 0);
        }
        for reason in REASONS {
            counts.rejected.insert(reason, 0);
        }
        let mut report = Vec::new();
        let mut still = HashMap::new();
        for r in out.rejected {
            *counts.rejected.entry(r.reason_label()).or_default() += 1;
            if let Some(kind) = conflict_kind(&r) {
                *counts.conflicts.entry(kind).or_default() += 1;
            }
            let text = r.to_string();
            let at = match self.reported.get(&r.node) {
                Some((last, at)) if *last == text && now.duration_since(*at) < REPEAT => *at,
                _ => {
                    report.push(r.clone());
                    now
                }
            };
            still.insert(r.node, (text, at));
        }
        // A node that is fine again is forgotten: if it breaks again, that is news.
        self.reported = still;
        (report, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, created: i64, mac: &str, cidr: &str) -> NodeInfo {
        let n: u8 = name.trim_start_matches("node-").parse().unwrap();
        NodeInfo {
            name: name.into(),
            created,
            public_ip: Some(format!("198.18.0.{}", 10 + n)),
            vtep_mac: Some(mac.into()),
            backend: Some("vxlan".into()),
            pod_cidrs: vec![cidr.into()],
            addresses: vec![],
        }
    }

    fn verdicts() -> Verdicts {
        Verdicts::new(vec!["10.244.0.0/16".parse().unwrap()])
    }

    #[test]
    fn a_shared_mac_is_reported_once_on_the_younger_node_and_again_after_the_repeat() {
        let nodes = [
            node("node-1", 1, "0e:00:00:00:00:01", "10.244.1.0/24"),
            node("node-2", 2, "0e:00:00:00:00:01", "10.244.2.0/24"),
        ];
        let mut v = verdicts();
        let t0 = Instant::now();
        let (report, counts) = v.judge(&nodes, t0);
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].node, "node-2");
        assert!(report[0].to_string().contains("node-1"), "{}", report[0]);
        assert_eq!(counts.conflicts["vtep-mac"], 1);
        assert_eq!(counts.rejected["vtep-mac"], 1);
        assert!(v.judge(&nodes, t0 + Duration::from_secs(5)).0.is_empty(), "repeated at once");
        assert_eq!(v.judge(&nodes, t0 + REPEAT + Duration::from_secs(1)).0.len(), 1, "not repeated after REPEAT");
    }

    #[test]
    fn a_changed_or_returning_problem_is_news_and_a_bad_value_is_not_a_conflict() {
        let mut v = verdicts();
        let t0 = Instant::now();
        let mut bad = node("node-2", 2, "not-a-mac", "10.244.2.0/24");
        let good = node("node-1", 1, "0e:00:00:00:00:01", "10.244.1.0/24");
        let (report, counts) = v.judge([&good, &bad], t0);
        assert_eq!(report.len(), 1);
        assert_eq!(counts.conflicts.values().sum::<i64>(), 0);
        bad.pod_cidrs = vec!["10.99.0.0/24".into()];
        bad.vtep_mac = Some("0e:00:00:00:00:02".into());
        let (report, counts) = v.judge([&good, &bad], t0 + Duration::from_secs(1));
        assert_eq!(report.len(), 1, "a different problem on the same node");
        assert_eq!(counts.rejected["pod-cidr"], 1);
        bad.pod_cidrs = vec!["10.244.2.0/24".into()];
        assert!(v.judge([&good, &bad], t0 + Duration::from_secs(2)).0.is_empty());
        bad.vtep_mac = Some("bad".into());
        assert_eq!(v.judge([&good, &bad], t0 + Duration::from_secs(3)).0.len(), 1, "broken again");
    }

    #[test]
    fn every_gauge_label_is_present_at_zero() {
        let (_, counts) = verdicts().judge(&[], Instant::now());
        assert_eq!(counts.conflicts.len(), 3);
        assert_eq!(counts.rejected.len(), 3);
        assert!(counts.conflicts.values().chain(counts.rejected.values()).all(|v| *v == 0));
    }
}
