//! Fencing: the leader acts (allocates, writes statuses and Services, calls the cloud) only while it can prove
//! its lease is current. The proof is the last renewal of the Lease it has seen by itself: it holds until
//! `renewTime + duration - grace/2` on this process's clock — before any follower may take over, with half the
//! grace left for clock skew. The renewals come from kube-lease-manager every `duration - grace`; a watch on the
//! Lease sees each one. A process that was paused (SIGSTOP, a VM stall, a long GC-like stop) or cut off from the
//! apiserver wakes to a proof that has run out, and stops acting before its lease manager has even noticed, as
//! client-go's leader election does with its renew deadline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use sharedlb_providers::ProviderError;
use tracing::{info, warn};

use crate::Error;

/// Leader election on a `coordination.k8s.io/v1` Lease: only the holder allocates or calls the cloud.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    /// The lease is valid this long after its last renewal; a follower takes over within it.
    pub duration_secs: u64,
    /// The holder renews this long before expiry (the clock skew tolerated).
    pub grace_secs: u64,
}

/// Whether this replica may act now. Cheap to clone and to check.
#[derive(Debug, Clone)]
pub struct Fence {
    /// None: no leader election, always current.
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

impl Fence {
    /// The only replica: nothing to prove.
    pub fn open() -> Self {
        Fence { until: None }
    }

    /// Closed until a renewal by this identity is seen.
    pub fn closed() -> Self {
        Fence {
            until: Some(Arc::new(Mutex::new(None))),
        }
    }

    /// Ok while the lease is proven current; `Error::Fenced` once the proof has run out.
    pub fn check(&self) -> Result<(), Error> {
        if self.is_current() {
            Ok(())
        } else {
            Err(Error::Fenced)
        }
    }

    pub fn is_current(&self) -> bool {
        match &self.until {
            None => true,
            Some(u) => u
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| Instant::now() < t),
        }
    }

    /// The error a cloud call refused by the fence returns (nothing reached the cloud).
    pub fn refusal() -> ProviderError {
        ProviderError::Fenced(
            "this replica cannot prove it still holds the leader lease; it makes no change".into(),
        )
    }

    /// Resolves once the proof has run out (never without leader election). Checked against the clock at every
    /// poll, not only when its timer fires: after a pause, the first poll sees it.
    pub async fn lost(&self) {
        let Some(until) = &self.until else {
            return std::future::pending().await;
        };
        loop {
            let deadline = *until.lock().unwrap_or_else(|e| e.into_inner());
            match deadline {
                Some(t) if Instant::now() < t => tokio::time::sleep_until(t.into()).await,
                _ => return,
            }
        }
    }

    /// Runs `work` while the proof holds; once it runs out, `work` is dropped at its next await and
    /// `Error::Fenced` returned. A cloud call in several steps that began while the lease was proven stops with
    /// the proof, instead of finishing on a belief another leader may have overturned.
    pub async fn guard<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.check()?;
        tokio::select! {
            biased;
            _ = self.checked_every_poll() => Err(Error::Fenced),
            r = work => r,
        }
    }

    /// Ready as soon as a poll finds the proof run out, whatever the timers say.
    async fn checked_every_poll(&self) {
        let lost = self.lost();
        tokio::pin!(lost);
        std::future::poll_fn(|cx| {
            if !self.is_current() {
                return std::task::Poll::Ready(());
            }
            lost.as_mut().poll(cx)
        })
        .await
    }

    fn set(&self, until: Option<Instant>) {
        if let Some(u) = &self.until {
            *u.lock().unwrap_or_else(|e| e.into_inner()) = until;
        }
    }

    /// Follows the Lease until the process ends: each renewal by `le.identity` extends the proof, a Lease held
    /// by anyone else closes it at once.
    pub async fn follow(self, client: Client, le: LeaderElection) {
        let api: Api<Lease> = Api::namespaced(client, &le.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", le.lease_name));
        let valid_for = Duration::from_secs(le.duration_secs)
            .saturating_sub(Duration::from_secs(le.grace_secs) / 2);
        let mut leases = watcher(api, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = leases.next().await {
            match event {
                Ok(lease) => self.set(proof_until(&lease, &le.identity, valid_for)),
                // the proof simply runs out while the watch is broken
                Err(e) => warn!(error = %e, "watching the leader Lease failed; retrying"),
            }
        }
        info!("the leader Lease watch ended");
    }
}

/// Until when a Lease proves `identity` leads: its last renewal (on this clock) plus `valid_for`.
fn proof_until(lease: &Lease, identity: &str, valid_for: Duration) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed);
    // a renewal "in the future" (this clock stepped back) counts as now
    let age = Duration::try_from(age).unwrap_or_default();
    let left = valid_for.checked_sub(age)?;
    Some(Instant::now() + left)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    use super::*;

    fn lease(holder: &str, renewed_ago: Duration) -> Lease {
        let renewed = Timestamp::now() - SignedDuration::try_from(renewed_ago).expect("short");
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_fresh_renewal_proves_the_lease_until_before_it_can_be_taken() {
        let valid_for = Duration::from_secs(5);
        let until =
            proof_until(&lease("me", Duration::from_secs(1)), "me", valid_for).expect("current");
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_millis(3500) && left <= Duration::from_secs(4),
            "{left:?}"
        );
    }

    #[test]
    fn an_old_renewal_or_another_holder_proves_nothing() {
        let valid_for = Duration::from_secs(5);
        assert_eq!(
            proof_until(&lease("me", Duration::from_secs(6)), "me", valid_for),
            None
        );
        assert_eq!(
            proof_until(&lease("other", Duration::ZERO), "me", valid_for),
            None
        );
    }

    #[tokio::test]
    async fn guarded_work_stops_when_the_proof_runs_out() {
        let f = Fence::closed();
        f.set(Some(Instant::now() + Duration::from_millis(50)));
        let steps = std::sync::atomic::AtomicU32::new(0);
        let work = async {
            loop {
                steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        };
        assert!(matches!(f.guard(work).await, Err(Error::Fenced)));
        let done = steps.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (2..=8).contains(&done),
            "stopped with the proof: {done} steps"
        );
        assert!(
            Fence::open()
                .guard(async { Ok(7) })
                .await
                .is_ok_and(|v| v == 7)
        );
    }

    #[test]
    fn a_fence_runs_out_by_itself() {
        let f = Fence::closed();
        assert!(matches!(f.check(), Err(Error::Fenced)));
        f.set(Some(Instant::now() + Duration::from_millis(50)));
        assert!(f.check().is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!f.is_current(), "a paused process wakes fenced");
        assert!(Fence::open().is_current());
    }
}
