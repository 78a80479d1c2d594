//! The operator's container image (`scripts/image` builds it from the repository's Dockerfile), run the way a
//! kubelet runs the chart's pod, against the real test apiserver: the rendered container's args and env (the
//! downward API resolved), its securityContext as podman flags, and the in-cluster config a pod gets (the
//! KUBERNETES_SERVICE_* variables and the chart's ServiceAccount token, made by the real controller-manager,
//! mounted read-only where kube-rs looks for it). Then what the kernel says about the process (uid, capabilities,
//! no_new_privs, read-only root), /readyz, /metrics, the leader Lease, and a SharedLB made Ready through it.
//!
//! podman runs with runc, cgroupfs and no default ulimits (see `podman_conf`): what this machine allows. The
//! container shares the host's network (the apiserver listens on 127.0.0.1), unlike the chart's pod.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use sharedlb_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELEASE: &str = "img";
const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The image `scripts/image` tags (SHAREDLB_IMAGE for another).
fn image() -> String {
    std::env::var("SHAREDLB_IMAGE").unwrap_or_else(|_| "localhost/sharedlb:dev".into())
}

/// podman's settings for this machine: runc (crun refuses its hybrid cgroups), cgroupfs, and no default
/// RLIMIT_NOFILE raise (denied here). A CONTAINERS_CONF already set wins.
fn podman_conf(dir: &Path) -> PathBuf {
    if let Some(c) = std::env::var_os("CONTAINERS_CONF") {
        return PathBuf::from(c);
    }
    let conf = dir.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n",
    )
    .expect("containers.conf");
    conf
}

/// Runs podman; returns (success, stdout, stderr), or None when podman cannot be run at all.
fn try_podman(conf: &Path, args: &[&str]) -> Option<(bool, String, String)> {
    let out = Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", conf)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Runs podman; returns (success, stdout, stderr). Fails, naming `scripts/image`, when podman is not installed.
fn podman(conf: &Path, args: &[&str]) -> (bool, String, String) {
    try_podman(conf, args).unwrap_or_else(|| {
        panic!("podman could not be run: run scripts/image, which installs it and builds the image (scripts/test does)")
    })
}

/// kubectl, best effort, for the cleanup (which must not panic: `tool` would when kubectl is missing).
fn kubectl_sync(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let dir = std::env::var_os("SHAREDLB_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sharedlb/bin")
        });
    let Ok(mut child) = Command::new(dir.join("kubectl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    if let (Some(input), Some(mut si)) = (stdin, child.stdin.take()) {
        let _ = si.write_all(input.as_bytes());
    }
    let _ = child.wait();
}

