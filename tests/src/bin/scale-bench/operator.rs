//! The phases with the operator running: the burst of creates, quiet, restart, delete all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sharedlb_crds::{LoadBalancerPool, SharedLB};
use sharedlb_e2e::replica::sum;

use crate::census::Census;
use crate::process::OperatorProcess;
use crate::requests::{Call, Requests};
use crate::{Config, POOL, SETTLE, calm, each, ignore_not_found, shared_lb, until};

/// The pool carries its finalizer: its first reconcile is done, and SharedLBs can be placed in it.
pub async fn pool_finalized(client: &Client) -> anyhow::Result<()> {
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    until(Duration::from_secs(60), "the pool's finalizer", || async {
        Ok(!pools.get(POOL).await?.finalizers().is_empty())
    })
    .await
}

/// The operator phase: N SharedLBs created C at a time, until all are Ready.
#[derive(Debug)]
pub struct Burst {
    pub secs: f64,
    /// What the apiserver served meanwhile, the bench's own creates taken out.
    pub requests: Requests,
}

/// Phase 3 and 4: timed from the first create until the watch sees all N Ready; the apiserver's counters read
/// before the first create and once the last writes have landed.
pub async fn operator_burst(
    client: &Client,
    cfg: &Config,
    ns: &str,
    census: &mut Census,
) -> anyhow::Result<Burst> {
    let slbs: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    let before = calm(client).await?;
    let t0 = Instant::now();
    each(cfg.n, cfg.concurrency, |i| {
        let slbs = slbs.clone();
        async move {
            let spec = json!({"pool": POOL, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]});
            let slb = shared_lb(ns, &format!("b{i:05}"), spec)?;
            slbs.create(&PostParams::default(), &slb).await?;
            Ok(())
        }
    })
    .await?;
    let created = t0.elapsed().as_secs_f64();
    census
        .wait(cfg.patience(), "all SharedLBs Ready", |c| c.ready >= cfg.n)
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "scale: operator: {} SharedLBs created in {created:.2} s, all Ready in {secs:.2} s",
        cfg.n
    );
    tokio::time::sleep(SETTLE).await;
    let own = Requests::of([(Call::new("sharedlbs", "", "POST"), cfg.n as f64)]);
    let requests = Requests::scrape(client).await?.since(&before).minus(&own);
    Ok(Burst { secs, requests })
}

/// Phase 5: nothing changes for QUIET_SECS; what did the apiserver get written?
pub async fn quiet(client: &Client, cfg: &Config) -> anyhow::Result<Requests> {
    let before = Requests::scrape(client).await?;
    tokio::time::sleep(cfg.quiet).await;
    Ok(Requests::scrape(client).await?.since(&before))
}

/// A restart: how long until every SharedLB was reconciled once, and what it wrote meanwhile.
#[derive(Debug)]
pub struct Restart {
    pub secs: f64,
    pub requests: Requests,
    pub changed: Changed,
}

/// Phase 6: the operator (already stopped) starts again; timed from the start until its own metrics count N
/// SharedLB reconciles and none is under way. The SharedLBs are listed before and after (outside the counted
/// window) to tell what its writes changed.
pub async fn restart_operator(
    client: &Client,
    cfg: &Config,
    ns: &str,
) -> anyhow::Result<(OperatorProcess, Restart)> {
    let seen_before = look(client, ns).await?;
    let before = calm(client).await?;
    let t0 = Instant::now();
    let op = OperatorProcess::start(cfg).await?;
    let reconciled_all = || async {
        let m = op.metrics().await?;
        let done = sum(
            &m,
            "sharedlb_reconciles_total",
            &[r#"controller="sharedlb""#],
        );
        let running = sum(
            &m,
            "sharedlb_reconciles_in_flight",
            &[r#"controller="sharedlb""#],
        );
        Ok(done >= cfg.n as f64 && running == 0.0)
    };
    until(
        cfg.patience(),
        "every SharedLB reconciled after the restart",
        reconciled_all,
    )
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("scale: restart: all {} reconciled in {secs:.2} s", cfg.n);
    tokio::time::sleep(SETTLE).await;
    let requests = Requests::scrape(client).await?.since(&before);
    let changed = Changed::between(&seen_before, &look(client, ns).await?);
    Ok((
        op,
        Restart {
            secs,
            requests,
            changed,
        },
    ))
}

/// One SharedLB as listed: its resourceVersion, its load balancer's IP, and its status with that IP blanked out.
#[derive(Debug)]
pub struct Seen {
    pub version: String,
    pub ip: String,
    pub status_but_ip: String,
}

/// The SharedLBs of `ns` by name (one LIST).
pub async fn look(client: &Client, ns: &str) -> anyhow::Result<HashMap<String, Seen>> {
    let list = Api::<SharedLB>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut out = HashMap::new();
    for s in list.items {
        let ip = (s.status.as_ref())
            .and_then(|st| st.load_balancer.as_ref()?.ip.clone())
            .unwrap_or_default();
        let status = serde_json::to_string(&s.status)?;
        let seen = Seen {
            version: s.resource_version().unwrap_or_default(),
            status_but_ip: if ip.is_empty() {
                status
            } else {
                status.replace(&ip, "IP")
            },
            ip,
        };
        out.insert(s.name_any(), seen);
    }
    Ok(out)
}

/// SharedLBs whose object changed between two looks: their load balancer's IP alone, or anything else.
#[derive(Debug, Default)]
pub struct Changed {
    pub ip_only: usize,
    pub otherwise: usize,
}

impl Changed {
    pub fn between(before: &HashMap<String, Seen>, after: &HashMap<String, Seen>) -> Changed {
        let mut out = Changed::default();
        for (name, b) in before {
            match after.get(name) {
                Some(a) if a.version == b.version => {}
                Some(a) if a.status_but_ip == b.status_but_ip && a.ip != b.ip => out.ip_only += 1,
                _ => out.otherwise += 1,
            }
        }
        out
    }
}

/// Phase 9: all N deleted, C at a time, timed until the watch sees none left (the operator's finalizer done).
pub async fn delete_all(
    client: &Client,
    cfg: &Config,
    ns: &str,
    census: &mut Census,
) -> anyhow::Result<f64> {
    let slbs: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    let t0 = Instant::now();
    each(cfg.n, cfg.concurrency, |i| {
        let slbs = slbs.clone();
        async move {
            ignore_not_found(
                slbs.delete(&format!("b{i:05}"), &DeleteParams::default())
                    .await,
            )
        }
    })
    .await?;
    census
        .wait(cfg.patience(), "all SharedLBs gone", |c| c.present == 0)
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("scale: all {} deleted in {secs:.2} s", cfg.n);
    Ok(secs)
}
