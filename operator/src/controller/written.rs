//! Statuses this replica wrote, kept until its store shows them.
//!
//! A reconcile starts from the controller's store, which learns of a write one watch event later. The write's own
//! echo — or any event that arrives first, such as the backing Service's — starts another reconcile from the view
//! the write replaced, which would find the status "changed" and write it again. Such a view is known by its
//! resourceVersion: the reconcile uses the status written over it instead.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::ResourceExt;
use sharedlb_crds::{SharedLB, SharedLBStatus};

/// The resourceVersions a SharedLB's writes replaced, and the status last written.
#[derive(Debug)]
struct Written {
    replaced: Vec<String>,
    status: SharedLBStatus,
}

/// By uid.
#[derive(Debug, Default)]
pub struct WrittenStatuses(Mutex<HashMap<String, Written>>);

impl WrittenStatuses {
    /// `status` was written over the object as `view` saw it.
    pub fn record(&self, view: &SharedLB, status: &SharedLBStatus) {
        let (Some(uid), Some(rv)) = (view.uid(), view.resource_version()) else {
            return;
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = all.entry(uid).or_insert_with(|| Written {
            replaced: Vec::new(),
            status: status.clone(),
        });
        if !w.replaced.contains(&rv) {
            w.replaced.push(rv);
        }
        w.status = status.clone();
    }

    /// The object with what this replica last wrote as its status, when `view` predates that write. A view the
    /// writes did not replace is current (or newer): its entry is dropped and the view used as it is.
    pub fn freshen(&self, view: SharedLB) -> SharedLB {
        let (Some(uid), Some(rv)) = (view.uid(), view.resource_version()) else {
            return view;
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match all.get(&uid) {
            Some(w) if w.replaced.contains(&rv) => SharedLB {
                status: Some(w.status.clone()),
                ..view
            },
            Some(_) => {
                all.remove(&uid);
                view
            }
            None => view,
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

    fn pool_of(s: &SharedLB) -> Option<String> {
        s.status.as_ref().and_then(|st| st.pool.clone())
    }

    #[test]
    fn a_view_a_write_replaced_gets_the_written_status_until_a_newer_view_comes() {
        let written = WrittenStatuses::default();
        let placed = SharedLBStatus {
            pool: Some("p".into()),
            ..Default::default()
        };
        written.record(&at("1", None), &placed);
        written.record(&at("2", None), &placed);
        assert_eq!(
            pool_of(&written.freshen(at("1", None))).as_deref(),
            Some("p")
        );
        assert_eq!(
            pool_of(&written.freshen(at("2", None))).as_deref(),
            Some("p")
        );
        // the write's echo: the view is current, and the entry goes
        assert_eq!(
            pool_of(&written.freshen(at("3", Some("p")))).as_deref(),
            Some("p")
        );
        assert_eq!(pool_of(&written.freshen(at("1", None))), None, "forgotten");
    }

    #[test]
    fn an_object_never_written_is_left_as_it_is() {
        let written = WrittenStatuses::default();
        assert_eq!(
            pool_of(&written.freshen(at("1", Some("q")))).as_deref(),
            Some("q")
        );
    }
}
