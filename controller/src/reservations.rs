//! What a leader must hand on to the next: the pod CIDRs it is about to
//! write, and those whose write had an unknown outcome (a patch that timed
//! out may still land). Kept in an annotation on the Lease itself, written
//! *before* the patches go out, so a leader that dies or loses the Lease
//! mid-batch leaves them reserved for its successor. And the test a leader
//! passes before each batch: it holds the Lease, renewed within the renew
//! deadline, so it stops allocating before the Lease can pass to another.
//! Pure.

use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::coordination::v1::Lease;

pub const ANNOTATION: &str = "weir.dev/pending-allocations";

/// CIDRs being written to a Node, reserved until `until` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub node: String,
    pub cidrs: Vec<IpNet>,
    pub until: i64,
}

/// The reservations a Lease carries; an annotation that does not parse
/// (hand-edited) reserves nothing but is reported by the caller.
pub fn read(lease: &Lease) -> Result<Vec<Pending>, String> {
    let Some(text) = lease.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION)) else {
        return Ok(Vec::new());
    };
    serde_json::from_str(text).map_err(|e| format!("Lease annotation {ANNOTATION}: {e}"))
}

/// The merge patch that sets the reservations (or removes the annotation).
pub fn patch(pending: &[Pending]) -> serde_json::Value {
    let value = if pending.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(serde_json::to_string(pending).expect("reservations serialise"))
    };
    serde_json::json!({ "metadata": { "annotations": { ANNOTATION: value } } })
}

/// Drops expired reservations.
pub fn live(pending: Vec<Pending>, now: i64) -> Vec<Pending> {
    pending.into_iter().filter(|p| p.until > now).collect()
}

/// Whether `identity` may allocate now: it holds the Lease, and renewed it
/// less than `deadline` ago. The deadline is shorter than the Lease's
/// duration, as client-go's renew deadline is: a leader cut off from the API
/// server stops before another replica can take the Lease over.
pub fn may_allocate(lease: &Lease, identity: &str, deadline: Duration, now: i64) -> Result<(), String> {
    let spec = lease.spec.as_ref().ok_or("the Lease has no spec")?;
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => {}
        other => return Err(format!("the Lease is held by {}", other.unwrap_or("nobody"))),
    }
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second()).ok_or("the Lease was never renewed")?;
    let age = now - renewed;
    if age >= deadline.as_secs() as i64 {
        return Err(format!("the Lease was renewed {age} s ago, past the {} s renew deadline", deadline.as_secs()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn lease(holder: &str, renewed: i64, pending: Option<&[Pending]>) -> Lease {
        let mut l = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(p) = pending {
            let text = patch(p)["metadata"]["annotations"][ANNOTATION].as_str().unwrap().to_string();
            l.metadata.annotations = Some([(ANNOTATION.to_string(), text)].into());
        }
        l
    }

    fn pending(node: &str, cidr: &str, until: i64) -> Pending {
        Pending { node: node.into(), cidrs: vec![cidr.parse().unwrap()], until }
    }

    #[test]
    fn reservations_survive_the_lease_round_trip_and_expire() {
        let p = vec![pending("a", "10.244.1.0/24", 200), pending("b", "10.244.2.0/24", 90)];
        let got = read(&lease("x", 100, Some(&p))).unwrap();
        assert_eq!(got, p);
        assert_eq!(live(got, 100), vec![p[0].clone()]);
        assert_eq!(read(&lease("x", 100, None)).unwrap(), vec![]);
        assert!(patch(&[])["metadata"]["annotations"][ANNOTATION].is_null(), "an empty set removes the annotation");
        let mut broken = lease("x", 100, None);
        broken.metadata.annotations = Some([(ANNOTATION.to_string(), "{".to_string())].into());
        assert!(read(&broken).unwrap_err().contains(ANNOTATION));
    }

    #[test]
    fn only_the_holder_within_the_renew_deadline_may_allocate() {
        let deadline = Duration::from_secs(10);
        assert!(may_allocate(&lease("me", 100, None), "me", deadline, 105).is_ok());
        assert!(may_allocate(&lease("me", 100, None), "me", deadline, 110).unwrap_err().contains("renew deadline"));
        assert!(may_allocate(&lease("other", 100, None), "me", deadline, 101).unwrap_err().contains("held by other"));
    }
}
