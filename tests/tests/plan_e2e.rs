//! `sharedlb plan` (the binary, and as `kubectl sharedlb plan`) against a real apiserver with the operator
//! in-process: the plan changes nothing, and applying the planned SharedLBs in order gives exactly what it said.

use std::collections::BTreeMap;

use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sharedlb_crds::{LoadBalancerPool, SharedLB};
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

fn port(name: &str, port: Option<u16>, protocol: &str) -> Value {
    let mut p = json!({"name": name, "targetPort": 8080, "protocol": protocol});
    if let Some(n) = port {
        p["port"] = json!(n);
    }
    p
}

fn spec(name: &str, ports: &[Value]) -> Value {
    json!({"pool": "pln", "selector": {"app": name}, "ports": ports})
}

fn manifest(name: &str, ports: &[Value]) -> Value {
    json!({"apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB", "metadata": {"name": name},
           "spec": spec(name, ports)})
}

/// Runs the binary (`sharedlb plan ...`), or `kubectl` with it on PATH as the `kubectl-sharedlb` plugin, with
/// these environment variables.
async fn run(program: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().await.expect("run plan");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program:?} {args:?} failed: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (outcome, load balancer, "name:port/PROTO" sorted, reason) of each planned SharedLB, by name.
type Said = BTreeMap<String, (String, String, Vec<String>, String)>;

fn said(report: &Value) -> Said {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    report["sharedLbs"]
        .as_array()
        .expect("sharedLbs")
        .iter()
        .map(|p| {
            let mut ports: Vec<String> = p["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{}:{}/{}", s(&x["name"]), x["port"], s(&x["protocol"])))
                .collect();
            ports.sort();
            let row = (
                s(&p["outcome"]),
                s(&p["loadBalancer"]),
                ports,
                s(&p["reason"]),
            );
            (s(&p["name"]), row)
        })
        .collect()
}

/// The pool of this name in a report.
fn pool_named(report: &Value, name: &str) -> Value {
    let pools = report["pools"].as_array().expect("pools");
    let found = pools.iter().find(|p| p["name"] == name);
    found
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not in {report}"))
}

/// What the cluster shows for one SharedLB, in the plan's terms.
fn shown(slb: &SharedLB) -> (String, Vec<String>) {
    let st = slb.status.clone().unwrap_or_default();
    let mut ports: Vec<String> = st
        .ports
        .iter()
        .map(|p| format!("{}:{}/{}", p.name, p.port, p.protocol.as_str()))
        .collect();
    ports.sort();
    let lb = st.load_balancer.map(|l| l.name).unwrap_or_default();
    (lb, ports)
}

