//! Leader election and the allocation loop. Only the Lease holder allocates,
//! and it allocates nothing before it has rebuilt its map from a full list.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::json;
use tracing::{info, warn};
use weir_common::http::{self, Response};

use k8s_openapi::api::coordination::v1::Lease;
use weir_common::nodes::{Change, NodeIndex, NodeInfo, Rejection};

use crate::alloc::{Allocator, Pool};
use crate::cli::Args;
use crate::metrics::Metrics;
use crate::reservations::{self, Pending};
use crate::verdicts::Verdicts;

/// A patch whose outcome is unknown may still land; its CIDRs stay reserved
/// this long, across rebuilds, before they may be handed out again.
const QUARANTINE: Duration = Duration::from_secs(120);

/// The Lease, as the leader checks and annotates it before each batch.
#[derive(Clone)]
struct LeaseRef {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// Renewed less than this long ago, or no allocation (see reservations).
    renew_deadline: Duration,
}
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a batch left Nodes without CIDRs for a reason that may pass (the
/// Lease not yet renewed after an outage, a patch with an unknown outcome),
/// they are tried again this soon, not at the next unrelated Node event.
const RETRY: Duration = Duration::from_secs(1);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = weir_common::kube_client(&args.api).await?;
    let metrics = Arc::new(Metrics::new());
    let pools = pools(&args)?;
    for p in &pools {
        let fam = family(p.is_v4());
        metrics.pool_size.with_label_values(&[fam]).set(i64::try_from(p.size()).unwrap_or(i64::MAX));
        // Only the leader knows what is used; a standby exports 0, not nothing.
        metrics.pool_used.with_label_values(&[fam]).set(0);
    }
    info!(
        version = env!("CARGO_PKG_VERSION"),
        cluster_cidr = ?args.cluster_cidr, v4_mask = args.node_cidr_mask_size_ipv4, v6_mask = args.node_cidr_mask_size_ipv6,
        "weir-controller starting"
    );
    serve_http(&args, metrics.clone()).await?;

    let identity = args.identity.clone().unwrap_or_else(|| format!("weir-controller-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration)
        // Renew at a third of the duration, and stop allocating at two
        // thirds: a cut-off leader stops before the Lease can expire and pass.
        .with_grace((args.lease_duration * 2 / 3).max(1))
        .build()
        .await
        .context("set up the Lease manager")?;
    let (mut leading, _lease_task) = manager.watch().await;
    let reporter = Reporter { controller: "weir-controller".into(), instance: Some(identity.clone()) };
    loop {
        while !*leading.borrow_and_update() {
            leading.changed().await.context("lease manager stopped")?;
        }
        info!(%identity, "became leader; rebuilding the allocation map from a full list");
        metrics.leader.set(1);
        let start = || {
            let recorder = Recorder::new(client.clone(), reporter.clone());
            let verdicts = Verdicts::new(args.cluster_cidr.clone());
            let lease = LeaseRef {
                api: Api::namespaced(client.clone(), &args.lease_namespace),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                renew_deadline: Duration::from_secs((args.lease_duration * 2 / 3).max(1)),
            };
            tokio::spawn(lead(
                Api::all(client.clone()),
                lease,
                Allocator { pools: pools.clone() },
                verdicts,
                metrics.clone(),
                recorder,
            ))
        };
        let mut work = start();
        loop {
            tokio::select! {
                r = &mut work => {
                    warn!(result = ?r, "allocation loop ended; restarting it");
                    work = start();
                }
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() {
                        break;
                    }
                }
            }
        }
        work.abort();
        metrics.leader.set(0);
        warn!(%identity, "lost the lease; allocation stopped");
    }
}

struct State {
    alloc: Allocator,
    /// What each Node holds, from the list and from our own successful patches.
    held: BTreeMap<String, Vec<IpNet>>,
    index: NodeIndex,
    lease: LeaseRef,
    /// CIDRs being written, or written with an unknown outcome: kept on the
    /// Lease too, so the next leader keeps them reserved.
    quarantine: Vec<Pending>,
    /// Nodes that found the pool full; tried again once a Node is deleted.
    exhausted: BTreeSet<String>,
    verdicts: Verdicts,
}

/// A Node's pod CIDRs, those that parse; the peer rules report the others.
fn cidrs(n: &NodeInfo) -> Vec<IpNet> {
    n.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect()
}

async fn lead(
    api: Api<Node>,
    lease: LeaseRef,
    alloc: Allocator,
    verdicts: Verdicts,
    metrics: Arc<Metrics>,
    recorder: Recorder,
) {
    // What the previous leader was writing stays reserved.
    let quarantine =
        match lease.api.get(&lease.name).await.map_err(|e| e.to_string()).and_then(|l| reservations::read(&l)) {
            Ok(pending) => reservations::live(pending, unix_now()),
            Err(e) => {
                warn!(error = %e, "cannot read the reservations on the Lease; relying on the full list");
                Vec::new()
            }
        };
    if !quarantine.is_empty() {
        info!(reserved = ?quarantine, "CIDRs a previous leader was writing stay reserved");
    }
    let mut st = State {
        alloc,
        held: BTreeMap::new(),
        index: NodeIndex::default(),
        lease,
        quarantine,
        exhausted: BTreeSet::new(),
        verdicts,
    };
    let stream =
        weir_common::watch::with_backoff(watcher::watcher(api.clone(), watcher::Config::default())).ready_chunks(1024);
    futures::pin_mut!(stream);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let batch = tokio::select! {
            batch = stream.next() => match batch {
                Some(batch) => batch,
                None => break,
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => Vec::new(),
        };
        retry_at = None;
        // Whether any Node's weir fields changed, so the peer rules must run
        // again; whether a deleted Node freed CIDRs for those that found the
        // pool full.
        let (mut changed, mut freed) = (false, false);
        for ev in batch {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = weir_common::with_causes(&e), "node watch failed; retrying");
                    continue;
                }
            };
            match st.index.apply(ev) {
                Some(Change::Relisted) => rebuild(&mut st),
                Some(Change::Changed { name, .. }) => track(&mut st, &name),
                Some(Change::Deleted(node)) => {
                    st.exhausted.remove(&node.name);
                    if let Some(cidrs) = st.held.remove(&node.name) {
                        st.alloc.release(&cidrs);
                        metrics.releases.inc();
                        info!(node = %node.name, cidrs = ?cidrs, "node deleted; pod CIDRs released");
                        freed = true;
                    }
                }
                None => continue,
            }
            changed = true;
        }
        if !st.index.is_complete() {
            continue;
        }
        // Every Node still without pod CIDRs, each batch: one whose patch
        // had an unknown outcome, or that found the pool full, gets another
        // try without waiting for its own next change.
        let need: Vec<String> = st
            .index
            .nodes()
            .values()
            .filter(|n| n.pod_cidrs.is_empty() && !st.held.contains_key(&n.name))
            .filter(|n| freed || !st.exhausted.contains(&n.name))
            .map(|n| n.name.clone())
            .collect();
        if !need.is_empty() && allocate(&api, &mut st, need, &metrics, &recorder).await == Outcome::TryAgain {
            retry_at = Some(tokio::time::Instant::now() + RETRY);
        }
        if changed {
            judge(&mut st, &metrics, &recorder).await;
        }
        update_pool_metrics(&st, &metrics);
    }
}

