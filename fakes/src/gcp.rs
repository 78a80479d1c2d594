//! A FAKE of the Compute Engine REST API (`/compute/v1`), shaped by Google's discovery document `compute.v1.json`,
//! covering what the gcp provider uses: regional `addresses`, `forwardingRules`, `targetPools` (with
//! `addInstance`/`removeInstance`), global `firewalls` and `httpHealthChecks`, and the regional/global
//! `operations` that every mutation returns.
//!
//! Semantics kept from Compute Engine: every mutation is a long-running operation that is still `RUNNING` when
//! first returned and `DONE` when polled; errors are Google's JSON error shape (`404 notFound`, `409
//! alreadyExists`, `403 QUOTA_EXCEEDED`, `400` for a resource still in use); a forwarding rule needs a reserved
//! address in its region, and an address + port + protocol belongs to one forwarding rule (passthrough: two
//! rules on one IP may not overlap in ports for the same protocol); an address, target pool or health check that
//! something still uses cannot be deleted. Query strings (`$alt`, `filter`, `pageToken`) are ignored: lists are one
//! page of everything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, Default)]
struct State {
    /// collection path (`projects/p/regions/r/forwardingRules`) -> name -> resource
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// operation path -> (operation, polls before it is DONE)
    operations: BTreeMap<String, (Value, u32)>,
    /// resource kind (`forwardingRules`) -> how many may exist
    quotas: BTreeMap<String, usize>,
    /// the next request of this method fails with (status, reason)
    fail_next: Vec<(String, u16, String)>,
    next_id: u64,
    /// every request: (method, path)
    log: Vec<(String, String)>,
}

/// A running fake. Dropping it stops the server.
#[derive(Debug)]
pub struct GcpFake {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GcpFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GcpFake {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gcp fake on loopback");
        let addr = listener.local_addr().expect("local addr");
        let s = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let s = s.clone();
            async move { handle(&s, addr, method, uri, body) }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GcpFake { addr, state, task }
    }

    /// `http://127.0.0.1:<port>`: the client's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every resource of a kind (`forwardingRules`, `addresses`, `targetPools`, `firewalls`, `httpHealthChecks`).
    pub fn resources(&self, kind: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.objects
            .iter()
            .filter(|(c, _)| c.rsplit('/').next() == Some(kind))
            .flat_map(|(_, m)| m.values().cloned())
            .collect()
    }

    /// Puts a resource in place as if someone else had made it (e.g. a name collision).
    pub fn plant(&self, collection: &str, resource: Value) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let name = resource["name"].as_str().unwrap_or_default().to_string();
        st.objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, resource);
    }

    /// At most `max` resources of `kind` may exist; inserting more fails with 403 `QUOTA_EXCEEDED`.
    pub fn set_quota(&self, kind: &str, max: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.quotas.insert(kind.to_string(), max);
    }

    /// The next `method` request (GET, POST, DELETE, PATCH) fails with this HTTP status and reason.
    pub fn fail_next(&self, method: &str, status: u16, reason: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.fail_next
            .push((method.to_string(), status, reason.to_string()));
    }

    /// Every request so far as (method, path), e.g. ("POST", "projects/p/regions/r/forwardingRules").
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .clone()
    }
}