/// The chart's planner role bound to user `planner-<ns>`, and a kubeconfig that acts as that user (impersonation).
async fn planner_kubeconfig(ns: &str) -> String {
    let user = format!("planner-{ns}");
    let binding = format!("planners=[{{\"kind\":\"User\",\"name\":\"{user}\"}}]");
    let (ok, rendered, err) = run_tool(
        "helm",
        &[
            "template",
            ns,
            &harness_chart(),
            "--set",
            "pool.provider.kind=memory",
            "--set-json",
            &binding,
            "--show-only",
            "templates/rbac.yaml",
        ],
        None,
    )
    .await;
    assert!(ok, "helm template: {err}");
    let planner: Vec<String> = yaml_docs(&rendered)
        .into_iter()
        .filter(|d| {
            d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-planner"))
        })
        .map(|d| serde_json::to_string(&d).expect("json"))
        .collect();
    assert_eq!(
        planner.len(),
        2,
        "the chart's planner role and its binding: {rendered}"
    );
    let (ok, _, err) = run_tool("kubectl", &["apply", "-f", "-"], Some(&planner.join("\n"))).await;
    assert!(ok, "kubectl apply: {err}");
    let own = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let mut config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(own).expect("kubeconfig")).expect("yaml");
    for u in config["users"].as_array_mut().expect("users") {
        u["user"]["as"] = json!(user);
    }
    let path = std::env::temp_dir().join(format!("{ns}-planner.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write kubeconfig");
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn applying_the_planned_shared_lbs_in_order_gives_what_the_plan_said() {
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-plan", &[]).await;
    create_pool(
        &client,
        "pln",
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 2, "maxLoadBalancers": 3}}),
    )
    .await;
    create_slb(&client, &ns, "a", spec("a", &[port("web", None, "TCP")])).await;
    ready(&client, &ns, "a", 30).await;
    create_slb(
        &client,
        &ns,
        "b",
        spec("b", &[port("web", Some(10005), "TCP")]),
    )
    .await;
    ready(&client, &ns, "b", 30).await;
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    eventually(
        60,
        "the pool reports its limits and both SharedLBs",
        || async {
            let st = pools.get("pln").await.ok()?.status?;
            (st.limits.is_some() && st.totals.ports_used == 2).then_some(())
        },
    )
    .await;
    let pool_before = pools.get("pln").await.expect("pool").status;

    // in order: c opens pln-1; d's fixed 10000 is taken on pln-1 by c, so d opens pln-2; a may not grow on the
    // full pln-0; e asks for more than a load balancer holds; f takes pln-1's last port; g finds the pool full
    let plan: Vec<(&str, Vec<Value>)> = vec![
        ("c", vec![port("web", None, "TCP")]),
        (
            "d",
            vec![port("http", Some(10000), "TCP"), port("dns", None, "UDP")],
        ),
        (
            "a",
            vec![port("web", None, "TCP"), port("admin", None, "TCP")],
        ),
        (
            "e",
            vec![
                port("x", None, "TCP"),
                port("y", None, "TCP"),
                port("z", None, "TCP"),
            ],
        ),
        ("f", vec![port("web", None, "TCP")]),
        ("g", vec![port("web", None, "TCP")]),
    ];
    let docs: Vec<String> = plan
        .iter()
        .map(|(n, p)| serde_yaml::to_string(&manifest(n, p)).expect("yaml"))
        .collect();
    let file = std::env::temp_dir().join(format!("{ns}.yaml"));
    std::fs::write(&file, docs.join("---\n")).expect("write manifests");
    let file = file.to_string_lossy().into_owned();

    let args = ["plan", "-n", &ns, "-f", &file, "-o", "json"];
    let json_out = run(&sharedlb_bin(), &args, &[]).await;
    let report: Value = serde_json::from_str(&json_out).expect("plan json");
    let said = said(&report);
    let expect = |name: &str| {
        said.get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not planned: {json_out}"))
    };
    assert_eq!(expect("c").0, "Place");
    assert_eq!(expect("d").1, "pln-2", "{json_out}");
    assert_eq!(expect("a").3, "NoRoomToGrow");
    assert_eq!(expect("e").3, "TooManyPorts");
    assert_eq!(expect("g").3, "PoolFull");
    let pln = pool_named(&report, "pln");
    assert_eq!(
        pln["newLoadBalancers"],
        json!(["pln-1", "pln-2"]),
        "{json_out}"
    );

    // the same answer as a kubectl plugin, and a table for people
    let plugin_dir = std::env::temp_dir().join(format!("{ns}-plugin"));
    std::fs::create_dir_all(&plugin_dir).expect("plugin dir");
    let plugin = plugin_dir.join("kubectl-sharedlb");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(sharedlb_bin(), &plugin).expect("symlink plugin");
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut kubectl_args = vec!["sharedlb"];
    kubectl_args.extend(args);
    let via_kubectl = run(&tool("kubectl"), &kubectl_args, &[("PATH", path)]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&via_kubectl).expect("json"),
        report
    );
    // as a user who holds only the chart's planner role (list pools, SharedLBs, namespaces)
    let as_planner = planner_kubeconfig(&ns).await;
    let planned = run(
        &sharedlb_bin(),
        &args,
        &[("KUBECONFIG", as_planner.clone())],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&planned).expect("json"),
        report
    );
    let table = run(&sharedlb_bin(), &["plan", "-n", &ns, "-f", &file], &[]).await;
    assert!(
        table.contains("OUTCOME") && table.contains("PoolFull") && table.contains("1 -> 3"),
        "{table}"
    );

    // planning changed nothing
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    assert_eq!(pools.get("pln").await.expect("pool").status, pool_before);

    // now apply them, one after the other, and compare
    for (name, ports) in &plan {
        let (outcome, lb, planned_ports, reason) = expect(name);
        if *name == "a" {
            let p = json!({"spec": {"ports": ports}});
            api.patch(
                "a",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&p),
            )
            .await
            .expect("grow a");
        } else {
            create_slb(&client, &ns, name, spec(name, ports)).await;
        }
        let now = match outcome.as_str() {
            "Refused" => {
                refused(&client, &ns, name, &reason).await;
                api.get(name).await.expect("get")
            }
            _ => ready(&client, &ns, name, 30).await,
        };
        let (got_lb, got_ports) = shown(&now);
        if outcome == "Refused" && lb.is_empty() {
            assert!(
                got_ports.is_empty(),
                "{name} was refused yet holds {got_ports:?}"
            );
        } else {
            assert_eq!(
                (got_lb, got_ports),
                (lb, planned_ports),
                "{name}: the operator did otherwise than planned"
            );
        }
    }
    let after = pln["after"].clone();
    eventually(60, "the pool's figures are the plan's", || async {
        let t = pools.get("pln").await.ok()?.status?.totals;
        let now = json!({"loadBalancers": t.load_balancers, "portsUsed": t.ports_used, "headroom": t.headroom});
        let want = json!({"loadBalancers": after["loadBalancers"], "portsUsed": after["portsUsed"], "headroom": after["headroom"]});
        (now == want).then_some(())
    })
    .await;

    // b and c leave: pln-0 and pln-1 hold one port each; --compact moves f (the higher one's) onto pln-0
    for gone in ["b", "c"] {
        api.delete(gone, &Default::default()).await.expect("delete");
    }
    eventually(60, "b and c are gone", || async {
        let names: Vec<String> = api
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .map(|s| s.name_any())
            .collect();
        (!names.contains(&"b".to_string()) && !names.contains(&"c".to_string())).then_some(())
    })
    .await;
    let compact: Value = serde_json::from_str(
        &run(&sharedlb_bin(), &["plan", "--compact", "-o", "json"], &[]).await,
    )
    .expect("compaction json");
    let pln = pool_named(&compact, "pln");
    assert_eq!(pln["drain"], json!(["pln-1"]), "{pln}");
    assert_eq!(
        (
            pln["loadBalancersNow"].as_u64(),
            pln["loadBalancersAfter"].as_u64(),
            pln["lowerBound"].as_u64()
        ),
        (Some(3), Some(2), Some(2)),
        "{pln}"
    );
    let moves = pln["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), 1, "{pln}");
    assert_eq!(
        (
            moves[0]["sharedLb"].clone(),
            moves[0]["from"].clone(),
            moves[0]["to"].clone()
        ),
        (json!(format!("{ns}/f")), json!("pln-1"), json!("pln-0"))
    );

    let _ = std::fs::remove_dir_all(&plugin_dir);
    let _ = std::fs::remove_file(&as_planner);
    let _ = std::fs::remove_file(&file);
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "pln").await;
    op.kill().await;
}
