//! A FAKE of Azure Resource Manager's `Microsoft.Network` API and of Entra ID's token endpoint, covering what the
//! azure provider uses: `loadBalancers`, `publicIPAddresses`, `networkSecurityGroups` (PUT whole documents, GET,
//! list, DELETE), `virtualNetworks` (GET of planted ones), and the `operations`/`operationResults` that
//! long-running calls return. It serves HTTPS with a certificate from a CA made for this fake alone
//! ([`AzureFake::ca_pem`]), because Azure's bearer-token policy refuses plain HTTP: the client trusts that CA
//! through its transport, and the real `azure_identity` client-secret flow gets its token from here.
//!
//! A load balancer's backend pool can also be written on its own (`.../backendAddressPools/<name>`), as Azure
//! wants for IP-based pools. Semantics kept from ARM: every request needs `api-version` and a bearer token this fake issued; every document
//! has an ETag, and a PUT with a stale `If-Match` (or `If-None-Match: *` on an existing one) fails with 412; PUTs
//! answer with `Azure-AsyncOperation`, DELETEs with 202 + `Location`, and both operations are still running at the
//! first poll; errors are ARM's `{"error": {"code", "message"}}`. Checked on a load balancer: references between
//! its parts, one rule per frontend + port + protocol, one per backend port + protocol (without floating IP),
//! public IPs that exist and serve one frontend, 1,500 rules, 600 frontends, 300 rules reaching a backend; on an
//! NSG: 1,000 rules, priorities 100-4096 unique per direction; a public IP a frontend uses cannot be deleted.
//! Error codes are this fake's best match to Azure's, not a promise that Azure uses the same words.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const MAX_RULES_PER_LB: usize = 1500;
pub const MAX_FRONTENDS_PER_LB: usize = 600;
pub const MAX_RULES_PER_NIC: usize = 300;
pub const MAX_NSG_RULES: usize = 1000;
/// The client secret the token endpoint accepts.
pub const CLIENT_SECRET: &str = "fake-secret";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// The path, lowercased, without the query.
    pub path: String,
    pub status: u16,
    pub at: Instant,
}

#[derive(Debug)]
struct Fault {
    method: String,
    path_contains: String,
    status: u16,
    code: String,
    retry_after: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// lowercased resource id -> document
    resources: BTreeMap<String, Value>,
    /// operation id -> (polls before it is done, its error)
    operations: BTreeMap<String, (u32, Option<(String, String)>)>,
    tokens: BTreeSet<String>,
    faults: Vec<Fault>,
    /// after the next GET of a path containing this, someone else changes that document
    touch_after_get: Vec<String>,
    /// how many public IPs the subscription may hold
    public_ip_quota: Option<usize>,
    next: u64,
    log: Vec<Logged>,
}

/// A running fake. Dropping it stops the server.
#[derive(Debug)]
pub struct AzureFake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    handle: axum_server::Handle<SocketAddr>,
    ca_pem: String,
}