fn error(status: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        [("content-type", "application/json")],
        json!({"error": {"code": status.as_u16(), "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}]}})
        .to_string(),
    )
        .into_response()
}

fn ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// `projects/p/regions/r/forwardingRules/name/verb` -> (collection, kind, name, verb)
struct Target {
    collection: String,
    scope: String,
    kind: String,
    name: Option<String>,
    verb: Option<String>,
}

fn parse(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/compute/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    // projects/{p}/global/{kind}/... or projects/{p}/{regions|zones}/{r}/{kind}/...
    let (scope_len, kind_at) = match parts.get(2)? {
        &"global" => (3, 3),
        &"regions" | &"zones" => (4, 4),
        _ => return None,
    };
    if parts.first() != Some(&"projects") || parts.len() <= kind_at {
        return None;
    }
    Some(Target {
        collection: parts[..=kind_at].join("/"),
        scope: parts[..scope_len].join("/"),
        kind: parts[kind_at].to_string(),
        name: parts.get(kind_at + 1).map(|s| s.to_string()),
        verb: parts.get(kind_at + 2).map(|s| s.to_string()),
    })
}

/// `/compute/v1/projects/{p}/regions/{r}` -> `projects/{p}/regions/{r}`.
fn region_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/compute/v1/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    (parts.len() == 4 && parts[0] == "projects" && parts[2] == "regions").then_some(rest)
}

/// A region as `regions.get` gives it: the forwarding-rule quota set by `set_quota("forwardingRules", ..)`, with
/// every forwarding rule of the fake as its usage (the quota `insert` enforces counts them all); no quota set, no
/// quota listed.
fn region_with_quotas(st: &State, region: &str) -> Value {
    let usage: usize = st
        .objects
        .iter()
        .filter(|(c, _)| c.rsplit('/').next() == Some("forwardingRules"))
        .map(|(_, m)| m.len())
        .sum();
    let quotas: Vec<Value> = st
        .quotas
        .get("forwardingRules")
        .map(|limit| json!({"metric": "FORWARDING_RULES", "limit": *limit as f64, "usage": usage as f64}))
        .into_iter()
        .collect();
    let name = region.rsplit('/').next().unwrap_or_default();
    json!({"kind": "compute#region", "name": name, "status": "UP", "quotas": quotas})
}

fn handle(
    state: &Mutex<State>,
    addr: SocketAddr,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let path = uri.path().to_string();
    st.log.push((
        method.to_string(),
        path.trim_start_matches("/compute/v1/").to_string(),
    ));
    if let Some(i) = st
        .fail_next
        .iter()
        .position(|(m, _, _)| *m == method.as_str())
    {
        let (_, status, reason) = st.fail_next.remove(i);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, &reason, format!("injected by the fake: {reason}"));
    }
    if method == Method::GET
        && let Some(region) = region_path(&path)
    {
        return ok(region_with_quotas(&st, region));
    }
    let Some(t) = parse(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            "notFound",
            format!("the fake does not serve {path}"),
        );
    };
    let base = format!("http://{addr}/compute/v1/");
    if t.kind == "operations" {
        return operation(&mut st, &t);
    }
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, "parseError", e.to_string()),
        }
    };
    match (method, t.name.as_deref(), t.verb.as_deref()) {
        (Method::GET, None, _) => {
            let items: Vec<Value> = st
                .objects
                .get(&t.collection)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            ok(
                json!({"kind": format!("compute#{}List", t.kind), "id": t.collection, "items": items}),
            )
        }
        (Method::GET, Some(name), None) => {
            match st.objects.get(&t.collection).and_then(|m| m.get(name)) {
                Some(v) => ok(v.clone()),
                None => not_found(&t, name),
            }
        }
        (Method::POST, None, _) => insert(&mut st, &t, &base, body),
        (Method::DELETE, Some(name), None) => delete(&mut st, &t, &base, name),
        (Method::PATCH, Some(name), None) => {
            let Some(obj) = st
                .objects
                .get_mut(&t.collection)
                .and_then(|m| m.get_mut(name))
            else {
                return not_found(&t, name);
            };
            if let (Some(o), Some(b)) = (obj.as_object_mut(), body.as_object()) {
                for (k, v) in b {
                    if k != "name" {
                        o.insert(k.clone(), v.clone());
                    }
                }
            }
            let link = obj["selfLink"].clone();
            done_later(&mut st, &t, &base, "patch", link)
        }
        (Method::POST, Some(name), Some(verb)) => {
            let Some(obj) = st
                .objects
                .get_mut(&t.collection)
                .and_then(|m| m.get_mut(name))
            else {
                return not_found(&t, name);
            };
            match verb {
                "addInstance" | "removeInstance" if t.kind == "targetPools" => {
                    let urls: Vec<Value> = body["instances"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.get("instance").cloned())
                        .collect();
                    let mut have: Vec<Value> =
                        obj["instances"].as_array().cloned().unwrap_or_default();
                    if verb == "addInstance" {
                        for u in urls {
                            if have.contains(&u) {
                                return error(
                                    StatusCode::BAD_REQUEST,
                                    "alreadyExists",
                                    format!("instance {u} is already in target pool {name}"),
                                );
                            }
                            have.push(u);
                        }
                    } else {
                        have.retain(|h| !urls.contains(h));
                    }
                    obj["instances"] = Value::Array(have);
                }
                "setLabels" => {
                    obj["labels"] = body["labels"].clone();
                }
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "notFound",
                        format!("the fake has no method {verb} on {}", t.kind),
                    );
                }
            }
            let link = obj["selfLink"].clone();
            done_later(&mut st, &t, &base, verb, link)
        }
        (m, _, _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "badRequest",
            format!("the fake does not serve {m} {path}"),
        ),
    }
}

