//! The Helm chart: lint, render and server-side dry-run for every example values file on the real apiserver;
//! bad values refused by values.schema.json; and the RBAC proof: the operator runs as the chart's ServiceAccount
//! (impersonated) through a scenario that needs every permission the chart grants, so a missing one fails here.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sharedlb::{LeaderElection, Settings};
use sharedlb_crds::{LoadBalancerPool, SharedLB};
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

const VALUES: [&str; 5] = [
    "values-local.yaml",
    "values-memory.yaml",
    "values-aws.yaml",
    "values-gcp.yaml",
    "values-azure.yaml",
];

/// The chart the 1.20 test cluster takes (the shipped one but for its kubeVersion gate).
fn chart() -> String {
    harness_chart()
}

fn shipped_chart() -> String {
    repo_root().join("charts/sharedlb").display().to_string()
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
        let d = yaml_docs(&yaml);
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
    let chart = shipped_chart();
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
        kind(&yaml_docs(&yaml), "PodDisruptionBudget")[0]["apiVersion"],
        "policy/v1"
    );
    let (ok, yaml, _) = render(
        "x",
        "sharedlb-system",
        &["-f", &file, "--set", "metrics.serviceMonitor.enabled=true"],
    )
    .await;
    assert!(ok && kind(&yaml_docs(&yaml), "ServiceMonitor").len() == 1);
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
        // what `auto` chooses on 1.24+ for a local pool: a Ready SharedLB then proves the Service status write
        backing_service: sharedlb::BackingService::LoadBalancerClass,
        ..Settings::default()
    };
    let op = Operator::start_with(&as_sa, &MemoryCloud::new(), settings);

    let ns = namespace(&admin, "rbac-user", &[("sharedlb", "allowed")]).await;
    let pool_name = format!("rbac-{}", &ns[ns.len() - 6..]);
    create_pool(
        &admin,
        &pool_name,
        json!({"provider": local_provider(&[format!("127.0.10.{}", fastrand::u8(10..250))]), "portRange": {"min": 4000, "max": 4999},
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
    // Events, as the ServiceAccount: a SharedLB naming no pool is told so by one
    create_slb(&admin, &ns, "lost", json!({"pool": "no-such-pool", "selector": {"app": "web"}, "ports": [{"name": "http", "targetPort": 80}]})).await;
    event_recorded(&admin, &ns, "lost", "PoolNotFound", 20).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_chart_refuses_kubernetes_older_than_1_32() {
    let _turn = SERIAL.lock().await;
    let memory = repo_root().join("examples/values-memory.yaml");
    let memory = memory.display().to_string();
    let chart = shipped_chart();
    for (version, accepted) in [
        ("1.20.2", false),
        ("1.31.9", false),
        ("1.32.0", true),
        ("1.36.4", true),
    ] {
        let (ok, _, err) = run_tool(
            "helm",
            &[
                "template",
                "x",
                &chart,
                "-f",
                &memory,
                "--kube-version",
                version,
            ],
            None,
        )
        .await;
        assert_eq!(ok, accepted, "kube {version}: {err}");
        if !accepted {
            assert!(err.contains("kubeVersion"), "kube {version}: {err}");
        }
    }
    // a real install on the 1.20 test cluster is refused: Helm 4 applies crds/ first (server-side, which 1.20
    // refuses for the CEL rules it does not know), and without them the kubeVersion gate refuses the chart
    let (ok, _, err) = run_tool(
        "helm",
        &["install", "too-old", &chart, "-n", "default", "-f", &memory],
        None,
    )
    .await;
    assert!(!ok && err.contains("x-kubernetes-validations"), "{err}");
    let (ok, _, err) = run_tool(
        "helm",
        &[
            "install",
            "too-old",
            &chart,
            "-n",
            "default",
            "-f",
            &memory,
            "--skip-crds",
        ],
        None,
    )
    .await;
    assert!(!ok, "helm install on 1.20 must be refused");
    assert!(
        err.contains("kubeVersion") && err.contains("v1.20.2"),
        "{err}"
    );
    let (_, releases, _) = run_tool("helm", &["list", "-n", "default", "-q"], None).await;
    assert!(
        !releases.contains("too-old"),
        "nothing was installed: {releases}"
    );
}

fn as_user(config: &kube::Config, user: &str) -> Client {
    let mut config = config.clone();
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".into()]);
    Client::try_from(config).expect("impersonating client")
}

fn is_forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(ref e)) if e.code == 403)
}