/// Takes note of the pod CIDRs a changed Node holds, whoever set them.
fn track(st: &mut State, name: &str) {
    let Some(node) = st.index.nodes().get(name) else { return };
    let held = cidrs(node);
    if held.is_empty() || st.held.get(name) == Some(&held) {
        return;
    }
    if let Some(old) = st.held.remove(name) {
        st.alloc.release(&old);
    }
    st.alloc.mark(&held);
    st.held.insert(name.to_string(), held);
}

/// Rebuilds the map from the list: everything any Node holds is used, plus
/// CIDRs of patches whose fate is still unknown.
fn rebuild(st: &mut State) {
    st.alloc.clear();
    st.held.clear();
    for v in st.index.nodes().values() {
        let held = cidrs(v);
        if !held.is_empty() {
            st.alloc.mark(&held);
            st.held.insert(v.name.clone(), held);
        }
    }
    st.quarantine = reservations::live(std::mem::take(&mut st.quarantine), unix_now());
    for p in &st.quarantine {
        st.alloc.mark(&p.cidrs);
    }
    info!(
        nodes = st.index.nodes().len(),
        held = st.held.len(),
        quarantined = st.quarantine.len(),
        "allocation map rebuilt from a full list"
    );
}

/// Whether a batch left Nodes to try again soon.
#[derive(PartialEq)]
enum Outcome {
    Done,
    TryAgain,
}

