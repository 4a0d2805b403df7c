//! The rules' verdicts kept from one Node event to the next, so that an
//! event costs in proportion to what it changed. Older nodes win conflicts,
//! so a change never alters the verdict on a node older than every node it
//! touches. When the changed nodes are the youngest of all (a node joining,
//! the newest node publishing its VTEP, the newest node leaving), only they
//! are judged again, against what the older nodes hold. One older node
//! changing or leaving (its MAC, its address) is judged alone too when no
//! rejected node wants what it held or asks for, so none waits for what it
//! gives up, and what it takes is held by nobody. Any other change (several
//! old nodes at once, a conflict, a re-list) judges every node again,
//! exactly as `Rules::validate` does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::rules::{Accepted, Held, Rules, Verdict, age_key};
use super::types::overlap;
use super::{Mac, NodeInfo};

pub struct IncrementalRules {
    rules: Rules,
    /// Each node's age key and verdict.
    verdicts: BTreeMap<String, (i64, Verdict)>,
    /// The nodes in age order.
    by_age: BTreeSet<(i64, String)>,
    held: Held,
    rejected: usize,
    skipped: usize,
    judged: usize,
}

impl IncrementalRules {
    pub fn new(rules: Rules) -> Self {
        let held = rules.held_by_local();
        IncrementalRules {
            rules,
            verdicts: BTreeMap::new(),
            by_age: BTreeSet::new(),
            held,
            rejected: 0,
            skipped: 0,
            judged: 0,
        }
    }

