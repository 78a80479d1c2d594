//! The memory provider passes the conformance suite, and its injected faults are real errors.

use std::sync::Arc;
use std::time::Duration;

use sharedlb_providers::memory::{Faults, MemoryCloud, MemoryProvider};
use sharedlb_providers::{LoadBalancerKey, LoadBalancerProvider, ProviderError};

#[tokio::test]
async fn memory_provider_is_conformant() {
    let cloud = MemoryCloud::new();
    sharedlb_providers::conformance::run(|pool| {
        let cloud = cloud.clone();
        async move {
            Arc::new(MemoryProvider::new(
                cloud,
                "conformance",
                &pool,
                Faults::default(),
            )) as Arc<dyn LoadBalancerProvider>
        }
    })
    .await;
    assert!(
        cloud.load_balancers().is_empty(),
        "the suite cleans up after itself"
    );
}

fn key(i: u32) -> LoadBalancerKey {
    LoadBalancerKey {
        cluster_id: "c".into(),
        pool: "p".into(),
        index: i,
    }
}

#[tokio::test]
async fn quota_and_injected_faults_surface_as_errors_by_meaning() {
    let cloud = MemoryCloud::new();
    let quota = Faults {
        load_balancer_quota: Some(1),
        ..Faults::default()
    };
    let p = MemoryProvider::new(cloud.clone(), "c", "p", quota);
    p.ensure_load_balancer(&key(0))
        .await
        .expect("first fits the quota");
    let err = p
        .ensure_load_balancer(&key(1))
        .await
        .expect_err("second is over quota");
    assert!(matches!(err, ProviderError::QuotaExceeded(_)), "{err}");
    assert_eq!(err.reason(), "CloudQuotaExceeded");

    let flaky = Faults {
        error_per_mille: 500,
        throttle_per_mille: 250,
        ..Faults::default()
    };
    let p = MemoryProvider::new(cloud.clone(), "c", "flaky", flaky);
    let (mut ok, mut throttled, mut failed) = (0, 0, 0);
    for i in 0..200 {
        let k = LoadBalancerKey {
            cluster_id: "c".into(),
            pool: "flaky".into(),
            index: i,
        };
        match p.ensure_load_balancer(&k).await {
            Ok(_) => {
                ok += 1;
                p.delete_load_balancer(&k).await.ok();
            }
            Err(ProviderError::Throttled { retry_after, .. }) => {
                assert!(retry_after > Duration::ZERO);
                throttled += 1
            }
            Err(ProviderError::Other(_)) => failed += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        ok > 10 && throttled > 10 && failed > 40,
        "ok {ok} throttled {throttled} failed {failed}"
    );
}

#[tokio::test]
async fn latency_is_added_to_calls() {
    let cloud = MemoryCloud::new();
    let slow = Faults {
        latency: Duration::from_millis(50),
        ..Faults::default()
    };
    let p = MemoryProvider::new(cloud, "c", "slow", slow);
    let t = std::time::Instant::now();
    p.ensure_load_balancer(&key(0)).await.expect("ensure");
    assert!(t.elapsed() >= Duration::from_millis(50));
}
