//! The agent's HTTP endpoints and what its probes mean.
//!
//! The listener is bound first thing at start-up, before the agent has
//! reached the API server, so a liveness probe never meets a refused
//! connection while the agent waits for something outside it.
//!
//! Live (`/healthz`) means that the loop in charge keeps turning: first the
//! start-up loop that waits for the own Node, then the engine, which beats at
//! least every `engine::HEARTBEAT` even when it has nothing to do. A loop
//! stuck for `STALE_AFTER` (a netlink call that never returns, a deadlock)
//! is reported, and the kubelet restarts the container. The API server plays
//! no part: restarting an agent cannot bring it back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::engine::{EngineStatus, HEARTBEAT};
use crate::metrics::Metrics;
use crate::peers::publish::PeersReport;
use weir_common::http::{self, Response};

/// Three missed beats.
pub const STALE_AFTER: Duration = Duration::from_secs(HEARTBEAT.as_secs() * 3);

/// The time of the last turn of a loop, shared with whoever checks on it.
#[derive(Clone, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(unix_ms(), Ordering::Relaxed);
    }

    /// How long since the last beat; `None` before the first.
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(unix_ms().saturating_sub(at))),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the endpoints read. Filled in as start-up goes on.
#[derive(Default)]
pub struct Probes {
    pub heartbeat: Heartbeat,
    pub engine: OnceLock<watch::Receiver<EngineStatus>>,
    pub cni_written: AtomicBool,
    /// What start-up is waiting for, shown by `/readyz` until the engine runs.
    pub waiting_for: std::sync::Mutex<&'static str>,
    /// Set once the agent knows its own Node and judges the others.
    pub peers: OnceLock<PeersReport>,
}

impl Probes {
    pub fn waiting(&self, what: &'static str) {
        *self.waiting_for.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    fn healthz(&self) -> Response {
        match self.heartbeat.age() {
            Some(age) if age < STALE_AFTER => Response::text(200, "ok\n"),
            Some(age) => Response::text(503, format!("the agent's loop has not turned for {} s\n", age.as_secs())),
            None => Response::text(503, "the agent's loop has not started\n"),
        }
    }

    fn readyz(&self) -> Response {
        let Some(status) = self.engine.get() else {
            let what = *self.waiting_for.lock().unwrap_or_else(|e| e.into_inner());
            return Response::text(503, format!("starting: {what}\n"));
        };
        let s = status.borrow();
        let cni = self.cni_written.load(Ordering::Relaxed);
        if s.device_ready && s.synced && cni {
            Response::text(200, "ok\n")
        } else {
            Response::text(503, format!("device_ready={} synced={} cni_written={cni}\n", s.device_ready, s.synced))
        }
    }

    fn status(&self) -> Response {
        match self.engine.get() {
            Some(s) => Response::json(serde_json::to_string(&*s.borrow()).unwrap_or_default()),
            None => Response::json("{}".to_string()),
        }
    }

    fn peers(&self) -> Response {
        match self.peers.get() {
            Some(report) => Response::json(serde_json::to_string(&report.record()).expect("peers serialise")),
            None => Response::text(503, "the agent does not judge peers yet: it starts, or has no peer source\n"),
        }
    }
}

/// Binds the listener and serves `/metrics`, `/healthz`, `/readyz`,
/// `/status` and `/peers` from now on.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>, probes: Arc<Probes>) -> std::io::Result<()> {
    http::bind_and_serve(addr, move |path| match path {
        "/metrics" => {
            metrics.ready.set(i64::from(probes.readyz().code == 200));
            Response::metrics(metrics.render())
        }
        "/healthz" => probes.healthz(),
        "/readyz" => probes.readyz(),
        "/status" => probes.status(),
        "/peers" => probes.peers(),
        _ => Response::text(404, "not found\n"),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_only_while_the_loop_beats() {
        let probes = Probes::default();
        assert_eq!(probes.healthz().code, 503, "no loop has turned yet");
        probes.heartbeat.beat();
        assert_eq!(probes.healthz().code, 200);
        // A beat older than STALE_AFTER.
        let old = unix_ms() - STALE_AFTER.as_millis() as u64 - 1000;
        probes.heartbeat.0.store(old, Ordering::Relaxed);
        let r = probes.healthz();
        assert_eq!(r.code, 503);
        assert!(r.body.contains("has not turned"), "{}", r.body);
    }

    #[test]
    fn not_ready_says_what_start_up_waits_for() {
        let probes = Probes::default();
        probes.waiting("the own Node's spec.podCIDRs");
        let r = probes.readyz();
        assert_eq!(r.code, 503);
        assert!(r.body.contains("spec.podCIDRs"), "{}", r.body);
    }

    #[test]
    fn peers_are_served_once_the_agent_judges_them() {
        let probes = Probes::default();
        let r = probes.peers();
        assert_eq!(r.code, 503);
        assert!(r.body.contains("does not judge peers yet"), "{}", r.body);
        let validator = crate::peers::validate::Validator::for_tests();
        let _ = probes.peers.set(crate::peers::publish::PeersReport::new(validator, None));
        let r = probes.peers();
        assert_eq!(r.code, 200);
        let record: crate::peers::publish::PeersRecord = serde_json::from_str(&r.body).unwrap();
        assert_eq!(record.backend, crate::model::Backend::Vxlan);
    }
}