fn not_found(t: &Target, name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "notFound",
        format!(
            "The resource '{}/{name}' was not found",
            t.collection.trim_start_matches("projects/")
        ),
    )
}

/// A new operation on `target_link`, RUNNING now, DONE when polled.
fn done_later(
    st: &mut State,
    t: &Target,
    base: &str,
    op_type: &str,
    target_link: Value,
) -> Response {
    st.next_id += 1;
    let name = format!("operation-{}-{op_type}", st.next_id);
    let op_path = format!("{}/operations/{name}", t.scope);
    let op = json!({
        "kind": "compute#operation",
        "id": st.next_id.to_string(),
        "name": name,
        "operationType": op_type,
        "targetLink": target_link,
        "status": "RUNNING",
        "progress": 0,
        "selfLink": format!("{base}{op_path}"),
    });
    st.operations.insert(op_path, (op.clone(), 1));
    ok(op)
}

fn operation(st: &mut State, t: &Target) -> Response {
    let Some(name) = t.name.as_deref() else {
        return error(
            StatusCode::BAD_REQUEST,
            "badRequest",
            "operations are read one by one",
        );
    };
    let key = format!("{}/operations/{name}", t.scope);
    let Some((op, polls)) = st.operations.get_mut(&key) else {
        return not_found(t, name);
    };
    // a `wait` or a second look finds it done
    if *polls == 0 || t.verb.as_deref() == Some("wait") {
        op["status"] = json!("DONE");
        op["progress"] = json!(100);
    }
    *polls = polls.saturating_sub(1);
    ok(op.clone())
}

/// `https://.../projects/p/regions/r/addresses/a` or an IP -> the address resource it names, if any.
fn address_of<'a>(st: &'a State, region_scope: &str, ip_or_link: &str) -> Option<&'a Value> {
    let m = st.objects.get(&format!("{region_scope}/addresses"))?;
    m.values().find(|a| {
        a["address"].as_str() == Some(ip_or_link) || a["selfLink"].as_str() == Some(ip_or_link)
    })
}

