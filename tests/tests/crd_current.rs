//! The CRDs on a current API server (1.36, `scripts/build-crd-apiserver`), which is what users run: every
//! supported Kubernetes compiles the CEL rules when the CRD is created and refuses the whole CRD if one does not
//! compile, validates formats and fields strictly, and applies CRDs server-side (Helm 4). The 1.20 test cluster
//! does none of that, so these promises are proven here. The server is CRD-only: no Namespaces, Services or RBAC,
//! so only `sharedlb.dev` documents go to it. Any warning from the server fails the test.

use serde_json::{Value, json};
use sharedlb_e2e::{SHIPPED_KUBE_VERSION, repo_root, run_tool, yaml_docs};

const CRDS: &str = "charts/sharedlb/crds/crds.yaml";

/// kubectl against the current server; fails the test on any warning the server sent.
async fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let kubeconfig = std::env::var("SHAREDLB_CURRENT_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "SHAREDLB_CURRENT_KUBECONFIG is not set: the current (1.36) CRD API server is not running. \
             Run the tests through scripts/test, which builds it (scripts/build-crd-apiserver) and starts it"
        )
    });
    let mut all = vec!["--kubeconfig", &kubeconfig];
    all.extend_from_slice(args);
    let (ok, out, err) = run_tool("kubectl", &all, stdin).await;
    assert!(
        !err.contains("Warning:"),
        "the server warned on `kubectl {}`: {err}",
        args.join(" ")
    );
    (ok, out, err)
}

async fn accepted(what: &str, doc: &Value) {
    let yaml = serde_yaml::to_string(doc).expect("yaml");
    let (ok, out, err) = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml)).await;
    assert!(ok, "{what} must be accepted: {out}{err}");
}

async fn refused(what: &str, doc: &Value, expected: &str) {
    let yaml = serde_yaml::to_string(doc).expect("yaml");
    let (ok, out, err) = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml)).await;
    assert!(!ok, "{what} must be refused, was: {out}");
    assert!(
        err.contains(expected),
        "{what}: expected {expected:?} in the refusal: {err}"
    );
}

fn slb(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB",
           "metadata": {"name": name, "namespace": "cel"}, "spec": spec})
}

fn pool(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "sharedlb.dev/v1alpha1", "kind": "LoadBalancerPool",
           "metadata": {"name": name}, "spec": spec})
}

/// One test: the steps share the server's state (the CRDs first), and each step says what it proves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crds_install_and_validate_on_a_current_api_server() {
    crds_install_the_way_helm_and_kubectl_apply_them().await;
    every_example_is_accepted().await;
    every_charts_pool_is_accepted().await;
    shared_lb_rules_refuse_what_they_must().await;
    pool_rules_refuse_what_they_must().await;
    a_pools_provider_identity_is_immutable().await;
    status_is_written_through_the_subresource().await;
}

async fn crds_install_the_way_helm_and_kubectl_apply_them() {
    let path = repo_root().join(CRDS).display().to_string();
    let (ok, version, err) = kubectl(&["version", "-o", "json"], None).await;
    assert!(ok, "{err}");
    assert!(
        version.contains("\"gitVersion\": \"v1.36."),
        "this test promises a 1.36 server: {version}"
    );
    // a user runs `kubectl apply -f`; Helm 4 installs crds/ by server-side apply: each on a server without them
    let established = [
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/sharedlbs.sharedlb.dev",
        "crd/loadbalancerpools.sharedlb.dev",
    ];
    // from a server without them (a rerun on the same server starts clean; deleting a CRD deletes its objects)
    let (ok, out, err) = kubectl(
        &["delete", "-f", &path, "--ignore-not-found", "--wait=true"],
        None,
    )
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = kubectl(&["apply", "-f", &path], None).await;
    assert!(ok, "kubectl apply of the CRDs: {out}{err}");
    let (ok, out, err) = kubectl(&established, None).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = kubectl(&["delete", "-f", &path, "--wait=true"], None).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = kubectl(&["apply", "--server-side", "-f", &path], None).await;
    assert!(ok, "server-side apply of the CRDs: {out}{err}");
    let (ok, out, err) = kubectl(&established, None).await;
    assert!(ok, "{out}{err}");
    // the descriptions reach `kubectl explain`
    let (ok, out, err) = kubectl(&["explain", "sharedlb.spec.ports.targetPort"], None).await;
    assert!(ok && out.contains("named container port"), "{out}{err}");
}