impl Drop for AzureFake {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl AzureFake {
    /// Starts the fake on a free loopback port with a fresh CA.
    pub async fn start() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sharedlb azure fake CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("leaf params");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("TLS config");
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the azure fake on loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { handle(&s, addr, method, uri, headers, body) }
            },
        );
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(
            listener,
            axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls)),
        )
        .expect("TLS server")
        .handle(handle.clone());
        tokio::spawn(async move {
            let _ = server.serve(app.into_make_service()).await;
        });
        AzureFake {
            addr,
            state,
            handle,
            ca_pem: ca.pem(),
        }
    }

    /// `https://127.0.0.1:<port>`: both ARM's endpoint and the authority host.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The PEM of the CA that signed the fake's certificate: what the client must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Puts a document in place as someone else would have made it (the NSG, the virtual network, a collision).
    pub fn plant(&self, id: &str, mut doc: Value) {
        let mut st = lock(&self.state);
        st.next += 1;
        let n = st.next;
        doc["id"] = json!(id);
        doc["name"] = json!(id.rsplit('/').next().unwrap_or_default());
        doc["etag"] = json!(format!("W/\"{n}\""));
        assign_child_ids(&mut doc, id);
        st.resources.insert(id.to_lowercase(), doc);
    }

    /// Plants a cluster's network as AKS would leave it: virtual network `vnet` and network security group `nsg`
    /// with these inbound security rules (`[{"name", "properties"}]`), in `network`
    /// (`/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Network`).
    pub fn plant_cluster_network(&self, network: &str, vnet: &str, nsg: &str, rules: Value) {
        self.plant(
            &format!("{network}/virtualNetworks/{vnet}"),
            json!({"location": "westeurope", "properties": {"addressSpace": {"addressPrefixes": ["10.224.0.0/12"]}}}),
        );
        self.plant(
            &format!("{network}/networkSecurityGroups/{nsg}"),
            json!({"location": "westeurope", "tags": {}, "properties": {"securityRules": rules}}),
        );
    }

    /// A document by id, if it exists.
    pub fn get(&self, id: &str) -> Option<Value> {
        lock(&self.state).resources.get(&id.to_lowercase()).cloned()
    }

    /// Every document of a type (`loadBalancers`, `publicIPAddresses`, `networkSecurityGroups`).
    pub fn resources(&self, kind: &str) -> Vec<Value> {
        let marker = format!("/providers/microsoft.network/{}/", kind.to_lowercase());
        lock(&self.state)
            .resources
            .iter()
            .filter(|(id, _)| id.contains(&marker))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The next `method` request whose path contains `path_contains` (lowercase) fails with this status and
    /// ARM error code; `retry_after` sets the `Retry-After` header (seconds).
    pub fn fail_next(
        &self,
        method: &str,
        path_contains: &str,
        status: u16,
        code: &str,
        retry_after: Option<u64>,
    ) {
        lock(&self.state).faults.push(Fault {
            method: method.to_string(),
            path_contains: path_contains.to_lowercase(),
            status,
            code: code.to_string(),
            retry_after,
        });
    }

    /// Right after the next GET of a document whose path contains `path_contains`, someone else changes it
    /// (adds 1 to its tag `touched`, new ETag): the reader's next write with that ETag gets 412.
    pub fn touch_after_next_get(&self, path_contains: &str) {
        lock(&self.state)
            .touch_after_get
            .push(path_contains.to_lowercase());
    }

    /// At most `max` public IPs may exist; creating more fails with 400 `PublicIPCountLimitReached`.
    pub fn set_public_ip_quota(&self, max: usize) {
        lock(&self.state).public_ip_quota = Some(max);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        lock(&self.state).log.clone()
    }

    /// How many requests of `method` had a path containing `path_contains` (lowercase) and got `status`.
    pub fn count(&self, method: &str, path_contains: &str, status: Option<u16>) -> usize {
        let needle = path_contains.to_lowercase();
        lock(&self.state)
            .log
            .iter()
            .filter(|l| l.method == method && l.path.contains(&needle))
            .filter(|l| status.is_none_or(|s| s == l.status))
            .count()
    }
}

fn arm_error(status: u16, code: &str, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "application/json")],
        json!({"error": {"code": code, "message": message.into()}}).to_string(),
    )
        .into_response()
}