/// Removes the container and what the test made in the apiserver, also when the test panics: then it first
/// shows the operator's log and lets the operator finish the SharedLBs and the pool (its finalizers), or drops
/// the finalizers when it cannot.
struct Cleanup {
    conf: PathBuf,
    dir: PathBuf,
    container: Option<String>,
    applied: Option<String>,
    pool: Option<String>,
    namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(c) = &self.container {
                let (_, out, err) =
                    try_podman(&self.conf, &["logs", "--tail", "80", c]).unwrap_or_default();
                eprintln!("--- the operator's log (last 80 lines) ---\n{out}\n{err}\n---");
            }
            let unblock = r#"{"metadata":{"finalizers":null}}"#;
            for ns in &self.namespaces {
                kubectl_sync(
                    &["delete", "sharedlbs", "--all", "-n", ns, "--timeout=30s"],
                    None,
                );
                kubectl_sync(
                    &[
                        "patch",
                        "sharedlbs",
                        "--all",
                        "-n",
                        ns,
                        "--type=merge",
                        "-p",
                        unblock,
                    ],
                    None,
                );
            }
            if let Some(p) = &self.pool {
                kubectl_sync(
                    &["delete", "lbpool", p, "--ignore-not-found", "--timeout=30s"],
                    None,
                );
                kubectl_sync(&["patch", "lbpool", p, "--type=merge", "-p", unblock], None);
            }
        }
        if let Some(c) = &self.container {
            let _ = try_podman(&self.conf, &["rm", "-f", c]);
        }
        if let Some(yaml) = &self.applied {
            kubectl_sync(
                &["delete", "-f", "-", "--ignore-not-found", "--wait=false"],
                Some(yaml),
            );
        }
        for ns in &self.namespaces {
            kubectl_sync(
                &[
                    "delete",
                    "namespace",
                    ns,
                    "--ignore-not-found",
                    "--wait=false",
                ],
                None,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// GET over HTTP/1.0: (status, body).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// `Key:\tvalue` lines of /proc/<pid>/status.
fn proc_status(pid: &str, key: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The podman flags for the container's securityContext (over the pod's), as a kubelet would apply it.
fn security_flags(pod: &Value, c: &Value) -> (Vec<String>, (i64, i64)) {
    let (psc, csc) = (&pod["securityContext"], &c["securityContext"]);
    let pick = |k: &str| {
        if csc[k].is_null() {
            psc[k].clone()
        } else {
            csc[k].clone()
        }
    };
    let uid = pick("runAsUser")
        .as_i64()
        .expect("the chart sets runAsUser");
    let gid = pick("runAsGroup")
        .as_i64()
        .expect("the chart sets runAsGroup");
    assert_eq!(
        pick("runAsNonRoot"),
        true,
        "the chart's pod must demand a non-root user"
    );
    assert_ne!(uid, 0, "runAsUser must not be root");
    assert_ne!(gid, 0, "runAsGroup must not be root");
    assert_eq!(
        (uid, gid),
        (65532, 65532),
        "the chart runs as distroless's nonroot"
    );
    let mut flags = vec!["--user".to_string(), format!("{uid}:{gid}")];
    assert_ne!(
        csc["privileged"], true,
        "the chart's container is not privileged"
    );
    if csc["readOnlyRootFilesystem"] == true {
        // a kubelet mounts no tmpfs over /tmp: nor does podman with --read-only-tmpfs=false
        flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    for cap in csc["capabilities"]["drop"].as_array().into_iter().flatten() {
        flags.extend(["--cap-drop".into(), cap.as_str().expect("cap").to_string()]);
    }
    for cap in csc["capabilities"]["add"].as_array().into_iter().flatten() {
        flags.extend(["--cap-add".into(), cap.as_str().expect("cap").to_string()]);
    }
    if csc["allowPrivilegeEscalation"] == false {
        flags.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    match pick("seccompProfile")["type"].as_str() {
        // podman's own default profile is the runtime default
        Some("RuntimeDefault") | None => {}
        Some(other) => panic!("seccompProfile {other} is not translated"),
    }
    (flags, (uid, gid))
}

/// `--env` flags for the container's env, the downward API resolved as a kubelet would.
fn env_flags(c: &Value, pod_name: &str, ns: &str) -> Vec<String> {
    assert!(
        c["envFrom"].is_null(),
        "envFrom is not translated: {}",
        c["envFrom"]
    );
    let mut flags = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name");
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod_name.to_string(),
                Some("metadata.namespace") => ns.to_string(),
                _ => panic!("env {name}: {} is not translated", e["valueFrom"]),
            }
        };
        flags.extend(["--env".into(), format!("{name}={value}")]);
    }
    flags
}

/// `--memory` for resources.limits.memory (Mi/Gi).
fn memory_flags(c: &Value) -> Vec<String> {
    let Some(m) = c["resources"]["limits"]["memory"].as_str() else {
        return vec![];
    };
    let podman = if let Some(n) = m.strip_suffix("Mi") {
        format!("{n}m")
    } else if let Some(n) = m.strip_suffix("Gi") {
        format!("{n}g")
    } else {
        panic!("memory limit {m} is not translated")
    };
    vec!["--memory".into(), podman]
}

/// The container port a probe names (by name or number).
fn probe_port(c: &Value, probe: &str) -> u16 {
    let port = &c[probe]["httpGet"]["port"];
    let n = match port.as_str() {
        Some(name) => c["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64(),
        None => port.as_u64(),
    };
    u16::try_from(n.expect("probe port")).expect("port")
}

/// The image scripts/image built: present, non-root, the Dockerfile's entrypoint. Returns its size.
fn check_image(conf: &Path, image: &str) -> u64 {
    let (ok, _, err) = podman(conf, &["image", "exists", image]);
    assert!(
        ok,
        "the image {image} is missing: run scripts/image (scripts/test does) {err}"
    );
    let (ok, out, err) = podman(conf, &["image", "inspect", image]);
    assert!(ok, "{err}");
    let inspect: Value = serde_json::from_str(&out).expect("image inspect json");
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["Entrypoint"], json!(["/sharedlb"]), "{config}");
    inspect[0]["Size"].as_u64().expect("size")
}

/// What the test takes from the rendered chart.
struct Rendered {
    pod: Value,
    container: Value,
    /// The ServiceAccount, RBAC and pool documents, applied as a kubelet-less install.
    applied: String,
    pool: String,
    metrics_port: u16,
}

/// The chart rendered for this image into `ns` (the shipped chart but for its kubeVersion gate, which refuses
/// the 1.20 test apiserver), values-memory.yaml, and a free metrics port (the container shares the host's network).
async fn render_chart(ns: &str, image: &str) -> Rendered {
    let (repository, tag) = image.rsplit_once(':').expect("image with a tag");
    let metrics_port = free_port();
    let chart = harness_chart();
    let values = repo_root().join("examples/values-memory.yaml");
    let values = values.display().to_string();
    let sets = [
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        format!("metrics.port={metrics_port}"),
    ];
    let mut args = vec![
        "template",
        RELEASE,
        &chart,
        "-n",
        ns,
        "--kube-version",
        "1.20.2",
        "-f",
        &values,
    ];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let (ok, yaml, err) = run_tool("helm", &args, None).await;
    assert!(ok, "helm template: {err}");
    let d = yaml_docs(&yaml);
    let deploy = d
        .iter()
        .find(|x| x["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = deploy["spec"]["template"]["spec"].clone();
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = containers[0].clone();
    assert_eq!(container["image"], image, "the pod runs the image built");
    assert_ne!(
        pod["automountServiceAccountToken"], false,
        "the operator needs its token"
    );
    let kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "LoadBalancerPool",
    ];
    let applied: Vec<&Value> = d
        .iter()
        .filter(|x| kinds.iter().any(|k| x["kind"] == *k))
        .collect();
    let pool = applied
        .iter()
        .find(|x| x["kind"] == "LoadBalancerPool")
        .and_then(|x| x["metadata"]["name"].as_str())
        .expect("the chart's pool")
        .to_string();
    let applied = applied
        .iter()
        .map(|x| serde_yaml::to_string(x).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n");
    Rendered {
        pod,
        container,
        applied,
        pool,
        metrics_port,
    }
}

/// The ServiceAccount's token, as the real controller-manager makes it, in a directory laid out as a kubelet
/// mounts it into a pod.
async fn service_account_mount(admin: &Client, ns: &str, sa: &str, dir: &Path) -> PathBuf {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let secret_name = format!("{sa}-image-e2e");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "annotations": {"kubernetes.io/service-account.name": sa}},
        "type": "kubernetes.io/service-account-token",
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the token Secret");
    let (token, ca) = eventually(60, "the controller-manager fills in the token", || async {
        let data = secrets.get(&secret_name).await.ok()?.data?;
        Some((data.get("token")?.0.clone(), data.get("ca.crt")?.0.clone()))
    })
    .await;
    let mount = dir.join("serviceaccount");
    std::fs::create_dir_all(&mount).expect("mount dir");
    std::fs::write(mount.join("token"), &token).expect("token");
    std::fs::write(mount.join("ca.crt"), &ca).expect("ca.crt");
    std::fs::write(mount.join("namespace"), ns).expect("namespace");
    use std::os::unix::fs::PermissionsExt;
    for p in [dir, &mount] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for f in ["token", "ca.crt", "namespace"] {
        std::fs::set_permissions(mount.join(f), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    mount
}

/// `podman run` for the rendered pod: in-cluster config, securityContext, env, limits, command and args.
async fn podman_run_args(
    r: &Rendered,
    mount: &Path,
    ns: &str,
    pod_name: &str,
    container: &str,
    image: &str,
) -> Vec<String> {
    let server = kube::Config::infer().await.expect("config").cluster_url;
    assert_eq!(
        server.host(),
        Some("127.0.0.1"),
        "the test apiserver listens on 127.0.0.1"
    );
    let api_port = server.port_u16().expect("the apiserver's port");
    let c = &r.container;
    let pull = match c["imagePullPolicy"].as_str() {
        Some("Always") => "always",
        Some("Never") => "never",
        _ => "missing",
    };
    let mut run: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name".into(),
        container.into(),
        format!("--pull={pull}"),
        "--network".into(),
        "host".into(),
        "--env".into(),
        "KUBERNETES_SERVICE_HOST=127.0.0.1".into(),
        "--env".into(),
        format!("KUBERNETES_SERVICE_PORT={api_port}"),
        "--volume".into(),
        format!("{}:{SA_MOUNT}:ro", mount.display()),
    ];
    run.extend(security_flags(&r.pod, c).0);
    run.extend(env_flags(c, pod_name, ns));
    run.extend(memory_flags(c));
    if let Some(cmd) = c["command"].as_array() {
        run.extend(["--entrypoint".into(), Value::Array(cmd.clone()).to_string()]);
    }
    run.push(image.into());
    run.extend(args(c).into_iter().map(str::to_string));
    run
}

fn args(c: &Value) -> Vec<&str> {
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect()
}

/// What the kernel says about the container's process: uid/gid, no capabilities, no_new_privs, a seccomp
/// filter, a read-only root; and what podman says.
fn assert_confined(conf: &Path, container: &str, (uid, gid): (i64, i64)) {
    let (ok, pid, err) = podman(conf, &["inspect", "--format", "{{.State.Pid}}", container]);
    assert!(
        ok && pid != "0",
        "the container is not running: {pid} {err}"
    );
    assert_eq!(
        proc_status(&pid, "Uid"),
        format!("{uid}\t{uid}\t{uid}\t{uid}"),
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        proc_status(&pid, "Gid"),
        format!("{gid}\t{gid}\t{gid}\t{gid}")
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            proc_status(&pid, caps),
            "0000000000000000",
            "{caps}: capabilities drop ALL"
        );
    }
    assert_eq!(
        proc_status(&pid, "NoNewPrivs"),
        "1",
        "allowPrivilegeEscalation: false"
    );
    assert_eq!(
        proc_status(&pid, "Seccomp"),
        "2",
        "seccomp RuntimeDefault: a filter"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(4) == Some(&"/"))
        .expect("the root mount");
    assert!(
        root[5].split(',').any(|o| o == "ro"),
        "readOnlyRootFilesystem: the root is mounted {}",
        root[5]
    );
    let (_, top, _) = podman(conf, &["top", container, "user", "huser", "args"]);
    println!("{top}");
    assert!(
        top.lines()
            .skip(1)
            .all(|l| l.starts_with("nonroot") && l.contains("65532")),
        "every process is nonroot (uid 65532): {top}"
    );
    let (_, inspect, _) = podman(conf, &["inspect", container]);
    let inspect: Value = serde_json::from_str(&inspect).expect("inspect json");
    assert_eq!(inspect[0]["HostConfig"]["ReadonlyRootfs"], true);
}

/// Ready through the probes the chart declares, leading (metrics and the Lease the args name, held by the pod).
async fn assert_ready_and_leading(admin: &Client, r: &Rendered, ns: &str, pod_name: &str) {
    let c = &r.container;
    let probe_path = c["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("readinessProbe path");
    let probe = probe_port(c, "readinessProbe");
    assert_eq!(probe, r.metrics_port);
    eventually(60, &format!("{probe_path} answers 200"), || async {
        (http_get(probe, probe_path).await?.0 == 200).then_some(())
    })
    .await;
    let liveness = c["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .expect("livenessProbe path");
    let live = http_get(probe_port(c, "livenessProbe"), liveness)
        .await
        .map(|r| r.0);
    assert_eq!(live, Some(200));
    let metrics = eventually(30, "/metrics shows it leads", || async {
        let (status, body) = http_get(r.metrics_port, "/metrics").await?;
        (status == 200 && body.lines().any(|l| l == "sharedlb_leader 1")).then_some(body)
    })
    .await;
    assert!(
        metrics.contains("# TYPE sharedlb_leader gauge"),
        "Prometheus text"
    );
    let lease_name = args(c)
        .into_iter()
        .find_map(|a| a.strip_prefix("--lease-name="))
        .expect("--lease-name")
        .to_string();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let holder = eventually(30, "the Lease has a holder", || async {
        leases.get(&lease_name).await.ok()?.spec?.holder_identity
    })
    .await;
    assert_eq!(
        holder, pod_name,
        "the Lease {ns}/{lease_name} is held by the pod"
    );
}

/// A SharedLB in another namespace, on the chart's pool, made Ready by the container.
async fn a_shared_lb_becomes_ready(admin: &Client, cleanup: &mut Cleanup, pool: &str) {
    let user = namespace(admin, "image-user", &[]).await;
    cleanup.namespaces.push(user.clone());
    let spec = json!({"pool": pool, "selector": {"app": "web"}, "ports": [{"name": "http", "targetPort": 8080}]});
    create_slb(admin, &user, "web", spec).await;
    let s = ready(admin, &user, "web", 60).await;
    let st = s.status.as_ref().expect("status");
    let ip = st
        .load_balancer
        .as_ref()
        .and_then(|l| l.ip.clone())
        .expect("status.loadBalancer.ip");
    assert!(
        ip.starts_with("198.51.100."),
        "the memory provider's TEST-NET-2 address: {ip}"
    );
    assert_eq!(st.pool.as_deref(), Some(pool));
    println!(
        "{user}/web Ready on {ip}:{}",
        st.ports.first().expect("a port").port
    );
    // the operator finishes its finalizers before it is stopped
    delete_namespace(admin, &user).await;
    delete_pool(admin, pool).await;
}

/// The operator stops on SIGTERM, as a kubelet stops it, within the pod's grace period, with exit code 0.
fn stops_cleanly_on_sigterm(conf: &Path, container: &str, pod: &Value) {
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30)
        .to_string();
    let started = std::time::Instant::now();
    let (ok, _, err) = podman(conf, &["stop", "--time", &grace, container]);
    assert!(ok, "podman stop: {err}");
    let (_, code, _) = podman(
        conf,
        &["inspect", "--format", "{{.State.ExitCode}}", container],
    );
    assert_eq!(
        code,
        "0",
        "SIGTERM ends the operator cleanly (exit 0), in {:?}",
        started.elapsed()
    );
    println!("stopped by SIGTERM in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_as_the_charts_pod_and_makes_a_sharedlb_ready() {
    let _turn = SERIAL.lock().await;
    let admin = client().await;
    let image = image();
    let suffix = format!("{:06x}", fastrand::u32(..0xff_ffff));
    let dir = std::env::temp_dir().join(format!("sharedlb-image-e2e-{suffix}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = podman_conf(&dir);
    let mut cleanup = Cleanup {
        conf: conf.clone(),
        dir: dir.clone(),
        container: None,
        applied: None,
        pool: None,
        namespaces: vec![],
    };
    let size = check_image(&conf, &image);
    println!("image {image}: {} MiB ({size} bytes)", size / 1024 / 1024);

    let ns = namespace(&admin, "sharedlb-image", &[]).await;
    cleanup.namespaces.push(ns.clone());
    let rendered = render_chart(&ns, &image).await;
    let pools = Api::<sharedlb_crds::LoadBalancerPool>::all(admin.clone());
    if let Some(p) = pools.get_opt(&rendered.pool).await.expect("get pool") {
        let labels = p.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/instance").map(String::as_str),
            Some(RELEASE),
            "a pool {} not from this test exists: an earlier test left it",
            rendered.pool
        );
    }
    cleanup.applied = Some(rendered.applied.clone());
    cleanup.pool = Some(rendered.pool.clone());
    let (ok, out, err) = run_tool("kubectl", &["apply", "-f", "-"], Some(&rendered.applied)).await;
    assert!(ok, "applying the chart's objects: {out}{err}");
    let sa = rendered.pod["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    let mount = service_account_mount(&admin, &ns, sa, &dir).await;

    let pod_name = format!("{RELEASE}-sharedlb-{suffix}");
    let container = format!("sharedlb-image-e2e-{suffix}");
    let run = podman_run_args(&rendered, &mount, &ns, &pod_name, &container, &image).await;
    println!("podman {}", run.join(" "));
    cleanup.container = Some(container.clone());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let (ok, _, err) = podman(&conf, &run);
    assert!(ok, "podman run: {err}");

    assert_confined(
        &conf,
        &container,
        security_flags(&rendered.pod, &rendered.container).1,
    );
    assert_ready_and_leading(&admin, &rendered, &ns, &pod_name).await;
    a_shared_lb_becomes_ready(&admin, &mut cleanup, &rendered.pool).await;
    stops_cleanly_on_sigterm(&conf, &container, &rendered.pod);
    drop(cleanup);
}