async fn every_example_is_accepted() {
    let mut applied = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in yaml_docs(&text) {
            let ours = doc["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("sharedlb.dev/"));
            if ours {
                accepted(
                    &format!("{} in {}", doc["metadata"]["name"], path.display()),
                    &doc,
                )
                .await;
                applied += 1;
            }
        }
    }
    assert!(
        applied >= 6,
        "examples/ holds the pools and SharedLBs: {applied} applied"
    );
}

async fn every_charts_pool_is_accepted() {
    let chart = repo_root().join("charts/sharedlb").display().to_string();
    for kind in ["aws", "gcp", "azure", "local", "memory"] {
        let values = repo_root().join(format!("examples/values-{kind}.yaml"));
        let values = values.display().to_string();
        let name = format!("--set=pool.name=chart-{kind}");
        let (ok, yaml, err) = run_tool(
            "helm",
            &[
                "template",
                "x",
                &chart,
                "-f",
                &values,
                &name,
                "--kube-version",
                "1.36.4",
            ],
            None,
        )
        .await;
        assert!(ok, "helm template {kind}: {err}");
        let pools: Vec<Value> = yaml_docs(&yaml)
            .into_iter()
            .filter(|d| d["kind"] == "LoadBalancerPool")
            .collect();
        assert_eq!(pools.len(), 1, "{kind}");
        accepted(&format!("the chart's {kind} pool"), &pools[0]).await;
    }
    let manifest = std::fs::read_to_string(repo_root().join("charts/sharedlb/Chart.yaml"))
        .expect("Chart.yaml");
    assert!(
        manifest.contains(SHIPPED_KUBE_VERSION),
        "the supported versions are the ones proven here"
    );
}