async fn bind_role(client: &Client, ns: &str, role: &str, user: &str) {
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{user}-{role}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .expect("rolebinding");
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &rb)
        .await
        .expect("create rolebinding");
}

/// Namespace editors (the built-in `edit` role, which the chart's tenant role aggregates into) manage SharedLBs
/// but cannot write their status or make pools; viewers read SharedLBs and pools and change nothing.
async fn tenants_get_exactly_their_rbac(admin: &Client) {
    let config = kube::Config::infer().await.expect("config");
    let ns = namespace(admin, "tenant", &[]).await;
    bind_role(admin, &ns, "edit", "alice").await;
    bind_role(admin, &ns, "view", "bob").await;
    let alice = as_user(&config, "alice");
    let bob = as_user(&config, "bob");
    let slb = shared_lb(
        &ns,
        "web",
        json!({"selector": {"app": "web"}, "ports": [{"name": "http", "targetPort": 80}]}),
    );
    // the clusterrole-aggregation controller fills `edit` from the chart's role shortly after install
    eventually(30, "a namespace editor may create a SharedLB", || async {
        Api::<SharedLB>::namespaced(alice.clone(), &ns)
            .create(&PostParams::default(), &slb)
            .await
            .ok()
    })
    .await;
    let alice_slbs = Api::<SharedLB>::namespaced(alice.clone(), &ns);
    let forged = json!({"status": {"pool": "someone-elses", "ports": [{"name": "http", "port": 53, "protocol": "UDP"}]}});
    assert!(
        is_forbidden(
            alice_slbs
                .patch_status("web", &PatchParams::default(), &Patch::Merge(&forged))
                .await
        ),
        "an editor must not write sharedlbs/status"
    );
    let relabel = json!({"metadata": {"labels": {"team": "a"}}});
    alice_slbs
        .patch("web", &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .expect("an editor updates a SharedLB");
    let pool: LoadBalancerPool = serde_json::from_value(json!({
        "metadata": {"name": "alices-pool"}, "spec": {"provider": {"memory": {}}}
    }))
    .expect("pool");
    let alice_pools = Api::<LoadBalancerPool>::all(alice.clone());
    assert!(
        is_forbidden(alice_pools.create(&PostParams::default(), &pool).await),
        "an editor must not make pools"
    );
    alice_pools
        .list(&Default::default())
        .await
        .expect("an editor reads pools");

    let bob_slbs = Api::<SharedLB>::namespaced(bob.clone(), &ns);
    bob_slbs.get("web").await.expect("a viewer reads SharedLBs");
    Api::<LoadBalancerPool>::all(bob.clone())
        .list(&Default::default())
        .await
        .expect("a viewer reads pools");
    let mut other = slb.clone();
    other.metadata.name = Some("bobs".into());
    assert!(
        is_forbidden(bob_slbs.create(&PostParams::default(), &other).await),
        "a viewer must not create"
    );
    assert!(
        is_forbidden(bob_slbs.delete("web", &DeleteParams::default()).await),
        "a viewer must not delete"
    );
    // nobody in the namespace may touch another namespace's SharedLBs
    assert!(is_forbidden(
        Api::<SharedLB>::namespaced(alice.clone(), "default")
            .list(&Default::default())
            .await
    ));
    alice_slbs
        .delete("web", &DeleteParams::default())
        .await
        .expect("an editor deletes");
    delete_namespace(admin, &ns).await;
}

/// Every object `helm get manifest` lists, as `kind/name` for kubectl (namespaced ones in `ns`).
async fn release_objects(release: &str, ns: &str) -> String {
    let (ok, manifest, err) = run_tool("helm", &["get", "manifest", release, "-n", ns], None).await;
    assert!(ok, "helm get manifest: {err}");
    manifest
}

async fn remaining(manifest: &str, ns: &str) -> String {
    let (ok, out, err) = run_tool(
        "kubectl",
        &[
            "get",
            "-f",
            "-",
            "-n",
            ns,
            "--ignore-not-found",
            "-o",
            "name",
        ],
        Some(manifest),
    )
    .await;
    assert!(ok, "kubectl get -f: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls_for_real() {
    let _turn = SERIAL.lock().await;
    let admin = client().await;
    let (release, ns) = ("it", "sharedlb-helm");
    let memory = repo_root()
        .join("examples/values-memory.yaml")
        .display()
        .to_string();
    let chart = chart();
    // the CRDs are in place (scripts/test-env applied them: the 1.20 cluster cannot take the CEL-bearing CRDs
    // by server-side apply, which Helm 4 uses; the 1.36 test applies them the way Helm does)
    let common = [
        "-n",
        ns,
        "-f",
        &memory,
        "--set",
        "pool.name=helm-it",
        "--set",
        "pool.default=false",
    ];
    let mut install = vec![
        "install",
        release,
        &chart,
        "--create-namespace",
        "--skip-crds",
    ];
    install.extend_from_slice(&common);
    let (ok, out, err) = run_tool("helm", &install, None).await;
    assert!(ok, "helm install: {out}{err}");
    let manifest = release_objects(release, ns).await;

    let deployments = Api::<Deployment>::namespaced(admin.clone(), ns);
    let d = deployments
        .get("it-sharedlb")
        .await
        .expect("the Deployment is installed");
    let spec = d.spec.expect("spec");
    assert_eq!(
        spec.replicas,
        Some(1),
        "values-memory.yaml sets one replica"
    );
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("it-sharedlb"));
    let pools = Api::<LoadBalancerPool>::all(admin.clone());
    let pool = pools.get("helm-it").await.expect("the chart's pool");
    assert!(pool.spec.provider.memory.is_some());

    tenants_get_exactly_their_rbac(&admin).await;

    let mut upgrade = vec![
        "upgrade",
        release,
        &chart,
        "--set",
        "replicaCount=2",
        "--set",
        "concurrency=32",
    ];
    upgrade.extend_from_slice(&common);
    let (ok, out, err) = run_tool("helm", &upgrade, None).await;
    assert!(ok, "helm upgrade: {out}{err}");
    let d = deployments.get("it-sharedlb").await.expect("Deployment");
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2), "the upgrade changed the Deployment");
    let args = spec.template.spec.expect("pod").containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(args.contains(&"--concurrency=32".to_string()), "{args:?}");
    let manifest_after = release_objects(release, ns).await;
    assert!(
        manifest_after.contains("kind: PodDisruptionBudget"),
        "two replicas get a PDB"
    );

    let (ok, out, err) = run_tool("helm", &["uninstall", release, "-n", ns], None).await;
    assert!(ok, "helm uninstall: {out}{err}");
    for m in [&manifest, &manifest_after] {
        let left = eventually(30, "nothing of the release is left", || async {
            let left = remaining(m, ns).await;
            left.trim().is_empty().then_some(left)
        })
        .await;
        assert_eq!(left.trim(), "");
    }
    let (ok, out, _) = run_tool(
        "kubectl",
        &["get", "secrets", "-n", ns, "-l", "owner=helm", "-o", "name"],
        None,
    )
    .await;
    assert!(
        ok && out.trim().is_empty(),
        "helm's release records are gone: {out}"
    );
    // the CRDs stay: Helm never deletes crds/, and deleting them would delete every SharedLB
    let (ok, out, err) = run_tool(
        "kubectl",
        &[
            "get",
            "crd",
            "sharedlbs.sharedlb.dev",
            "loadbalancerpools.sharedlb.dev",
            "-o",
            "name",
        ],
        None,
    )
    .await;
    assert!(ok && out.lines().count() == 2, "{out}{err}");
    delete_namespace(&admin, ns).await;
}
