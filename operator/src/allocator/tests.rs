use sharedlb_placement::{Plan, PortRequest, Protocol as P};
use sharedlb_providers::memory::{Faults, MemoryCloud, MemoryProvider};

use super::*;

/// An allocator of pool `p` on a memory cloud, its state built (as a rebuild would) but empty.
async fn allocator_on(cloud: &Arc<MemoryCloud>) -> PoolAllocator {
    let spec: LoadBalancerPoolSpec =
        serde_json::from_value(serde_json::json!({"provider": {"memory": {}}})).expect("spec");
    let provider = Arc::new(MemoryProvider::new(
        cloud.clone(),
        "c",
        "p",
        Faults::default(),
    ));
    let alloc = PoolAllocator::new("p", "pool-uid", "c", provider, spec.provider.clone());
    let config = pool_config(&alloc.pool, &spec, alloc.provider().as_ref(), true);
    *alloc.state.lock().await = Some(PoolState::new(config));
    alloc
}

/// Plans and applies one change, as a reconcile does under the state's lock.
async fn change(alloc: &PoolAllocator, c: Change) -> Plan {
    let mut guard = alloc.state.lock().await;
    let st = guard.as_mut().expect("state built");
    let plan = st.plan(&[c]);
    st.apply(&plan);
    plan
}

fn one_port(key: &str) -> Change {
    Change::Upsert {
        key: key.into(),
        ports: vec![PortRequest {
            name: "a".into(),
            port: None,
            protocol: P::Tcp,
        }],
    }
}

/// Two callers read the marked list (a release and the pool's reconcile both do); the first deletes and forgets
/// load balancer 0, a new SharedLB is then placed on a new load balancer 0. The second caller's stale list must
/// not delete it.
#[tokio::test]
async fn a_stale_list_of_marked_load_balancers_never_deletes_one_made_since() {
    let cloud = MemoryCloud::new();
    let alloc = allocator_on(&cloud).await;
    let placed = change(&alloc, one_port("first")).await;
    assert_eq!(placed.placed[0].1.lb, 0);
    alloc
        .provider()
        .ensure_load_balancer(&alloc.key(0))
        .await
        .expect("made");
    change(
        &alloc,
        Change::Remove {
            key: "first".into(),
        },
    )
    .await;
    let marked = alloc.peek(|st| st.deleting()).await.expect("state");
    assert_eq!(marked, vec![0], "the emptied load balancer is marked");
    let read_by_the_second_caller = marked.clone();

    alloc.delete_marked(marked).await.expect("deleted");
    assert!(cloud.load_balancers().is_empty());
    let placed = change(&alloc, one_port("second")).await;
    assert_eq!(placed.placed[0].1.lb, 0, "the index is taken again");
    alloc
        .provider()
        .ensure_load_balancer(&alloc.key(0))
        .await
        .expect("made again");

    alloc
        .delete_marked(read_by_the_second_caller)
        .await
        .expect("nothing to do");
    assert_eq!(
        cloud.load_balancers().len(),
        1,
        "the new load balancer stays"
    );
    assert!(alloc.peek(|st| st.allocation("second").is_some()).await == Some(true));
}