async fn shared_lb_rules_refuse_what_they_must() {
    let ok_ports = json!([{"name": "http", "targetPort": 8080}]);
    let spec = |ports: Value| json!({"selector": {"app": "web"}, "ports": ports});
    accepted("a plain SharedLB", &slb("web", spec(ok_ports.clone()))).await;
    accepted(
        "a 54-character name",
        &slb(&"w".repeat(54), spec(ok_ports.clone())),
    )
    .await;
    accepted(
        "one port on TCP and UDP, a named target",
        &slb(
            "dns",
            spec(json!([
            {"name": "dns-udp", "port": 53, "targetPort": "dns", "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "targetPort": "dns", "protocol": "TCP"}])),
        ),
    )
    .await;
    let dns1035 = "must be a DNS-1035 label";
    refused(
        "a dotted name",
        &slb("web.v1", spec(ok_ports.clone())),
        dns1035,
    )
    .await;
    refused(
        "a name starting with a digit",
        &slb("1web", spec(ok_ports.clone())),
        dns1035,
    )
    .await;
    refused(
        "a 55-character name",
        &slb(&"w".repeat(55), spec(ok_ports.clone())),
        dns1035,
    )
    .await;
    refused(
        "one fixed port twice on TCP",
        &slb(
            "twice",
            spec(json!([
            {"name": "a", "port": 5000, "targetPort": 80},
            {"name": "b", "port": 5000, "targetPort": 81, "protocol": "TCP"}])),
        ),
        "a fixed port may appear once per protocol",
    )
    .await;
    refused(
        "two ports with one name",
        &slb(
            "names",
            spec(json!([{"name": "a", "targetPort": 80}, {"name": "a", "targetPort": 81}])),
        ),
        "duplicate entries for key [name=\"a\"]",
    )
    .await;
    let target = "targetPort must be 1-65535 or a container port name";
    refused(
        "targetPort 0",
        &slb("t0", spec(json!([{"name": "a", "targetPort": 0}]))),
        target,
    )
    .await;
    refused(
        "targetPort 70000",
        &slb("t1", spec(json!([{"name": "a", "targetPort": 70000}]))),
        target,
    )
    .await;
    refused(
        "a bad port name as target",
        &slb(
            "t2",
            spec(json!([{"name": "a", "targetPort": "Not_A_Name"}])),
        ),
        target,
    )
    .await;
    refused(
        "port 70000",
        &slb(
            "p",
            spec(json!([{"name": "a", "port": 70000, "targetPort": 80}])),
        ),
        "65535",
    )
    .await;
    refused(
        "SCTP",
        &slb(
            "s",
            spec(json!([{"name": "a", "targetPort": 80, "protocol": "SCTP"}])),
        ),
        "Unsupported value",
    )
    .await;
    refused("no ports", &slb("none", spec(json!([]))), "spec.ports").await;
    refused(
        "an empty selector",
        &slb("sel", json!({"selector": {}, "ports": ok_ports.clone()})),
        "spec.selector",
    )
    .await;
    refused(
        "a bad CIDR",
        &slb("cidr", json!({"selector": {"app": "web"}, "ports": ok_ports.clone(), "sourceRanges": ["10.0.0.0/33"]})),
        "spec.sourceRanges[0]",
    )
    .await;
    // server-side apply refuses an undeclared field ("field not declared in schema"); a create refuses it by
    // strict field validation, which kubectl asks for
    let unknown = slb(
        "unknown",
        json!({"selector": {"app": "web"}, "ports": ok_ports, "bogus": 1}),
    );
    refused(
        "an unknown field",
        &unknown,
        ".spec.bogus: field not declared in schema",
    )
    .await;
    let yaml = serde_yaml::to_string(&unknown).expect("yaml");
    let (ok, _, err) = kubectl(&["create", "--dry-run=server", "-f", "-"], Some(&yaml)).await;
    assert!(
        !ok && err.contains("unknown field \"spec.bogus\""),
        "strict field validation: {err}"
    );
}

async fn pool_rules_refuse_what_they_must() {
    let local = |addresses: Value| json!({"provider": {"local": {"addresses": addresses}}});
    accepted(
        "a local pool",
        &pool("cel-local", local(json!(["127.0.0.10", "::1"]))),
    )
    .await;
    let concrete = "each address must be a concrete unicast IPv4 or IPv6 address";
    refused(
        "0.0.0.0",
        &pool("any4", local(json!(["0.0.0.0"]))),
        concrete,
    )
    .await;
    refused("::", &pool("any6", local(json!(["::"]))), concrete).await;
    for (what, address) in [
        ("multicast", "224.0.0.1"),
        ("broadcast", "255.255.255.255"),
        ("link-local (metadata)", "169.254.169.254"),
        ("IPv6 link-local", "fe80::1"),
    ] {
        refused(what, &pool("lane", local(json!([address]))), concrete).await;
    }
    accepted(
        "a local pool's fixed port ranges",
        &pool(
            "cel-fixed",
            json!({"provider": {"local": {"addresses": ["192.0.2.10"], "fixedPortRanges": [{"min": 443, "max": 443}],
                "endpointSliceManagers": ["metallb"], "allowLoopbackEndpoints": false}}}),
        ),
    )
    .await;
    refused(
        "a host name",
        &pool("host", local(json!(["localhost"]))),
        concrete,
    )
    .await;
    refused(
        "an inverted port range",
        &pool(
            "range",
            json!({"provider": {"memory": {}}, "portRange": {"min": 5000, "max": 4000}}),
        ),
        "min must not exceed max",
    )
    .await;
    refused(
        "two providers",
        &pool(
            "two",
            json!({"provider": {"memory": {}, "local": {"addresses": ["127.0.0.10"]}}}),
        ),
        "spec.provider",
    )
    .await;
    refused(
        "no provider",
        &pool("zero", json!({"provider": {}})),
        "spec.provider",
    )
    .await;
    refused(
        "a capacity of 0",
        &pool(
            "cap",
            json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 0}}),
        ),
        "maxPortsPerLoadBalancer",
    )
    .await;
}

async fn a_pools_provider_identity_is_immutable() {
    let kind_change = "the provider cannot change";
    accepted(
        "a memory pool",
        &pool("imm-kind", json!({"provider": {"memory": {}}})),
    )
    .await;
    refused(
        "memory -> local",
        &pool(
            "imm-kind",
            json!({"provider": {"local": {"addresses": ["127.0.0.10"]}}}),
        ),
        kind_change,
    )
    .await;
    let aws = |settings: Value| json!({"provider": {"aws": settings}});
    accepted(
        "an aws pool",
        &pool("imm-aws", aws(json!({"region": "eu-west-1"}))),
    )
    .await;
    let aws_identity = "region, vpcId and scheme cannot change";
    refused(
        "another region",
        &pool("imm-aws", aws(json!({"region": "us-east-1"}))),
        aws_identity,
    )
    .await;
    refused(
        "a vpcId added",
        &pool(
            "imm-aws",
            aws(json!({"region": "eu-west-1", "vpcId": "vpc-1"})),
        ),
        aws_identity,
    )
    .await;
    accepted(
        "a raised rule limit (not identity)",
        &pool(
            "imm-aws",
            aws(json!({"region": "eu-west-1", "securityGroupRuleLimit": 200})),
        ),
    )
    .await;
    let gcp = |project: &str| json!({"provider": {"gcp": {"project": project, "region": "europe-west1"}}});
    accepted("a gcp pool", &pool("imm-gcp", gcp("p1"))).await;
    refused(
        "another project",
        &pool("imm-gcp", gcp("p2")),
        "project, region and network cannot change",
    )
    .await;
    let azure = |location: &str| {
        json!({"provider": {"azure": {"subscriptionId": "s", "resourceGroup": "rg", "location": location,
                                      "networkSecurityGroup": "nsg", "virtualNetwork": "vnet"}}})
    };
    accepted("an azure pool", &pool("imm-azure", azure("westeurope"))).await;
    refused(
        "another location",
        &pool("imm-azure", azure("northeurope")),
        "subscriptionId, resourceGroup, location and loadBalancerName cannot change",
    )
    .await;
    // node groups: fixed once the pool exists, whether changed, added or removed
    let grouped = |groups: Option<u32>| {
        let mut p = azure("westeurope");
        if let Some(g) = groups {
            p["provider"]["azure"]["nodeGroups"] = json!(g);
        }
        p
    };
    accepted(
        "an azure pool of 2 node groups",
        &pool("imm-groups", grouped(Some(2))),
    )
    .await;
    let fixed = "nodeGroups cannot change";
    refused(
        "3 node groups",
        &pool("imm-groups", grouped(Some(3))),
        fixed,
    )
    .await;
    refused(
        "node groups left out",
        &pool("imm-groups", grouped(None)),
        fixed,
    )
    .await;
    refused(
        "node groups added",
        &pool("imm-azure", grouped(Some(2))),
        fixed,
    )
    .await;
}

async fn status_is_written_through_the_subresource() {
    let status = json!({"status": {
        "pool": "default", "loadBalancer": {"name": "default-0", "ip": "198.51.100.7"},
        "ports": [{"name": "http", "port": 10000, "nodePort": 30080, "protocol": "TCP"}],
        "portSummary": "10000/TCP", "serviceName": "web-sharedlb", "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "ok",
                        "lastTransitionTime": "2026-11-29T00:00:00Z", "observedGeneration": 1}]},
        // a spec change sent to the status subresource is dropped
        "spec": {"selector": {"app": "forged"}}});
    let patch = status.to_string();
    let (ok, out, err) = kubectl(
        &[
            "patch",
            "sharedlb",
            "web",
            "-n",
            "cel",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ],
        None,
    )
    .await;
    assert!(ok, "status patch: {out}{err}");
    let (ok, out, err) =
        kubectl(&["get", "sharedlb", "web", "-n", "cel", "-o", "json"], None).await;
    assert!(ok, "{err}");
    let got: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(got["status"]["loadBalancer"]["ip"], "198.51.100.7");
    assert_eq!(
        got["spec"]["selector"]["app"], "web",
        "the status subresource must not change spec"
    );
    let (ok, table, err) = kubectl(&["get", "slb", "web", "-n", "cel"], None).await;
    assert!(ok, "{err}");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "POOL", "EXTERNAL-IP", "PORTS", "READY", "AGE"]
    );
    assert!(
        table.contains("198.51.100.7") && table.contains("10000/TCP") && table.contains("True"),
        "{table}"
    );
    // the pool's status (integers written as int64) through its subresource, shown by the printer columns
    let pool_status = json!({"status": {"provider": "memory", "totals": {"loadBalancers": 1, "portsUsed": 3, "portsCapacity": 4294967295_u64},
        "loadBalancers": [{"name": "imm-kind-0", "portsUsed": 3, "capacity": 4294967295_u64}]}})
    .to_string();
    let (ok, out, err) = kubectl(
        &[
            "patch",
            "lbpool",
            "imm-kind",
            "--subresource=status",
            "--type=merge",
            "-p",
            &pool_status,
        ],
        None,
    )
    .await;
    assert!(ok, "pool status patch: {out}{err}");
    let (ok, table, err) = kubectl(&["get", "lbpool", "imm-kind"], None).await;
    assert!(ok && table.contains("4294967295"), "{table}{err}");
}
