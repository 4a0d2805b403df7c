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

use weir_common::nodes::{Change, NodeIndex, NodeInfo, Rejection};

use crate::alloc::{Allocator, Pool};
use crate::cli::Args;
use crate::metrics::Metrics;
use crate::verdicts::Verdicts;

/// A patch whose outcome is unknown may still land; its CIDRs stay reserved
/// this long, across rebuilds, before they may be handed out again.
const QUARANTINE: Duration = Duration::from_secs(120);
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = weir_common::kube_client(args.kubeconfig.as_deref()).await?;
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
        .with_grace(args.lease_duration.min(15) / 3)
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
            tokio::spawn(lead(
                Api::all(client.clone()),
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
    quarantine: Vec<(Vec<IpNet>, Instant)>,
    /// Nodes that found the pool full; tried again once a Node is deleted.
    exhausted: BTreeSet<String>,
    verdicts: Verdicts,
}

/// A Node's pod CIDRs, those that parse; the peer rules report the others.
fn cidrs(n: &NodeInfo) -> Vec<IpNet> {
    n.pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect()
}

async fn lead(api: Api<Node>, alloc: Allocator, verdicts: Verdicts, metrics: Arc<Metrics>, recorder: Recorder) {
    let mut st = State {
        alloc,
        held: BTreeMap::new(),
        index: NodeIndex::default(),
        quarantine: Vec::new(),
        exhausted: BTreeSet::new(),
        verdicts,
    };
    let stream =
        weir_common::watch::with_backoff(watcher::watcher(api.clone(), watcher::Config::default())).ready_chunks(1024);
    futures::pin_mut!(stream);
    while let Some(batch) = stream.next().await {
        // Whether any Node's weir fields changed, so the peer rules must run
        // again; whether a deleted Node freed CIDRs for those that found the
        // pool full.
        let (mut changed, mut freed) = (false, false);
        for ev in batch {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = %e, "node watch failed; retrying");
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
        if !need.is_empty() {
            allocate(&api, &mut st, need, &metrics, &recorder).await;
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
    st.quarantine.retain(|(_, since)| since.elapsed() < QUARANTINE);
    for (cidrs, _) in &st.quarantine {
        st.alloc.mark(cidrs);
    }
    info!(
        nodes = st.index.nodes().len(),
        held = st.held.len(),
        quarantined = st.quarantine.len(),
        "allocation map rebuilt from a full list"
    );
}

async fn allocate(api: &Api<Node>, st: &mut State, names: Vec<String>, metrics: &Metrics, recorder: &Recorder) {
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
    for (name, cidrs, r) in results {
        match r {
            Ok(Ok(_)) => {
                metrics.allocations.inc();
                info!(node = %name, cidrs = ?cidrs, "pod CIDRs allocated");
                st.held.insert(name, cidrs);
            }
            // The API server refused: nothing was written, so the CIDRs are free again.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 422 => {
                info!(node = %name, code = e.code, reason = %e.message, "allocation refused; CIDRs returned to the pool");
                st.alloc.release(&cidrs);
            }
            other => {
                // Unknown outcome: it may still land. Leaking beats handing the CIDR out twice.
                metrics.allocation_failures.inc();
                let error = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                warn!(node = %name, cidrs = ?cidrs, %error, "pod CIDR patch failed; CIDRs stay reserved until a later rebuild");
                st.quarantine.push((cidrs, Instant::now()));
            }
        }
    }
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
