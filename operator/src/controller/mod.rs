//! The two controllers — SharedLB and LoadBalancerPool — and what they share.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::api::DynamicObject;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use sharedlb_crds::{
    LoadBalancerPool, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SERVICE_SUFFIX, SharedLB,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::allocator::PoolAllocator;
use crate::endpoints::{EndpointSlices, SERVICE_NAME_LABEL};
use crate::{Error, ProviderFactory};

mod pool;
mod shared_lb;
mod status;

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Put in every cloud object's tags/names, so two clusters can share an account.
    pub cluster_id: String,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
    /// The Events' reporting controller.
    pub controller_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_id: "default".into(),
            concurrency: 16,
            controller_name: "sharedlb".into(),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    recorder: Recorder,
    pools: Store<LoadBalancerPool>,
    slices: EndpointSlices,
    factory: Arc<dyn ProviderFactory>,
    allocators: Mutex<HashMap<String, Arc<PoolAllocator>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The allocator of a pool, made on first use (and again if the pool was deleted and made anew).
    async fn allocator(&self, pool: &LoadBalancerPool) -> Result<Arc<PoolAllocator>, Error> {
        let name = pool.name_any();
        let uid = pool.uid().unwrap_or_default();
        let mut all = self.allocators.lock().await;
        if let Some(a) = all.get(&name).filter(|a| a.pool_uid == uid) {
            return Ok(a.clone());
        }
        let provider = self
            .factory
            .make(&self.settings.cluster_id, &name, &pool.spec)?;
        let a = Arc::new(PoolAllocator::new(
            &name,
            &uid,
            &self.settings.cluster_id,
            provider,
        ));
        all.insert(name, a.clone());
        Ok(a)
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    match err {
        Error::Conflict => Action::requeue(Duration::from_millis(200)),
        Error::Provider(e) => Action::requeue(e.retry_after().unwrap_or(Duration::from_secs(300))),
        Error::Kube(_) | Error::Finalizer(_) | Error::Json(_) => {
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// Runs both controllers until `shutdown` resolves. The CRDs must be installed.
pub async fn run(
    client: Client,
    settings: Settings,
    factory: Arc<dyn ProviderFactory>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let pools_api: Api<LoadBalancerPool> = Api::all(client.clone());
    let slb_api: Api<SharedLB> = Api::all(client.clone());
    let (pools, writer) = reflector::store();
    let pool_reflector = reflector(
        writer,
        watcher(pools_api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let pool_reflector = tokio::spawn(pool_reflector);
    pools
        .wait_until_ready()
        .await
        .map_err(|e| Error::Finalizer(format!("pool store: {e}")))?;

    let slices = EndpointSlices::discover(&client).await?;
    let reporter = Reporter {
        controller: settings.controller_name.clone(),
        instance: None,
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        pools,
        slices: slices.clone(),
        factory,
        allocators: Mutex::new(HashMap::new()),
        settings: settings.clone(),
    });
    let shutdown = shutdown.shared();
    let config = ControllerConfig::default().concurrency(settings.concurrency);

    let slb_controller =
        Controller::new(slb_api.clone(), watcher::Config::default()).with_config(config.clone());
    let slb_store = slb_controller.store();
    let managed =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let slbs = slb_controller
        .owns(Api::<Service>::all(client.clone()), managed)
        // a pool that appears or changes retries the SharedLBs waiting on a pool
        .watches(
            pools_api.clone(),
            watcher::Config::default(),
            move |pool: LoadBalancerPool| {
                let name = pool.name_any();
                slb_store
                    .state()
                    .into_iter()
                    .filter(|s| {
                        !status::is_ready(s) && s.spec.pool.as_ref().is_none_or(|p| *p == name)
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        // endpoints changed: providers that forward to endpoints (local) update their listeners in place
        .watches_with(
            Api::<DynamicObject>::all_with(client.clone(), slices.resource()),
            slices.resource().clone(),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            |slice: DynamicObject| {
                let ns = slice.namespace()?;
                let svc = slice.labels().get(SERVICE_NAME_LABEL)?;
                let owner = svc.strip_suffix(SERVICE_SUFFIX)?;
                Some(ObjectRef::<SharedLB>::new(owner).within(&ns))
            },
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(shared_lb::reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "SharedLB reconcile failed");
            }
            futures::future::ready(())
        });

    let pool_config = config.debounce(Duration::from_millis(500));
    let pools_loop = Controller::new(pools_api, watcher::Config::default())
        .with_config(pool_config)
        // allocations change a pool's status: map each SharedLB to its pool (deduplicated by the queue)
        .watches(slb_api, watcher::Config::default(), |slb: SharedLB| {
            slb.status
                .and_then(|s| s.pool)
                .map(|p| ObjectRef::<LoadBalancerPool>::new(&p))
        })
        .graceful_shutdown_on(shutdown)
        .run(pool::reconcile, error_policy, ctx.clone())
        .for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "LoadBalancerPool reconcile failed");
            }
            futures::future::ready(())
        });

    info!(cluster_id = %settings.cluster_id, "sharedlb controllers started");
    futures::join!(slbs, pools_loop);
    pool_reflector.abort();
    info!("sharedlb controllers stopped");
    Ok(())
}
