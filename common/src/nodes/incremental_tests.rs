use super::*;
use crate::nodes::Skip;
use crate::nodes::fixtures::{agent_rules as rules, node};

/// Node i of a large cluster: every value its own, a /26 past the local /24.
fn member(i: u32) -> NodeInfo {
    let j = i + 4;
    node(
        &format!("node-{i:05}"),
        i64::from(i),
        &format!("198.18.{}.{}", i / 250, i % 250 + 1),
        &format!("0e:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
        &format!("10.244.{}.{}/26", j / 4, j % 4 * 64),
    )
}

/// The incremental verdicts equal a full validation of the same nodes.
fn assert_as_validated(inc: &IncrementalRules, nodes: &BTreeMap<String, NodeInfo>) {
    let full = rules().validate(nodes.values());
    assert_eq!(inc.accepted().cloned().collect::<Vec<_>>(), full.accepted);
    assert_eq!(inc.rejected().cloned().collect::<Vec<_>>(), full.rejected);
    assert_eq!(inc.skipped_count(), full.skipped.len());
    assert_eq!(inc.rejected_count(), full.rejected.len());
    for (name, skip) in &full.skipped {
        assert_eq!(inc.verdict(name), Some(&Verdict::Skipped(skip.clone())), "{name}");
    }
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn a_node_joining_a_large_cluster_is_judged_alone() {
    let mut nodes: BTreeMap<String, NodeInfo> = (0..1000).map(member).map(|n| (n.name.clone(), n)).collect();
    let mut inc = IncrementalRules::new(rules());
    assert_eq!(inc.update(&nodes, None).len(), 1000);
    assert_eq!(inc.judged(), 1000);

    // It joins without a VTEP, then publishes one.
    let mut joining = member(1000);
    joining.vtep_mac = None;
    nodes.insert(joining.name.clone(), joining.clone());
    assert_eq!(inc.update(&nodes, Some(&names(&["node-01000"]))), names(&["node-01000"]));
    assert_eq!((inc.judged(), inc.verdict("node-01000")), (1, Some(&Verdict::Skipped(Skip::Pending))));
    nodes.insert(joining.name.clone(), member(1000));
    assert_eq!(inc.update(&nodes, Some(&names(&["node-01000"]))), names(&["node-01000"]));
    assert_eq!(inc.judged(), 1);
    assert!(matches!(inc.verdict("node-01000"), Some(Verdict::Accepted(_))));
    assert_as_validated(&inc, &nodes);

    // The newest node leaving is judged alone too; nothing else moves.
    nodes.remove("node-01000");
    assert_eq!(inc.update(&nodes, Some(&names(&["node-01000"]))), names(&["node-01000"]));
    assert_eq!((inc.judged(), inc.verdict("node-01000")), (0, None));

    // An old node's new MAC, held by nobody: it alone is judged again.
    let mut old = member(3);
    old.vtep_mac = Some("0e:00:00:00:ff:03".into());
    nodes.insert(old.name.clone(), old);
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00003"]))), names(&["node-00003"]));
    assert_eq!(inc.judged(), 1);
    assert_as_validated(&inc, &nodes);

    // An old node leaving that kept nobody out: nobody is judged.
    nodes.remove("node-00007");
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00007"]))), names(&["node-00007"]));
    assert_eq!((inc.judged(), inc.verdict("node-00007")), (0, None));
    assert_as_validated(&inc, &nodes);

    // An old node taking a younger node's MAC can turn that node away: all
    // are judged again.
    let mut old = member(3);
    old.vtep_mac = member(500).vtep_mac;
    nodes.insert(old.name.clone(), old);
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00003"]))), names(&["node-00003", "node-00500"]));
    assert_eq!(inc.judged(), 999);
    assert!(
        matches!(inc.verdict("node-00500"), Some(Verdict::Rejected(r)) if r.held_by.as_deref() == Some("node-00003"))
    );
    assert_as_validated(&inc, &nodes);

    // While a node is rejected, an old node's change that touches nothing
    // it wants is still judged alone...
    let mut older = member(4);
    older.vtep_mac = Some("0e:00:00:00:ff:04".into());
    nodes.insert(older.name.clone(), older);
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00004"]))), names(&["node-00004"]));
    assert_eq!(inc.judged(), 1);
    assert_as_validated(&inc, &nodes);

    // ...and one that gives up what it waits for judges all again, and lets
    // it in.
    nodes.insert("node-00003".into(), member(3));
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00003"]))), names(&["node-00003", "node-00500"]));
    assert_eq!(inc.judged(), 999);
    assert!(matches!(inc.verdict("node-00500"), Some(Verdict::Accepted(_))));
    assert_as_validated(&inc, &nodes);

    // As does one that asks for a value a rejected node wants: the
    // rejection could now name it.
    let mut young = member(600);
    young.vtep_mac = member(599).vtep_mac;
    nodes.insert(young.name.clone(), young);
    inc.update(&nodes, Some(&names(&["node-00600"])));
    assert!(matches!(inc.verdict("node-00600"), Some(Verdict::Rejected(_))));
    let mut old = member(5);
    (old.public_ip, old.addresses) = (member(600).public_ip, member(600).addresses);
    nodes.insert(old.name.clone(), old);
    assert_eq!(inc.update(&nodes, Some(&names(&["node-00005"]))), names(&["node-00005", "node-00600"]));
    assert_eq!(inc.judged(), 999);
    assert!(
        matches!(inc.verdict("node-00600"), Some(Verdict::Rejected(r)) if r.held_by.as_deref() == Some("node-00005"))
    );
    assert_as_validated(&inc, &nodes);
}

/// A small deterministic generator: the sequences below need no more.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn every_sequence_of_changes_ends_where_a_full_validation_does() {
    // Few names and values, so that conflicts, skips and the local node's
    // CIDR come up often, in every position of the age order.
    // A wide spread of values, where conflicts are rare, takes the paths
    // that judge one node; a narrow one, the path that judges all.
    let mut rng = Lcg(7);
    let (mut judged_alone, mut beside_a_rejection) = (0, 0);
    for round in 0..400 {
        let spread = if round % 2 == 0 { 5 } else { 40 };
        let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
        let mut inc = IncrementalRules::new(rules());
        inc.update(&nodes, None);
        for _ in 0..30 {
            let mut changed = BTreeSet::new();
            for _ in 0..=rng.below(2) {
                let name = if rng.below(10) == 0 { "node-0".to_string() } else { format!("n{}", rng.below(8)) };
                if rng.below(4) == 0 {
                    nodes.remove(&name);
                } else {
                    let mut n = node(
                        &name,
                        nodes.get(&name).map_or(rng.below(6) as i64, |n| n.created),
                        &format!("198.18.0.{}", rng.below(spread) + 1),
                        &format!("0e:00:00:00:00:{:02x}", rng.below(spread) + 1),
                        &format!("10.244.{}.0/24", rng.below(spread)),
                    );
                    if rng.below(8) == 0 {
                        n.vtep_mac = None;
                    }
                    nodes.insert(name.clone(), n);
                }
                changed.insert(name);
            }
            let before: BTreeMap<String, Option<Verdict>> =
                nodes.keys().chain(&changed).map(|n| (n.clone(), inc.verdict(n).cloned())).collect();
            let moved = inc.update(&nodes, Some(&changed));
            judged_alone += usize::from(inc.judged() == 1 && nodes.len() > 3);
            beside_a_rejection += usize::from(inc.judged() == 1 && inc.rejected_count() > 1);
            assert_as_validated(&inc, &nodes);
            let really: BTreeSet<String> =
                before.iter().filter(|(n, v)| v.as_ref() != inc.verdict(n)).map(|(n, _)| n.clone()).collect();
            assert_eq!(moved, really, "the names reported as changed");
        }
    }
    assert!(judged_alone > 1000, "only {judged_alone} updates judged one node");
    assert!(beside_a_rejection > 100, "only {beside_a_rejection} updates judged one node beside rejected ones");
}