fn ports_of(rule: &Value) -> Option<(u16, u16)> {
    let r = rule["portRange"].as_str()?;
    let (a, b) = r.split_once('-').unwrap_or((r, r));
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn insert(st: &mut State, t: &Target, base: &str, mut body: Value) -> Response {
    let Some(name) = body["name"].as_str().map(str::to_string) else {
        return error(
            StatusCode::BAD_REQUEST,
            "required",
            "Required field 'resource.name' not specified",
        );
    };
    if st
        .objects
        .get(&t.collection)
        .is_some_and(|m| m.contains_key(&name))
    {
        return error(
            StatusCode::CONFLICT,
            "alreadyExists",
            format!(
                "The resource '{}/{name}' already exists",
                t.collection.trim_start_matches("projects/")
            ),
        );
    }
    let count: usize = st
        .objects
        .iter()
        .filter(|(c, _)| c.rsplit('/').next() == Some(t.kind.as_str()))
        .map(|(_, m)| m.len())
        .sum();
    if st.quotas.get(&t.kind).is_some_and(|q| count >= *q) {
        return error(
            StatusCode::FORBIDDEN,
            "QUOTA_EXCEEDED",
            format!("Quota '{}' exceeded. Limit: {count}", t.kind.to_uppercase()),
        );
    }
    st.next_id += 1;
    let self_link = format!("{base}{}/{name}", t.collection);
    body["id"] = json!(st.next_id.to_string());
    body["selfLink"] = json!(self_link);
    body["creationTimestamp"] = json!("2026-01-01T00:00:00.000-00:00");
    body["kind"] = json!(format!("compute#{}", t.kind.trim_end_matches('s')));
    if t.scope.contains("/regions/") {
        body["region"] = json!(format!("{base}{}", t.scope));
    }
    match t.kind.as_str() {
        "addresses" => {
            body["address"] = json!(format!("203.0.113.{}", st.next_id % 250 + 1));
            body["status"] = json!("RESERVED");
        }
        "forwardingRules" => {
            let Some(ip_ref) = body["IPAddress"].as_str().map(str::to_string) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "required",
                    "the fake requires IPAddress (a reserved address) on forwarding rules",
                );
            };
            let Some(addr) = address_of(st, &t.scope, &ip_ref).cloned() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!(
                        "Invalid value for field 'resource.IPAddress': '{ip_ref}'. The address is not reserved in this region."
                    ),
                );
            };
            let ip = addr["address"].as_str().unwrap_or_default().to_string();
            body["IPAddress"] = json!(ip);
            let proto = body["IPProtocol"].as_str().unwrap_or("TCP").to_string();
            let Some((lo, hi)) = ports_of(&body) else {
                return error(StatusCode::BAD_REQUEST, "invalid", "portRange is required");
            };
            // passthrough: one rule per address + port + protocol
            let clash = st
                .objects
                .get(&t.collection)
                .into_iter()
                .flat_map(|m| m.values())
                .find(|r| {
                    r["IPAddress"].as_str() == Some(ip.as_str())
                        && r["IPProtocol"].as_str().unwrap_or("TCP") == proto
                        && ports_of(r).is_some_and(|(a, b)| a <= hi && lo <= b)
                });
            if let Some(c) = clash {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!(
                        "Invalid value for field 'resource.IPAddress': '{ip}'. Specified IP address is in-use and would result in a conflict: forwarding rule {} holds {proto} {}",
                        c["name"].as_str().unwrap_or_default(),
                        c["portRange"].as_str().unwrap_or_default()
                    ),
                );
            }
            if let Some(target) = body["target"].as_str()
                && !exists_link(st, base, target)
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("The resource '{target}' was not found"),
                );
            }
        }
        "targetPools" => {
            for hc in body["healthChecks"].as_array().cloned().unwrap_or_default() {
                if !hc.as_str().is_some_and(|h| exists_link(st, base, h)) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        format!("The resource '{hc}' was not found"),
                    );
                }
            }
        }
        _ => {}
    }
    st.objects
        .entry(t.collection.clone())
        .or_default()
        .insert(name, body);
    done_later(st, t, base, "insert", json!(self_link))
}

fn exists_link(st: &State, base: &str, link: &str) -> bool {
    let Some(path) = link.strip_prefix(base) else {
        return false;
    };
    let Some((collection, name)) = path.rsplit_once('/') else {
        return false;
    };
    st.objects
        .get(collection)
        .is_some_and(|m| m.contains_key(name))
}

fn delete(st: &mut State, t: &Target, base: &str, name: &str) -> Response {
    let Some(obj) = st.objects.get(&t.collection).and_then(|m| m.get(name)) else {
        return not_found(t, name);
    };
    let link = obj["selfLink"].as_str().unwrap_or_default().to_string();
    let ip = obj["address"].as_str().map(str::to_string);
    // what still uses it: forwarding rules use addresses and target pools, target pools use health checks
    let users: Vec<String> = st
        .objects
        .values()
        .flat_map(|m| m.values())
        .filter(|o| {
            o["target"].as_str() == Some(link.as_str())
                || (ip.is_some()
                    && o["IPAddress"].as_str() == ip.as_deref()
                    && o["portRange"].is_string())
                || o["healthChecks"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|x| x.as_str() == Some(link.as_str())))
        })
        .filter_map(|o| o["name"].as_str().map(str::to_string))
        .collect();
    if !users.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "resourceInUseByAnotherResource",
            format!(
                "The {} resource '{name}' is already being used by {users:?}",
                t.kind
            ),
        );
    }
    if let Some(m) = st.objects.get_mut(&t.collection) {
        m.remove(name);
    }
    done_later(st, t, base, "delete", json!(link))
}
