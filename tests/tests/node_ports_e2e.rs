//! A cluster whose node-port range is full, on the real 1.20 apiserver. Its own test binary: it takes every free
//! node port of the test apiserver for a while, and cargo runs test binaries one after another, so no other test
//! runs meanwhile.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

/// A NodePort Service of someone else's, with `n` ports whose node ports the apiserver assigns.
fn foreign_service(name: &str, n: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            selector: Some([("app".to_string(), "nobody".to_string())].into()),
            ports: Some(
                (0..n)
                    .map(|i| ServicePort {
                        name: Some(format!("p{i}")),
                        port: 1000 + i,
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Takes every free node port with Services of 100, then 10, then 1 port; returns the one-port Services' names.
async fn fill_node_port_range(client: &Client, ns: &str) -> Vec<String> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut singles = Vec::new();
    let mut made = 0;
    for size in [100, 10, 1] {
        loop {
            let name = format!("fill-{made}");
            match api
                .create(&PostParams::default(), &foreign_service(&name, size))
                .await
            {
                Ok(_) => {
                    made += 1;
                    if size == 1 {
                        singles.push(name);
                    }
                }
                Err(kube::Error::Api(e)) if e.message.contains("range is full") => break,
                Err(e) => panic!("filling the node-port range: {e}"),
            }
        }
    }
    assert!(
        !singles.is_empty() || made > 0,
        "the range was full before the test"
    );
    singles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_port_range_is_a_condition_and_an_event_and_recovers_when_one_is_freed() {
    let client = client().await;
    let fill_ns = namespace(&client, "fill", &[]).await;
    // whatever the test does, the node ports are given back: other test binaries run after this one
    let body = tokio::spawn(full_range_then_one_freed(client.clone(), fill_ns.clone()));
    let outcome = body.await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(&fill_ns, &DeleteParams::default())
        .await;
    let services: Api<Service> = Api::namespaced(client.clone(), &fill_ns);
    eventually(60, "the filling Services are gone", || async {
        services
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn full_range_then_one_freed(client: Client, fill_ns: String) {
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "full", &[]).await;
    create_pool(&client, "full-range", json!({"provider": {"memory": {}}})).await;
    let singles = fill_node_port_range(&client, &fill_ns).await;
    let spec = json!({"pool": "full-range", "selector": {"app": "web"},
        "ports": [{"name": "http", "targetPort": 8080}]});
    create_slb(&client, &ns, "late", spec).await;

    let message = refused(&client, &ns, "late", "NodePortsExhausted").await;
    assert!(message.contains("range is full"), "{message}");
    assert!(message.contains("--service-node-port-range"), "{message}");
    event_recorded(&client, &ns, "late", "NodePortsExhausted", 10).await;
    // no retry storm: the refused SharedLB's status is not written again while nothing changes
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let before = api
        .get("late")
        .await
        .expect("get")
        .metadata
        .resource_version;
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let after = api
        .get("late")
        .await
        .expect("get")
        .metadata
        .resource_version;
    assert_eq!(before, after, "the refused status was written again");
    let events = event_reasons(&client, &ns, "late").await;
    let told = events.iter().filter(|r| *r == "NodePortsExhausted").count();
    assert_eq!(told, 1, "{events:?}");

    // one node port freed: served at the next retry (every 30 s)
    let freed = match singles.first() {
        Some(name) => name.clone(),
        None => "fill-0".into(),
    };
    Api::<Service>::namespaced(client.clone(), &fill_ns)
        .delete(&freed, &DeleteParams::default())
        .await
        .expect("free a node port");
    let slb = ready(&client, &ns, "late", 45).await;
    let node_port = slb.status.expect("status").ports[0].node_port;
    assert!(
        node_port.is_some_and(|p| (30000..=32767).contains(&p)),
        "{node_port:?}"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "full-range").await;
    op.kill().await;
}
