//! The Helm chart: lint, render and server-side dry-run for every example values file on the real apiserver;
//! bad values refused by values.schema.json; and the RBAC proof: the operator runs as the chart's ServiceAccount
//! (impersonated) through a scenario that needs every permission the chart grants, so a missing one fails here.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::{Value, json};
use sharedlb::{LeaderElection, Settings};
use sharedlb_crds::SharedLB;
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

const VALUES: [&str; 5] = [
    "values-local.yaml",
    "values-memory.yaml",
    "values-aws.yaml",
    "values-gcp.yaml",
    "values-azure.yaml",
];

fn chart() -> String {
    repo_root().join("charts/sharedlb").display().to_string()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

async fn ensure_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
}

async fn render(release: &str, ns: &str, extra: &[&str]) -> (bool, String, String) {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        &chart,
        "-n",
        ns,
        "--kube-version",
        "1.20.2",
    ];
    args.extend_from_slice(extra);
    run_tool("helm", &args, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lints_renders_and_dry_runs_for_every_example() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    ensure_namespace(&client, "sharedlb-system").await;
    for v in VALUES {
        let file = repo_root().join("examples").join(v).display().to_string();
        let (ok, out, err) = run_tool("helm", &["lint", &chart(), "-f", &file], None).await;
        assert!(ok, "helm lint {v}: {out}{err}");
        let (ok, yaml, err) = render("sharedlb", "sharedlb-system", &["-f", &file]).await;
        assert!(ok, "helm template {v}: {err}");
        let d = docs(&yaml);
        let deploy = kind(&d, "Deployment");
        assert_eq!(deploy.len(), 1, "{v}");
        let pod = &deploy[0]["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{v}");
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{v}");
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{v}"
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(args.contains(&"--leader-elect"), "{v}: {args:?}");
        // the pool's provider is exactly the one the values chose
        let chosen = v.trim_start_matches("values-").trim_end_matches(".yaml");
        let pool = kind(&d, "LoadBalancerPool");
        let providers: Vec<&String> = pool[0]["spec"]["provider"]
            .as_object()
            .expect("provider")
            .keys()
            .collect();
        assert_eq!(providers, vec![chosen], "{v}");
        // PodDisruptionBudget on 1.20 is policy/v1beta1
        for pdb in kind(&d, "PodDisruptionBudget") {
            assert_eq!(pdb["apiVersion"], "policy/v1beta1");
        }
        let (ok, out, err) = run_tool(
            "kubectl",
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&yaml),
        )
        .await;
        assert!(ok, "kubectl apply --dry-run=server {v}: {out}{err}");
        assert!(
            out.contains("deployment.apps/sharedlb created (server dry run)"),
            "{out}"
        );
    }
    // the same chart on a current cluster uses policy/v1
    let file = repo_root()
        .join("examples/values-aws.yaml")
        .display()
        .to_string();
    let chart = chart();
    let (ok, yaml, _) = run_tool(
        "helm",
        &[
            "template",
            "x",
            &chart,
            "-f",
            &file,
            "--kube-version",
            "1.33.0",
        ],
        None,
    )
    .await;
    assert!(ok);
    assert_eq!(
        kind(&docs(&yaml), "PodDisruptionBudget")[0]["apiVersion"],
        "policy/v1"
    );
    let (ok, yaml, _) = render(
        "x",
        "sharedlb-system",
        &["-f", &file, "--set", "metrics.serviceMonitor.enabled=true"],
    )
    .await;
    assert!(ok && kind(&docs(&yaml), "ServiceMonitor").len() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_fail_at_install_with_a_clear_message() {
    let cases: [(&[&str], &str); 5] = [
        (&[], "/pool/provider/kind"),
        (
            &["--set", "pool.provider.kind=bogus"],
            "/pool/provider/kind",
        ),
        (
            &[
                "--set",
                "pool.provider.kind=memory",
                "--set",
                "clusterId=Not_Valid",
            ],
            "/clusterId",
        ),
        (
            &[
                "--set",
                "pool.provider.kind=memory",
                "--set",
                "replicaCount=0",
            ],
            "/replicaCount",
        ),
        (
            &["--set", "pool.provider.kind=aws"],
            "pool.provider.aws.region is required",
        ),
    ];
    for (args, expect) in cases {
        let (ok, _, err) = render("x", "default", args).await;
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in: {err}"
        );
    }
    let (ok, _, err) = render("x", "default", &["--set", "pool.create=false"]).await;
    assert!(ok, "no pool, no provider needed: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_with_only_the_charts_rbac() {
    let _turn = SERIAL.lock().await;
    let admin = client().await;
    let ns_rbac = "sharedlb-rbac";
    ensure_namespace(&admin, ns_rbac).await;
    let (ok, yaml, err) = render("rbac", ns_rbac, &["--set", "pool.create=false"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = run_tool("kubectl", &["apply", "-f", "-"], Some(&yaml)).await;
    assert!(ok, "applying the chart: {out}{err}");

    // the operator, as the chart's ServiceAccount and nothing more
    let mut config = kube::Config::infer().await.expect("config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns_rbac}:rbac-sharedlb"));
    let as_sa = Client::try_from(config).expect("impersonating client");
    let settings = Settings {
        cluster_id: "rbac".into(),
        leader_election: Some(LeaderElection {
            lease_name: "rbac-sharedlb-leader".into(),
            namespace: ns_rbac.into(),
            identity: "rbac-test".into(),
            duration_secs: 10,
            grace_secs: 2,
        }),
        ..Settings::default()
    };
    let op = Operator::start_with(&as_sa, &MemoryCloud::new(), settings);

    let ns = namespace(&admin, "rbac-user", &[("sharedlb", "allowed")]).await;
    let pool_name = format!("rbac-{}", &ns[ns.len() - 6..]);
    create_pool(
        &admin,
        &pool_name,
        json!({"provider": {"local": {"addresses": [format!("127.0.10.{}", fastrand::u8(10..250))]}}, "portRange": {"min": 4000, "max": 4999},
               "namespaceSelector": {"matchLabels": {"sharedlb": "allowed"}}}),
    )
    .await;
    create_slb(&admin, &ns, "web", json!({"pool": pool_name, "selector": {"app": "web"}, "ports": [{"name": "http", "targetPort": 80}]})).await;
    let s = ready(&admin, &ns, "web", 60).await;
    let addr = external_addr(&s, None);
    // endpoints arriving after Ready reach the listener only through the EndpointSlice watch and list
    let backend = echo::tcp("rbac", 0).await.expect("backend");
    put_endpoints(&admin, &ns, "web", "http", "TCP", &[backend]).await;
    let reply = eventually(20, "bytes through, as the ServiceAccount", || async {
        echo::tcp_ask(addr, "r").await.ok()
    })
    .await;
    assert_eq!(reply, "rbac:r");
    event_recorded(&admin, &ns, "web", "Programmed", 20).await;
    let pools = Api::<sharedlb_crds::LoadBalancerPool>::all(admin.clone());
    eventually(20, "pool status written", || async {
        (pools.get(&pool_name).await.ok()?.status?.totals.ports_used == 1).then_some(())
    })
    .await;
    Api::<SharedLB>::namespaced(admin.clone(), &ns)
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(20, "the finalizer released", || async {
        Api::<SharedLB>::namespaced(admin.clone(), &ns)
            .get_opt("web")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    delete_namespace(&admin, &ns).await;
    delete_pool(&admin, &pool_name).await;
    op.kill().await;
    let (ok, out, err) = run_tool(
        "kubectl",
        &["delete", "-f", "-", "--wait=false"],
        Some(&yaml),
    )
    .await;
    assert!(ok, "{out}{err}");
}