async fn allocate(
    api: &Api<Node>,
    st: &mut State,
    names: Vec<String>,
    metrics: &Metrics,
    recorder: &Recorder,
) -> Outcome {
    // Still the leader, renewed within the deadline? Checked against the
    // Lease itself, not this replica's belief, right before writing.
    let lease = match st.lease.api.get(&st.lease.name).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the Lease; not allocating");
            return Outcome::TryAgain;
        }
    };
    if let Err(why) = reservations::may_allocate(&lease, &st.lease.identity, st.lease.renew_deadline, unix_now()) {
        warn!(%why, "not allocating");
        return Outcome::TryAgain;
    }
    let mut planned = Vec::new();
    for name in names {
        if st.held.contains_key(&name) || !st.index.nodes().contains_key(&name) {
            continue;
        }
        match st.alloc.allocate() {
            Some(cidrs) => {
                st.exhausted.remove(&name);
                planned.push((name, cidrs));
            }
            None => {
                if st.exhausted.insert(name.clone()) {
                    metrics.pool_exhausted.inc();
                    warn!(node = %name, "pod CIDR pool exhausted; will retry when a node is deleted");
                    publish(
                        recorder,
                        &name,
                        EventType::Warning,
                        "PodCIDRPoolExhausted",
                        "Allocate",
                        "no free pod CIDR in --cluster-cidr",
                    )
                    .await;
                }
            }
        }
    }
    if planned.is_empty() {
        return Outcome::Done;
    }
    // Written ahead: if this replica dies or loses the Lease mid-batch, its
    // successor still keeps these CIDRs off the market.
    let until = unix_now() + QUARANTINE.as_secs() as i64;
    let mut pending = reservations::live(std::mem::take(&mut st.quarantine), unix_now());
    pending.extend(planned.iter().map(|(node, cidrs)| Pending { node: node.clone(), cidrs: cidrs.clone(), until }));
    if let Err(e) = annotate_lease(&st.lease, &pending).await {
        warn!(error = %e, "cannot record the reservations on the Lease; not allocating");
        for (_, cidrs) in &planned {
            st.alloc.release(cidrs);
        }
        st.quarantine = pending.into_iter().filter(|p| !planned.iter().any(|(n, _)| *n == p.node)).collect();
        return Outcome::TryAgain;
    }
    let results = futures::stream::iter(planned.into_iter().map(|(name, cidrs)| {
        let api = api.clone();
        async move {
            let patch = json!({ "spec": { "podCIDR": cidrs[0].to_string(), "podCIDRs": cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>() } });
            let r = tokio::time::timeout(PATCH_TIMEOUT, api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))).await;
            (name, cidrs, r)
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<_>>()
    .await;
    let mut outcome = Outcome::Done;
    for (name, cidrs, r) in results {
        match r {
            Ok(Ok(_)) => {
                metrics.allocations.inc();
                info!(node = %name, cidrs = ?cidrs, "pod CIDRs allocated");
                pending.retain(|p| p.node != name);
                st.held.insert(name, cidrs);
            }
            // The API server refused: nothing was written, so the CIDRs are free again.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 422 => {
                info!(node = %name, code = e.code, reason = %e.message, "allocation refused; CIDRs returned to the pool");
                pending.retain(|p| p.node != name);
                st.alloc.release(&cidrs);
            }
            other => {
                // Unknown outcome: it may still land. Leaking beats handing the CIDR out twice.
                metrics.allocation_failures.inc();
                let error = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                warn!(node = %name, cidrs = ?cidrs, %error, "pod CIDR patch failed; CIDRs stay reserved (on the Lease too)");
                outcome = Outcome::TryAgain;
            }
        }
    }
    // Best effort: a reservation left behind only expires later.
    if let Err(e) = annotate_lease(&st.lease, &pending).await {
        warn!(error = %e, "cannot update the reservations on the Lease");
    }
    st.quarantine = pending;
    outcome
}