fn json_response(status: StatusCode, v: &Value, extra: Vec<(&'static str, String)>) -> Response {
    let mut r = (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response();
    for (k, v) in extra {
        if let Ok(v) = v.parse() {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn handle(
    state: &Mutex<State>,
    addr: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_lowercase();
    let response = serve(state, addr, &method, &uri, &headers, &body);
    let mut st = lock(state);
    st.log.push(Logged {
        method: method.to_string(),
        path: path.clone(),
        status: response.status().as_u16(),
        at: Instant::now(),
    });
    if method == Method::GET
        && response.status() == StatusCode::OK
        && let Some(i) = st.touch_after_get.iter().position(|p| path.contains(p))
    {
        st.touch_after_get.remove(i);
        st.next += 1;
        let n = st.next;
        if let Some(doc) = st.resources.get_mut(&path) {
            let touched = doc["tags"]["touched"]
                .as_str()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            doc["tags"]["touched"] = json!((touched + 1).to_string());
            doc["etag"] = json!(format!("W/\"{n}\""));
        }
    }
    response
}

fn serve(
    state: &Mutex<State>,
    addr: SocketAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let path = uri.path().to_lowercase();
    if method == Method::POST && path.ends_with("/oauth2/v2.0/token") {
        return token(state, body);
    }
    let mut st = lock(state);
    if let Some(i) = st.faults.iter().position(|f| {
        f.method.eq_ignore_ascii_case(method.as_str()) && path.contains(&f.path_contains)
    }) {
        let f = st.faults.remove(i);
        let mut r = arm_error(
            f.status,
            &f.code,
            format!("injected by the fake: {}", f.code),
        );
        if let Some(s) = f.retry_after
            && let Ok(v) = s.to_string().parse()
        {
            r.headers_mut().insert("retry-after", v);
        }
        return r;
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| st.tokens.contains(t)) {
        return arm_error(
            401,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing or has no token this fake issued.",
        );
    }
    if !uri.query().unwrap_or_default().contains("api-version=") {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    if path.contains("/providers/microsoft.network/locations/") {
        return operation(&mut st, &path);
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // subscriptions/<s>/resourcegroups/<rg>/providers/microsoft.network/<type>[/<name>]
    if segments.len() < 7 || segments[0] != "subscriptions" || segments[2] != "resourcegroups" {
        return arm_error(404, "InvalidResourceType", format!("no such path {path}"));
    }
    let kind = segments[6].to_string();
    let id = path.trim_end_matches('/').to_string();
    match (method.clone(), segments.len()) {
        (Method::GET, 7) => {
            let prefix = format!("{id}/");
            let value: Vec<Value> = st
                .resources
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                .map(|(_, v)| v.clone())
                .collect();
            json_response(StatusCode::OK, &json!({"value": value}), vec![])
        }
        (Method::GET, 8) => match st.resources.get(&id) {
            Some(doc) => json_response(StatusCode::OK, doc, vec![]),
            None => arm_error(
                404,
                "ResourceNotFound",
                format!("The Resource '{}' was not found.", uri.path()),
            ),
        },
        (Method::PUT, 8) => put(&mut st, addr, &kind, uri.path(), &id, headers, body),
        (Method::PUT, 10) if kind == "loadbalancers" && segments[8] == "backendaddresspools" => {
            put_backend_pool(&mut st, addr, uri.path(), body)
        }
        (Method::DELETE, 8) => delete(&mut st, addr, &kind, &id),
        _ => arm_error(405, "MethodNotAllowed", format!("{method} {path}")),
    }
}

fn token(state: &Mutex<State>, body: &Bytes) -> Response {
    let form: BTreeMap<String, String> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%3A", ":")))
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            json!({"error": "invalid_client", "error_codes": [7000215],
                "error_description": "AADSTS7000215: Invalid client secret provided (the fake's)."})
            .to_string(),
        )
            .into_response();
    }
    let mut st = lock(state);
    st.next += 1;
    let t = format!("fake-token-{}", st.next);
    st.tokens.insert(t.clone());
    json_response(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": t}),
        vec![],
    )
}

fn new_operation(
    st: &mut State,
    addr: SocketAddr,
    id: &str,
    error: Option<(String, String)>,
) -> String {
    st.next += 1;
    let op = format!("op-{}", st.next);
    st.operations.insert(op.clone(), (1, error));
    let sub = id.split('/').nth(2).unwrap_or("sub");
    format!(
        "https://{addr}/subscriptions/{sub}/providers/Microsoft.Network/locations/fake/OPERATIONKIND/{op}?api-version=2024-05-01"
    )
}

fn operation(st: &mut State, path: &str) -> Response {
    let op = path.rsplit('/').next().unwrap_or_default().to_string();
    let results = path.contains("/operationresults/");
    let Some((left, error)) = st.operations.get_mut(&op) else {
        return arm_error(404, "OperationNotFound", format!("no operation {op}"));
    };
    if *left > 0 {
        *left -= 1;
        return if results {
            json_response(
                StatusCode::ACCEPTED,
                &json!({}),
                vec![("retry-after", "0".into())],
            )
        } else {
            json_response(
                StatusCode::OK,
                &json!({"status": "InProgress"}),
                vec![("retry-after", "0".into())],
            )
        };
    }
    match (results, error.clone()) {
        (true, _) => StatusCode::NO_CONTENT.into_response(),
        (false, None) => json_response(StatusCode::OK, &json!({"status": "Succeeded"}), vec![]),
        (false, Some((code, message))) => json_response(
            StatusCode::OK,
            &json!({"status": "Failed", "error": {"code": code, "message": message}}),
            vec![],
        ),
    }
}

/// Children get ids under their parent: `<lb>/frontendIPConfigurations/<name>`.
fn assign_child_ids(doc: &mut Value, id: &str) {
    for list in [
        "frontendIPConfigurations",
        "backendAddressPools",
        "loadBalancingRules",
        "probes",
        "securityRules",
    ] {
        if let Some(items) = doc["properties"][list].as_array_mut() {
            for item in items {
                let name = item["name"].as_str().unwrap_or_default().to_string();
                item["id"] = json!(format!("{id}/{list}/{name}"));
            }
        }
    }
}

fn names(doc: &Value, list: &str) -> Vec<String> {
    doc["properties"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["name"].as_str().map(str::to_lowercase))
                .collect()
        })
        .unwrap_or_default()
}

/// The public IP ids (lowercase) a load balancer document's frontends use.
fn frontend_ips(doc: &Value) -> Vec<String> {
    doc["properties"]["frontendIPConfigurations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["properties"]["publicIPAddress"]["id"].as_str())
        .map(str::to_lowercase)
        .collect()
}

/// The load balancers (their lowercase ids) with a frontend on this public IP (lowercase id).
fn load_balancers_using<'a>(st: &'a State, ip: &'a str) -> impl Iterator<Item = &'a str> {
    st.resources
        .iter()
        .filter(move |(id, doc)| {
            id.contains("/loadbalancers/") && frontend_ips(doc).iter().any(|i| i == ip)
        })
        .map(|(id, _)| id.as_str())
}

fn check_load_balancer(st: &State, id: &str, doc: &Value) -> Result<(), (String, String)> {
    let bad = |code: &str, m: String| Err((code.to_string(), m));
    let items = |list: &str| {
        doc["properties"][list]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let frontends = items("frontendIPConfigurations");
    let rules = items("loadBalancingRules");
    if frontends.len() > MAX_FRONTENDS_PER_LB {
        return bad(
            "FrontendIPConfigurationsPerLoadBalancerLimitReached",
            format!(
                "{} frontend IP configurations; the limit is {MAX_FRONTENDS_PER_LB}",
                frontends.len()
            ),
        );
    }
    if rules.len() > MAX_RULES_PER_LB {
        return bad(
            "LoadBalancingRulesPerLoadBalancerLimitReached",
            format!(
                "{} load balancing rules; the limit is {MAX_RULES_PER_LB}",
                rules.len()
            ),
        );
    }
    let ips = frontend_ips(doc);
    if ips.len() != frontends.len() {
        return bad(
            "InvalidResourceReference",
            "a frontend IP configuration has no public IP".to_string(),
        );
    }
    for ip in &ips {
        if !st.resources.contains_key(ip) {
            return bad(
                "InvalidResourceReference",
                format!("public IP {ip} of a frontend does not exist"),
            );
        }
        let used_elsewhere = load_balancers_using(st, ip).any(|lb| lb != id);
        let twice = ips.iter().filter(|i| *i == ip).count() > 1;
        if used_elsewhere || twice {
            return bad(
                "PublicIPAddressInUse",
                format!("public IP {ip} is already used by a frontend"),
            );
        }
    }
    let refs = |list: &str| -> BTreeSet<String> {
        names(doc, list)
            .into_iter()
            .map(|n| format!("{id}/{}/{n}", list.to_lowercase()))
            .collect()
    };
    let (fes, pools, probes) = (
        refs("frontendIPConfigurations"),
        refs("backendAddressPools"),
        refs("probes"),
    );
    let mut front = BTreeSet::new();
    let mut back = BTreeSet::new();
    for r in &rules {
        let p = &r["properties"];
        let get = |k: &str| p[k]["id"].as_str().map(str::to_lowercase);
        let name = r["name"].as_str().unwrap_or_default();
        let fe = get("frontendIPConfiguration").unwrap_or_default();
        if !fes.contains(&fe) {
            return bad(
                "InvalidResourceReference",
                format!("rule {name}: frontend {fe} is not in the load balancer"),
            );
        }
        let pool = get("backendAddressPool");
        if pool.as_ref().is_some_and(|b| !pools.contains(b)) {
            return bad(
                "InvalidResourceReference",
                format!("rule {name}: backend pool {pool:?} is not in the load balancer"),
            );
        }
        if let Some(pr) = get("probe")
            && !probes.contains(&pr)
        {
            return bad(
                "InvalidResourceReference",
                format!("rule {name}: probe {pr} is not in the load balancer"),
            );
        }
        let proto = p["protocol"].as_str().unwrap_or_default().to_lowercase();
        if !front.insert((fe.clone(), p["frontendPort"].as_u64(), proto.clone())) {
            return bad(
                "LoadBalancingRulesWithSameFrontendIPConfigurationAndPort",
                format!(
                    "rule {name}: frontend port {} {proto} is already used on {fe}",
                    p["frontendPort"]
                ),
            );
        }
        if !p["enableFloatingIP"].as_bool().unwrap_or(false)
            && !back.insert((pool.clone(), p["backendPort"].as_u64(), proto.clone()))
        {
            return bad(
                "LoadBalancingRulesWithSameBackendPortAndProtocol",
                format!(
                    "rule {name}: backend port {} {proto} is already used on the backend pool",
                    p["backendPort"]
                ),
            );
        }
    }
    // Azure counts the rules that reach each backend address (a NIC IP configuration)
    let mut addresses_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for b in items("backendAddressPools") {
        let pool = format!(
            "{id}/backendaddresspools/{}",
            b["name"].as_str().unwrap_or_default().to_lowercase()
        );
        let ips = b["properties"]["loadBalancerBackendAddresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["properties"]["ipAddress"].as_str().map(str::to_string))
            .collect();
        addresses_of.insert(pool, ips);
    }
    let mut reaching: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rules {
        let pool = r["properties"]["backendAddressPool"]["id"]
            .as_str()
            .map(str::to_lowercase)
            .unwrap_or_default();
        for ip in addresses_of.get(&pool).into_iter().flatten() {
            *reaching.entry(ip.as_str()).or_default() += 1;
        }
    }
    if let Some((ip, n)) = reaching.iter().find(|(_, n)| **n > MAX_RULES_PER_NIC) {
        return bad(
            "LoadBalancingRulesPerNicIpConfigurationLimitReached",
            format!("{n} rules reach backend {ip}; the limit is {MAX_RULES_PER_NIC}"),
        );
    }
    Ok(())
}

/// An NSG security rule's sources, whichever of its two fields holds them (Azure takes a service tag only alone,
/// in `sourceAddressPrefix`; addresses and CIDRs in either).
pub fn security_rule_sources(rule_properties: &Value) -> Vec<String> {
    let single = rule_properties["sourceAddressPrefix"].as_str();
    let list = rule_properties["sourceAddressPrefixes"]
        .as_array()
        .into_iter()
        .flatten();
    single
        .into_iter()
        .chain(list.filter_map(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// An IP address or a CIDR (what an NSG rule's address lists accept).
fn is_address_or_cidr(a: &str) -> bool {
    let (ip, len) = a.split_once('/').unwrap_or((a, ""));
    ip.parse::<std::net::IpAddr>().is_ok() && (len.is_empty() || len.parse::<u8>().is_ok())
}

fn check_nsg(doc: &Value) -> Result<(), (String, String)> {
    let rules = doc["properties"]["securityRules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if rules.len() > MAX_NSG_RULES {
        return Err((
            "SecurityRulesPerNetworkSecurityGroupLimitReached".into(),
            format!(
                "{} security rules; the limit is {MAX_NSG_RULES}",
                rules.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for r in &rules {
        let p = &r["properties"];
        let priority = p["priority"].as_u64().unwrap_or(0);
        if !(100..=4096).contains(&priority) {
            return Err((
                "SecurityRuleInvalidPriority".into(),
                format!("rule {}: priority {priority} is not in 100-4096", r["name"]),
            ));
        }
        // as Azure: the list form takes addresses and CIDRs only (a service tag such as Internet or
        // AzureLoadBalancer, or '*', goes alone in sourceAddressPrefix), and a rule uses one form or the other
        let list: Vec<&str> = p["sourceAddressPrefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(tag) = list.iter().find(|a| !is_address_or_cidr(a)) {
            return Err((
                "SecurityRuleParameterContainsUnsupportedValue".into(),
                format!(
                    "Security rule parameter SourceAddressPrefixes for rule {} cannot specify existing VIRTUALNETWORK, INTERNET, AZURELOADBALANCER, '*' or system tags. Unsupported value used: {tag}.",
                    r["name"]
                ),
            ));
        }
        if !list.is_empty() && p["sourceAddressPrefix"].as_str().is_some() {
            return Err((
                "SecurityRuleConflictingParameters".into(),
                format!(
                    "rule {}: sourceAddressPrefix and sourceAddressPrefixes cannot both be given",
                    r["name"]
                ),
            ));
        }
        let dir = p["direction"].as_str().unwrap_or_default().to_lowercase();
        if !seen.insert((dir.clone(), priority)) {
            return Err((
                "SecurityRuleConflict".into(),
                format!(
                    "rule {}: another {dir} rule already has priority {priority}",
                    r["name"]
                ),
            ));
        }
    }
    Ok(())
}

fn put(
    st: &mut State,
    addr: SocketAddr,
    kind: &str,
    raw_path: &str,
    id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let Ok(mut doc) = serde_json::from_slice::<Value>(body) else {
        return arm_error(400, "InvalidRequestFormat", "the body is not JSON");
    };
    let existing = st.resources.get(id).cloned();
    let current_etag = existing
        .as_ref()
        .and_then(|d| d["etag"].as_str().map(str::to_string));
    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if let Some(want) = header("if-match")
        && want != "*"
        && Some(want) != current_etag.as_deref()
    {
        return arm_error(
            412,
            "PreconditionFailed",
            format!("The resource was changed: ETag {current_etag:?}, If-Match {want}"),
        );
    }
    if header("if-none-match") == Some("*") && existing.is_some() {
        return arm_error(
            412,
            "PreconditionFailed",
            "The resource already exists (If-None-Match: *)",
        );
    }
    let display_id = raw_path.trim_end_matches('/');
    doc["id"] = json!(display_id);
    doc["name"] = json!(display_id.rsplit('/').next().unwrap_or_default());
    assign_child_ids(&mut doc, display_id);
    let checked = match kind {
        "loadbalancers" => check_load_balancer(st, id, &doc),
        "networksecuritygroups" => check_nsg(&doc),
        "publicipaddresses" => {
            let count = st
                .resources
                .keys()
                .filter(|k| k.contains("/publicipaddresses/"))
                .count();
            if existing.is_none()
                && let Some(max) = st.public_ip_quota
                && count >= max
            {
                return arm_error(
                    400,
                    "PublicIPCountLimitReached",
                    format!(
                        "Cannot create more than {max} public IP addresses for this subscription in this region."
                    ),
                );
            }
            if let Some(ip) = existing
                .as_ref()
                .and_then(|e| e["properties"]["ipAddress"].as_str())
            {
                doc["properties"]["ipAddress"] = json!(ip);
            } else {
                st.next += 1;
                let n = st.next;
                doc["properties"]["ipAddress"] =
                    json!(format!("20.50.{}.{}", (n / 250) % 250, n % 250 + 1));
            }
            Ok(())
        }
        _ => Err((
            "InvalidResourceType".into(),
            format!("the fake does not write {kind}"),
        )),
    };
    if let Err((code, message)) = checked {
        return arm_error(400, &code, message);
    }
    st.next += 1;
    let n = st.next;
    doc["etag"] = json!(format!("W/\"{n}\""));
    doc["properties"]["provisioningState"] = json!("Succeeded");
    st.resources.insert(id.to_string(), doc.clone());
    let op = new_operation(st, addr, id, None).replace("OPERATIONKIND", "operations");
    doc["properties"]["provisioningState"] = json!("Updating");
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    json_response(
        status,
        &doc,
        vec![("azure-asyncoperation", op), ("retry-after", "0".into())],
    )
}

/// PUT `<load balancer>/backendAddressPools/<name>`: the pool is replaced inside its load balancer, which gets
/// a new ETag.
fn put_backend_pool(st: &mut State, addr: SocketAddr, raw_path: &str, body: &Bytes) -> Response {
    let Ok(mut pool) = serde_json::from_slice::<Value>(body) else {
        return arm_error(400, "InvalidRequestFormat", "the body is not JSON");
    };
    let raw_path = raw_path.trim_end_matches('/');
    let lb_display = raw_path
        .rsplitn(3, '/')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    let lb_id = lb_display.to_lowercase();
    let Some(mut doc) = st.resources.get(&lb_id).cloned() else {
        return arm_error(
            404,
            "ResourceNotFound",
            format!("The Resource '{lb_display}' was not found."),
        );
    };
    let name = raw_path.rsplit('/').next().unwrap_or_default().to_string();
    pool["name"] = json!(name);
    pool["id"] = json!(raw_path);
    let pools = doc["properties"]["backendAddressPools"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut pools: Vec<Value> = pools
        .into_iter()
        .filter(|p| {
            !p["name"]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(&name))
        })
        .collect();
    pools.push(pool.clone());
    doc["properties"]["backendAddressPools"] = json!(pools);
    if let Err((code, message)) = check_load_balancer(st, &lb_id, &doc) {
        return arm_error(400, &code, message);
    }
    st.next += 1;
    let n = st.next;
    doc["etag"] = json!(format!("W/\"{n}\""));
    st.resources.insert(lb_id.clone(), doc);
    let op = new_operation(st, addr, &lb_id, None).replace("OPERATIONKIND", "operations");
    json_response(
        StatusCode::OK,
        &pool,
        vec![("azure-asyncoperation", op), ("retry-after", "0".into())],
    )
}

fn delete(st: &mut State, addr: SocketAddr, kind: &str, id: &str) -> Response {
    if !st.resources.contains_key(id) {
        return StatusCode::NO_CONTENT.into_response();
    }
    if kind == "publicipaddresses" {
        let user = load_balancers_using(st, id).next().map(str::to_string);
        if let Some(lb) = user {
            return arm_error(
                400,
                "PublicIPAddressCannotBeDeleted",
                format!(
                    "Public IP address {id} can not be deleted since it is still allocated to resource {lb}."
                ),
            );
        }
    }
    st.resources.remove(id);
    let op = new_operation(st, addr, id, None).replace("OPERATIONKIND", "operationResults");
    (
        StatusCode::ACCEPTED,
        [("location", op), ("retry-after", "0".to_string())],
    )
        .into_response()
}