    /// Brings the verdicts up to date with `nodes`, given the names of the
    /// nodes added, changed or deleted since the last update (None: any may
    /// have, as after a re-list). Returns the names whose verdict changed,
    /// appeared or went away.
    pub fn update(
        &mut self,
        nodes: &BTreeMap<String, NodeInfo>,
        changed: Option<&BTreeSet<String>>,
    ) -> BTreeSet<String> {
        let Some(changed) = changed else { return self.judge_all(nodes) };
        if self.only_the_youngest(nodes, changed) {
            return self.judge_again(nodes, changed);
        }
        self.judge_in_place(nodes, changed).unwrap_or_else(|| self.judge_all(nodes))
    }

    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.verdicts.get(name).map(|(_, v)| v)
    }

    /// Every node's verdict, in name order: cheaper than age order, which
    /// looks each one up.
    pub fn by_name(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.values().map(|(_, v)| v)
    }

    /// The accepted nodes, oldest first, as a full validation lists them:
    /// what the tests compare with. The agent reads `by_name`.
    #[cfg(test)]
    pub fn accepted(&self) -> impl Iterator<Item = &Accepted> {
        self.in_age_order().filter_map(|v| match v {
            Verdict::Accepted(a) => Some(a),
            _ => None,
        })
    }

    /// The rejected nodes, oldest first (see `accepted`).
    #[cfg(test)]
    pub fn rejected(&self) -> impl Iterator<Item = &super::Rejection> {
        self.in_age_order().filter_map(|v| match v {
            Verdict::Rejected(r) => Some(r),
            _ => None,
        })
    }

    #[cfg(test)]
    fn in_age_order(&self) -> impl Iterator<Item = &Verdict> {
        self.by_age.iter().filter_map(|(_, name)| self.verdict(name))
    }

    pub fn rejected_count(&self) -> usize {
        self.rejected
    }

    pub fn skipped_count(&self) -> usize {
        self.skipped
    }

    /// How many nodes the last update judged.
    pub fn judged(&self) -> usize {
        self.judged
    }

    /// Whether every node the change touches, as it was and as it is, is
    /// younger than every node it leaves alone.
    fn only_the_youngest(&self, nodes: &BTreeMap<String, NodeInfo>, changed: &BTreeSet<String>) -> bool {
        let was = changed.iter().filter_map(|n| self.verdicts.get(n).map(|(created, _)| (*created, n.as_str())));
        let is = changed.iter().filter_map(|n| nodes.get(n)).filter(|n| !self.rules.is_local(&n.name)).map(age_key);
        let Some((created, name)) = was.chain(is).min() else { return true };
        self.by_age.range((created, name.to_string())..).all(|(_, n)| changed.contains(n))
    }

    fn judge_again(&mut self, nodes: &BTreeMap<String, NodeInfo>, changed: &BTreeSet<String>) -> BTreeSet<String> {
        let mut before: BTreeMap<String, Verdict> = BTreeMap::new();
        for name in changed {
            if let Some(verdict) = self.forget(name) {
                before.insert(name.clone(), verdict);
            }
        }
        let mut young: Vec<&NodeInfo> =
            changed.iter().filter_map(|n| nodes.get(n)).filter(|n| !self.rules.is_local(&n.name)).collect();
        young.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
        self.judged = young.len();
        for node in young {
            let verdict = self.rules.judge(node, &mut self.held);
            self.remember(node, verdict);
        }
        changed.iter().filter(|n| before.get(n.as_str()) != self.verdict(n)).cloned().collect()
    }

    /// One node, of any age, judged again where it stands. That is exact
    /// when no other rejected node wants a value this one held or now asks
    /// for (none waits for what it gives up, and no rejection would now name
    /// it first) and what it now holds no other node holds. None, with the
    /// verdicts as they were, otherwise.
    fn judge_in_place(
        &mut self,
        nodes: &BTreeMap<String, NodeInfo>,
        changed: &BTreeSet<String>,
    ) -> Option<BTreeSet<String>> {
        let name = changed.first().filter(|_| changed.len() == 1)?;
        let was_rejected = matches!(self.verdict(name), Some(Verdict::Rejected(_)));
        if self.rejected > usize::from(was_rejected) && self.a_rejected_node_wants(nodes, name) {
            return None;
        }
        let node = nodes.get(name).filter(|n| !self.rules.is_local(&n.name));
        let created_before = self.verdicts.get(name).map(|(created, _)| *created);
        let before = self.forget(name);
        let verdict = node.map(|n| self.rules.judge(n, &mut self.held));
        let younger = |owner: &String, n: &NodeInfo| {
            self.verdicts.get(owner).is_some_and(|(created, _)| (*created, owner.as_str()) > age_key(n))
        };
        if let (Some(n), Some(Verdict::Rejected(r))) = (node, &verdict)
            && r.held_by.as_ref().is_some_and(|owner| younger(owner, n))
        {
            // The younger node loses instead: every verdict after this one
            // may move. Put the old verdict back for judge_all to compare with.
            if let (Some(created), Some(v)) = (created_before, before) {
                self.verdicts.insert(name.clone(), (created, v));
            }
            return None;
        }
        self.judged = usize::from(node.is_some());
        if let (Some(n), Some(v)) = (node, verdict) {
            self.remember(n, v);
        }
        Some(if before.as_ref() != self.verdict(name) { changed.clone() } else { BTreeSet::new() })
    }

    /// Whether a rejected node other than `name` asks for a value that
    /// `name` held or asks for now: only such a node's verdict can follow
    /// from `name`'s change.
    fn a_rejected_node_wants(&self, nodes: &BTreeMap<String, NodeInfo>, name: &str) -> bool {
        let mut values = Vec::with_capacity(2);
        if let Some(Verdict::Accepted(a)) = self.verdict(name) {
            values.push(Values::of_accepted(a));
        }
        values.extend(nodes.get(name).map(Values::of_node));
        let rejected = self.verdicts.iter().filter(|(n, (_, v))| *n != name && matches!(v, Verdict::Rejected(_)));
        rejected.filter_map(|(n, _)| nodes.get(n)).map(Values::of_node).any(|r| values.iter().any(|v| v.meet(&r)))
    }

    fn judge_all(&mut self, nodes: &BTreeMap<String, NodeInfo>) -> BTreeSet<String> {
        let before = std::mem::take(&mut self.verdicts);
        self.by_age.clear();
        self.held = self.rules.held_by_local();
        (self.rejected, self.skipped) = (0, 0);
        let mut ordered: Vec<&NodeInfo> = nodes.values().filter(|n| !self.rules.is_local(&n.name)).collect();
        ordered.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
        self.judged = ordered.len();
        for node in ordered {
            let verdict = self.rules.judge(node, &mut self.held);
            self.remember(node, verdict);
        }
        let gone = before.keys().filter(|n| !self.verdicts.contains_key(*n));
        let moved =
            self.verdicts.iter().filter(|(n, (_, v))| before.get(*n).map(|(_, b)| b) != Some(v)).map(|(n, _)| n);
        gone.chain(moved).cloned().collect()
    }

    fn remember(&mut self, node: &NodeInfo, verdict: Verdict) {
        self.tally(&verdict, true);
        self.by_age.insert((node.created, node.name.clone()));
        self.verdicts.insert(node.name.clone(), (node.created, verdict));
    }

    /// Drops a node's verdict and gives up what it held.
    fn forget(&mut self, name: &str) -> Option<Verdict> {
        let (created, verdict) = self.verdicts.remove(name)?;
        self.by_age.remove(&(created, name.to_string()));
        if let Verdict::Accepted(a) = &verdict {
            self.held.release(a);
        }
        self.tally(&verdict, false);
        Some(verdict)
    }

    fn tally(&mut self, verdict: &Verdict, add: bool) {
        let count = match verdict {
            Verdict::Rejected(_) => &mut self.rejected,
            Verdict::Skipped(_) => &mut self.skipped,
            Verdict::Accepted(_) => return,
        };
        *count = if add { *count + 1 } else { *count - 1 };
    }
}

/// The values of a node that no two nodes may share, as far as they parse.
struct Values {
    ip: Option<IpAddr>,
    mac: Option<Mac>,
    cidrs: Vec<IpNet>,
}

impl Values {
    fn of_node(n: &NodeInfo) -> Self {
        Values {
            ip: n.public_ip.as_deref().and_then(|t| t.parse().ok()),
            mac: n.vtep_mac.as_deref().and_then(|t| t.parse().ok()),
            cidrs: n.pod_cidrs.iter().filter_map(|t| t.parse().ok()).collect(),
        }
    }

    fn of_accepted(a: &Accepted) -> Self {
        Values { ip: Some(a.underlay_ip), mac: a.vtep_mac, cidrs: a.pod_cidrs.clone() }
    }

    fn meet(&self, other: &Values) -> bool {
        (self.ip.is_some() && self.ip == other.ip)
            || (self.mac.is_some() && self.mac == other.mac)
            || self.cidrs.iter().any(|a| other.cidrs.iter().any(|b| overlap(a, b)))
    }
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