async fn annotate_lease(lease: &LeaseRef, pending: &[Pending]) -> kube::Result<()> {
    let patch = reservations::patch(pending);
    lease.api.patch(&lease.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Runs the peer rules over every Node, as the agents do, and reports each
/// new rejection as a Warning Event on its Node.
async fn judge(st: &mut State, metrics: &Metrics, recorder: &Recorder) {
    let (report, counts) = st.verdicts.judge(st.index.nodes().values(), Instant::now());
    for (kind, n) in counts.conflicts {
        metrics.conflicts.with_label_values(&[kind]).set(n);
    }
    for (reason, n) in counts.rejected {
        metrics.rejected_nodes.with_label_values(&[reason]).set(n);
    }
    for r in report {
        report_rejection(recorder, &r).await;
    }
}

async fn report_rejection(recorder: &Recorder, r: &Rejection) {
    warn!(node = %r.node, field = r.field, value = %r.value, reason = r.reason, held_by = ?r.held_by, "node rejected as a peer");
    publish(recorder, &r.node, EventType::Warning, "WeirPeerRejected", "Validate", &r.to_string()).await;
}

async fn publish(recorder: &Recorder, node: &str, type_: EventType, reason: &str, action: &str, note: &str) {
    let mut obj = Node::default();
    obj.metadata.name = Some(node.to_string());
    let mut reference = obj.object_ref(&());
    // A Node's events carry its name as uid, as the kubelet's do: that is
    // what `kubectl describe node` looks them up by.
    reference.uid = Some(node.to_string());
    let ev = KEvent { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: None };
    if let Err(e) = recorder.publish(&ev, &reference).await {
        warn!(%node, error = %e, "cannot publish event");
    }
}

fn update_pool_metrics(st: &State, metrics: &Metrics) {
    for p in &st.alloc.pools {
        metrics.pool_used.with_label_values(&[family(p.is_v4())]).set(p.used() as i64);
    }
}

fn family(v4: bool) -> &'static str {
    if v4 { "ipv4" } else { "ipv6" }
}

fn pools(args: &Args) -> anyhow::Result<Vec<Pool>> {
    let v4: Vec<_> = args.cluster_cidr.iter().filter(|c| c.addr().is_ipv4()).collect();
    let v6: Vec<_> = args.cluster_cidr.iter().filter(|c| c.addr().is_ipv6()).collect();
    anyhow::ensure!(v4.len() <= 1 && v6.len() <= 1, "--cluster-cidr takes at most one IPv4 and one IPv6 range");
    let mut pools = Vec::new();
    if let Some(c) = v4.first() {
        pools.push(Pool::new(**c, args.node_cidr_mask_size_ipv4).with_context(|| format!("--cluster-cidr {c}"))?);
    }
    if let Some(c) = v6.first() {
        pools.push(Pool::new(**c, args.node_cidr_mask_size_ipv6).with_context(|| format!("--cluster-cidr {c}"))?);
    }
    Ok(pools)
}

async fn serve_http(args: &Args, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    http::bind_and_serve(args.metrics_addr, move |path| match path {
        "/metrics" => Response::metrics(metrics.render()),
        "/healthz" | "/readyz" => Response::text(200, "ok\n"),
        _ => Response::text(404, "not found\n"),
    })
    .await
    .with_context(|| format!("bind {}", args.metrics_addr))
}
