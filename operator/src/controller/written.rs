//! Statuses this replica wrote, kept until its store shows them.
//!
//! A reconcile starts from the controller's store, which learns of a write one watch event later. The write's own
//! echo — or any event that arrives first, such as the backing Service's — starts another reconcile from the view
//! the write replaced, which would find the status "changed" and write it again. Such a view is known by its
//! resourceVersion: the reconcile uses the status written over it instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use sharedlb_crds::{SharedLB, SharedLBStatus};

/// What a view is, next to this replica's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The object as it is (as far as this replica knows).
    Current,
    /// A version this replica's own status writes replaced or made: the reconcile that wrote it started from this
    /// very spec, and converged the cloud for it moments ago.
    Echo,
}

/// The resourceVersions a SharedLB's writes replaced (the views they were made over, and what each write but the
/// last made), the version the last write made, and the status it wrote.
#[derive(Debug)]
struct Written {
    replaced: Vec<String>,
    made: Option<String>,
    status: SharedLBStatus,
}

/// By uid.
#[derive(Debug, Default)]
pub struct WrittenStatuses(Mutex<HashMap<String, Written>>);

impl WrittenStatuses {
    /// `status` was written over the object as `view` saw it, making version `made`.
    pub fn record(&self, view: &SharedLB, status: &SharedLBStatus, made: Option<String>) {
        let (Some(uid), Some(rv)) = (view.uid(), view.resource_version()) else {
            return;
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = all.entry(uid).or_insert_with(|| Written {
            replaced: Vec::new(),
            made: None,
            status: status.clone(),
        });
        for old in [Some(rv), w.made.take()].into_iter().flatten() {
            if !w.replaced.contains(&old) {
                w.replaced.push(old);
            }
        }
        w.made = made;
        w.status = status.clone();
    }

    /// The object with what this replica last wrote as its status, when `view` predates that write (`Echo`). A
    /// view the writes did not replace is current (or newer): its entry is dropped and the view used as it is.
    pub fn freshen(&self, view: Arc<SharedLB>) -> (Arc<SharedLB>, Seen) {
        let (Some(uid), Some(rv)) = (view.uid(), view.resource_version()) else {
            return (view, Seen::Current);
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match all.get(&uid) {
            Some(w) if w.replaced.contains(&rv) => {
                let status = Some(w.status.clone());
                let freshened = SharedLB {
                    status,
                    ..(*view).clone()
                };
                (Arc::new(freshened), Seen::Echo)
            }
            Some(w) if w.made.as_ref() == Some(&rv) => {
                all.remove(&uid);
                (view, Seen::Echo)
            }
            Some(_) => {
                all.remove(&uid);
                (view, Seen::Current)
            }
            None => (view, Seen::Current),
        }
    }

    /// The object is gone.
    pub fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::shared_lb;

    fn at(rv: &str, pool: Option<&str>) -> SharedLB {
        let mut s = shared_lb("web")
            .port("http", None, sharedlb_crds::Protocol::Tcp)
            .build();
        s.metadata.uid = Some("u1".into());
        s.metadata.resource_version = Some(rv.into());
        s.status = Some(SharedLBStatus {
            pool: pool.map(str::to_string),
            ..Default::default()
        });
        s
    }

    fn pool_of((s, seen): (Arc<SharedLB>, Seen)) -> (Option<String>, Seen) {
        (s.status.as_ref().and_then(|st| st.pool.clone()), seen)
    }

    #[test]
    fn a_view_a_write_replaced_gets_the_written_status_until_a_newer_view_comes() {
        let written = WrittenStatuses::default();
        let st = |pool: &str| SharedLBStatus {
            pool: Some(pool.into()),
            ..Default::default()
        };
        // two writes from the view at version 1: the first made 2, the second 3
        written.record(&at("1", None), &st("allocated"), Some("2".into()));
        written.record(&at("1", None), &st("ready"), Some("3".into()));
        let ready = Some("ready".to_string());
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("1", None)))),
            (ready.clone(), Seen::Echo)
        );
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("2", Some("allocated"))))),
            (ready.clone(), Seen::Echo),
            "what the first write made is replaced by the second"
        );
        // the version the last write made: an echo as it is, and the entry goes
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("3", Some("ready"))))),
            (ready, Seen::Echo)
        );
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("1", None)))),
            (None, Seen::Current),
            "forgotten"
        );
    }

    #[test]
    fn a_version_someone_else_made_is_current() {
        let written = WrittenStatuses::default();
        let st = SharedLBStatus::default();
        written.record(&at("1", None), &st, Some("2".into()));
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("7", Some("edited"))))),
            (Some("edited".into()), Seen::Current)
        );
    }

    #[test]
    fn an_object_never_written_is_left_as_it_is() {
        let written = WrittenStatuses::default();
        assert_eq!(
            pool_of(written.freshen(Arc::new(at("1", Some("q"))))),
            (Some("q".into()), Seen::Current)
        );
    }
}
