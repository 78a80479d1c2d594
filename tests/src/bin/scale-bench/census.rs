//! Counting a namespace's SharedLBs (present, Ready) from one watch.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use sharedlb_crds::SharedLB;
use sharedlb_e2e::condition;
use tokio::sync::watch;

/// How many of one namespace's SharedLBs exist and how many are Ready, as one watch sees them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// The watch has listed them once.
    pub synced: bool,
    pub present: usize,
    pub ready: usize,
}

/// Follows the SharedLBs of a namespace with one watch (a LIST, then events): waiting on it costs the apiserver
/// nothing, where LISTing thousands of objects every few hundred ms would load it and bias the comparison.
#[derive(Debug)]
pub struct Census {
    pub counts: watch::Receiver<Counts>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Census {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Census {
    pub async fn follow(client: &Client, ns: &str) -> anyhow::Result<Census> {
        let (tx, rx) = watch::channel(Counts::default());
        let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
        let task = tokio::spawn(count(api, tx));
        let mut census = Census { counts: rx, task };
        census
            .wait(Duration::from_secs(30), "the watch's first list", |c| {
                c.synced
            })
            .await?;
        Ok(census)
    }

    pub async fn wait(
        &mut self,
        patience: Duration,
        what: &str,
        done: impl FnMut(&Counts) -> bool,
    ) -> anyhow::Result<()> {
        let waited = tokio::time::timeout(patience, self.counts.wait_for(done))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(r) => r.context("the watch ended"),
            Err(_) => bail!(
                "timed out after {} s waiting for {what}: {:?}",
                patience.as_secs(),
                *self.counts.borrow()
            ),
        }
    }
}

/// The watch behind a `Census`: keeps each SharedLB's readiness by name and publishes the counts.
pub async fn count(api: Api<SharedLB>, tx: watch::Sender<Counts>) {
    let mut ready_by_name: HashMap<String, bool> = HashMap::new();
    let mut relisted: Option<HashMap<String, bool>> = None;
    let mut counts = Counts::default();
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let is_ready = |s: &SharedLB| condition(s, "Ready").is_some_and(|c| c.0 == "True");
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(s)) => {
                relisted
                    .get_or_insert_default()
                    .insert(s.name_any(), is_ready(&s));
            }
            Ok(watcher::Event::InitDone) => {
                ready_by_name = relisted.take().unwrap_or_default();
                counts.synced = true;
                counts.ready = ready_by_name.values().filter(|r| **r).count();
            }
            Ok(watcher::Event::Apply(s)) => {
                let now = is_ready(&s);
                let was = ready_by_name.insert(s.name_any(), now).unwrap_or(false);
                counts.ready = counts.ready + usize::from(now) - usize::from(was);
            }
            Ok(watcher::Event::Delete(s)) => {
                let was = ready_by_name.remove(&s.name_any()).unwrap_or(false);
                counts.ready -= usize::from(was);
            }
            // the watcher retries by itself, with backoff
            Err(_) => continue,
        }
        counts.present = ready_by_name.len();
        tx.send_replace(counts);
    }
}
