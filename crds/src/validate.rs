//! Input validation the operator does itself: the schema cannot say all of it, and apiservers older than 1.25
//! ignore the CEL rules. Every refusal carries a reason a program can branch on and a message for a person.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{LoadBalancerPoolSpec, PoolLoadBalancer, ProviderSpec, SERVICE_SUFFIX, SharedLBSpec};

const _: () = assert!(63 - SERVICE_SUFFIX.len() == 54);

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.ports must list at least one port")]
    NoPorts,
    #[error("spec.ports lists {0} ports; at most 64 are allowed")]
    TooManyPorts(usize),
    #[error(
        "port name {0:?} must be a DNS-1123 label of at most 15 characters (lower case letters, digits, '-')"
    )]
    BadPortName(String),
    #[error("port name {0:?} appears more than once")]
    DuplicatePortName(String),
    #[error("port {name:?}: {port} is outside 1-65535")]
    PortOutOfRange { name: String, port: i32 },
    #[error("port {port}/{protocol} appears more than once")]
    DuplicatePort { port: i32, protocol: &'static str },
    #[error(
        "port {name:?}: targetPort {target:?} must be 1-65535 or a port name of at most 15 characters"
    )]
    BadTargetPort { name: String, target: String },
    #[error("spec.selector must name at least one label, or it would select nothing")]
    EmptySelector,
    #[error("spec.selector: {0}")]
    BadSelector(String),
    #[error("spec.sourceRanges: {0:?} is not a CIDR such as 203.0.113.0/24")]
    BadSourceRange(String),
    #[error(
        "the name has {0} characters; at most 54 are allowed so that the Service name `<name>-sharedlb` fits in 63"
    )]
    NameTooLong(usize),
    #[error(
        "the name {0:?} is not a DNS-1035 label (lower case letters, digits, '-', starting with a letter), so the backing Service `<name>-sharedlb` could not be made"
    )]
    NameNotServiceName(String),
    #[error("spec.provider must set exactly one of aws, gcp, azure, local, memory")]
    ProviderCount,
    #[error("spec.capacity: {0}")]
    BadCapacity(String),
    #[error("spec.portRange: min {min} and max {max} must satisfy 1 <= min <= max <= 65535")]
    BadPortRange { min: i32, max: i32 },
    #[error(
        "spec.provider.local.addresses: {0:?} is not a concrete unicast IP address (unspecified, multicast, broadcast and link-local addresses are refused)"
    )]
    BadAddress(String),
    #[error(
        "port {name:?}: {port} is not a port this pool lets SharedLBs fix; it allows {allowed} (the pool's portRange and spec.provider.local.fixedPortRanges), or omit `port` to have one assigned"
    )]
    PortNotAllowed {
        name: String,
        port: i32,
        allowed: String,
    },
    #[error(
        "spec.provider: {0} cannot change, since the pool's load balancers live there; make a new pool instead"
    )]
    ProviderChanged(&'static str),
    #[error(
        "spec.provider.local.addresses: {address} carries load balancer {lb} ({ports} port(s) in use), so it must stay in the list at position {index}; delete that load balancer's SharedLBs first"
    )]
    AddressInUse {
        address: String,
        lb: String,
        index: usize,
        ports: u32,
    },
    #[error(
        "spec.drain: {name:?} is not a load balancer of this pool; names are {pool}-<index>, as the pool's status shows them"
    )]
    BadDrain { pool: String, name: String },
}

impl SpecError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::NoPorts | SpecError::TooManyPorts(_) => "InvalidPorts",
            SpecError::BadPortName(_) | SpecError::DuplicatePortName(_) => "InvalidPortName",
            SpecError::PortOutOfRange { .. } | SpecError::DuplicatePort { .. } => "InvalidPort",
            SpecError::BadTargetPort { .. } => "InvalidTargetPort",
            SpecError::EmptySelector | SpecError::BadSelector(_) => "InvalidSelector",
            SpecError::BadSourceRange(_) => "InvalidSourceRange",
            SpecError::NameTooLong(_) | SpecError::NameNotServiceName(_) => "InvalidName",
            SpecError::ProviderCount => "InvalidProvider",
            SpecError::BadCapacity(_) => "InvalidCapacity",
            SpecError::BadPortRange { .. } => "InvalidPortRange",
            SpecError::BadAddress(_) => "InvalidAddress",
            SpecError::PortNotAllowed { .. } => "PortNotAllowed",
            SpecError::ProviderChanged(_) => "ProviderChanged",
            SpecError::AddressInUse { .. } => "AddressInUse",
            SpecError::BadDrain { .. } => "InvalidDrain",
        }
    }
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A label key's name part or a value: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn is_label_token(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.chars().all(|c| alnum(c) || matches!(c, '.' | '_' | '-'))
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

fn is_label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| is_dns_label(l, 63))
                && is_label_token(name, false)
        }
        None => is_label_token(k, false),
    }
}

/// Checks a SharedLB's name and spec. The first problem found is returned.
pub fn validate_shared_lb(name: &str, spec: &SharedLBSpec) -> Result<(), SpecError> {
    if name.len() + SERVICE_SUFFIX.len() > 63 {
        return Err(SpecError::NameTooLong(name.len()));
    }
    if !is_dns_label(name, 63) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(SpecError::NameNotServiceName(name.to_string()));
    }
    if spec.ports.is_empty() {
        return Err(SpecError::NoPorts);
    }
    if spec.ports.len() > 64 {
        return Err(SpecError::TooManyPorts(spec.ports.len()));
    }
    let mut names = BTreeSet::new();
    let mut fixed = BTreeSet::new();
    for p in &spec.ports {
        if !is_dns_label(&p.name, 15) {
            return Err(SpecError::BadPortName(p.name.clone()));
        }
        if !names.insert(p.name.as_str()) {
            return Err(SpecError::DuplicatePortName(p.name.clone()));
        }
        if let Some(port) = p.port {
            if !(1..=65535).contains(&port) {
                return Err(SpecError::PortOutOfRange {
                    name: p.name.clone(),
                    port,
                });
            }
            if !fixed.insert((port, p.protocol)) {
                return Err(SpecError::DuplicatePort {
                    port,
                    protocol: p.protocol.as_str(),
                });
            }
        }
        let target_ok = match &p.target_port {
            IntOrString::Int(i) => (1..=65535).contains(i),
            IntOrString::String(s) => {
                !s.is_empty()
                    && s.len() <= 15
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && s.bytes().any(|b| b.is_ascii_lowercase())
            }
        };
        if !target_ok {
            let target = match &p.target_port {
                IntOrString::Int(i) => i.to_string(),
                IntOrString::String(s) => s.clone(),
            };
            return Err(SpecError::BadTargetPort {
                name: p.name.clone(),
                target,
            });
        }
    }
    if spec.selector.is_empty() {
        return Err(SpecError::EmptySelector);
    }
    for (k, v) in &spec.selector {
        if !is_label_key(k) {
            return Err(SpecError::BadSelector(format!(
                "{k:?} is not a valid label key"
            )));
        }
        if !is_label_token(v, true) {
            return Err(SpecError::BadSelector(format!(
                "{v:?} is not a valid label value for {k:?}"
            )));
        }
    }
    for c in spec.source_ranges.iter().flatten() {
        if c.0.parse::<ipnet::IpNet>().is_err() {
            return Err(SpecError::BadSourceRange(c.0.clone()));
        }
    }
    Ok(())
}

/// Checks a pool's spec.
pub fn validate_pool(spec: &LoadBalancerPoolSpec) -> Result<(), SpecError> {
    if spec.provider.kind().is_none() {
        return Err(SpecError::ProviderCount);
    }
    if let Some(m) = spec.capacity.max_ports_per_load_balancer
        && (m == 0 || m > 65535)
    {
        return Err(SpecError::BadCapacity(format!(
            "maxPortsPerLoadBalancer {m} must be 1-65535"
        )));
    }
    if spec.capacity.max_load_balancers == Some(0) {
        return Err(SpecError::BadCapacity(
            "maxLoadBalancers must be at least 1".into(),
        ));
    }
    if let Some(r) = &spec.port_range
        && (r.min < 1 || r.max > 65535 || r.min > r.max)
    {
        return Err(SpecError::BadPortRange {
            min: r.min,
            max: r.max,
        });
    }
    for a in spec.provider.local.iter().flat_map(|l| &l.addresses) {
        match a.parse::<IpAddr>() {
            Ok(ip) if is_concrete_unicast(ip) => {}
            _ => return Err(SpecError::BadAddress(a.clone())),
        }
    }
    for r in spec
        .provider
        .local
        .iter()
        .flat_map(|l| &l.fixed_port_ranges)
    {
        if r.min < 1 || r.max > 65535 || r.min > r.max {
            return Err(SpecError::BadPortRange {
                min: r.min,
                max: r.max,
            });
        }
    }
    Ok(())
}

/// An address one host can own and serve from: loopback or global unicast (as CEL's `isGlobalUnicast` and Go's
/// `net.IP.IsGlobalUnicast` say), so not unspecified, multicast, broadcast or link-local.
pub fn is_concrete_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            let v6 = match v6.to_ipv4_mapped() {
                Some(v4) => return is_concrete_unicast(IpAddr::V4(v4)),
                None => v6,
            };
            !(v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local())
        }
    }
}

/// On a local pool, each fixed port must lie in the pool's port range (`range`, as the operator places under it)
/// or in one of its `fixedPortRanges`: the forwarder binds it on the pool's addresses, on a machine the platform
/// runs, so a tenant takes only ports the pool hands out (a port below 1024 included).
pub fn validate_local_fixed_ports(
    spec: &SharedLBSpec,
    local: &crate::LocalSettings,
    range: (u16, u16),
) -> Result<(), SpecError> {
    let ranges: Vec<(i32, i32)> = std::iter::once((i32::from(range.0), i32::from(range.1)))
        .chain(local.fixed_port_ranges.iter().map(|r| (r.min, r.max)))
        .collect();
    for p in &spec.ports {
        let Some(port) = p.port else { continue };
        if !ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)) {
            let allowed: Vec<String> = ranges.iter().map(|(lo, hi)| format!("{lo}-{hi}")).collect();
            return Err(SpecError::PortNotAllowed {
                name: p.name.clone(),
                port,
                allowed: allowed.join(", "),
            });
        }
    }
    Ok(())
}

/// Checks that a pool's provider keeps its identity: the same kind, and the settings that say where its cloud
/// objects live (the CRD's transition rules say the same to apiservers that run CEL).
pub fn validate_provider_change(old: &ProviderSpec, new: &ProviderSpec) -> Result<(), SpecError> {
    if old.kind() != new.kind() {
        return Err(SpecError::ProviderChanged("the provider"));
    }
    let same = match (old, new) {
        (ProviderSpec { aws: Some(o), .. }, ProviderSpec { aws: Some(n), .. }) => {
            (&o.region, &o.vpc_id, &o.scheme) == (&n.region, &n.vpc_id, &n.scheme)
        }
        (ProviderSpec { gcp: Some(o), .. }, ProviderSpec { gcp: Some(n), .. }) => {
            (&o.project, &o.region, &o.network) == (&n.project, &n.region, &n.network)
        }
        (ProviderSpec { azure: Some(o), .. }, ProviderSpec { azure: Some(n), .. }) => {
            (
                &o.subscription_id,
                &o.resource_group,
                &o.location,
                &o.load_balancer_name,
            ) == (
                &n.subscription_id,
                &n.resource_group,
                &n.location,
                &n.load_balancer_name,
            )
        }
        _ => true,
    };
    if same {
        Ok(())
    } else {
        Err(SpecError::ProviderChanged(
            "where the provider's cloud objects live (region, project, network, subscription, resource group, location, load balancer name)",
        ))
    }
}

/// A local pool's load balancer `<pool>-<i>` is served on its i-th address: an edit of the address list may add
/// addresses and drop unused ones, but an address that carries ports (the pool's status rows, which only the
/// operator writes) must stay where it is, or its SharedLBs would move to another address.
pub fn validate_local_addresses(
    pool: &str,
    rows: &[PoolLoadBalancer],
    new: &ProviderSpec,
) -> Result<(), SpecError> {
    let Some(local) = &new.local else {
        return Ok(());
    };
    for row in rows.iter().filter(|r| r.ports_used > 0) {
        let index = row
            .name
            .strip_prefix(pool)
            .and_then(|i| i.strip_prefix('-'))
            .and_then(|i| i.parse::<usize>().ok());
        let (Some(index), Some(address)) = (index, row.ip.as_ref()) else {
            continue;
        };
        if local.addresses.get(index) != Some(address) {
            return Err(SpecError::AddressInUse {
                address: address.clone(),
                lb: row.name.clone(),
                index,
                ports: row.ports_used,
            });
        }
    }
    Ok(())
}

/// The local addresses to serve with: the pool's list, except that an address carrying ports keeps its position
/// (an edit that would move it is refused by `validate_local_addresses`), so an operator started with a refused
/// edit in place moves nothing either. `None` when the two cannot be put together (a position with neither).
pub fn local_addresses_in_effect(
    pool: &str,
    rows: &[PoolLoadBalancer],
    wanted: &[String],
) -> Option<Vec<String>> {
    let pinned: std::collections::BTreeMap<usize, &String> = rows
        .iter()
        .filter(|r| r.ports_used > 0)
        .filter_map(|r| {
            let index = r.name.strip_prefix(pool)?.strip_prefix('-')?.parse().ok()?;
            Some((index, r.ip.as_ref()?))
        })
        .collect();
    let len = pinned
        .keys()
        .next_back()
        .map_or(0, |i| i + 1)
        .max(wanted.len());
    // the other positions take the wanted addresses no position keeps, each once (two load balancers on one
    // address would put two SharedLBs on one port)
    let mut free = wanted
        .iter()
        .filter(|a| !pinned.values().any(|p| p == a))
        .collect::<BTreeSet<_>>();
    (0..len)
        .map(|i| match pinned.get(&i) {
            Some(a) => Some((*a).clone()),
            None => {
                let pick = wanted
                    .get(i)
                    .filter(|a| free.contains(a))
                    .or_else(|| free.first().copied())?;
                free.remove(pick);
                Some(pick.clone())
            }
        })
        .collect()
}

/// Every name `spec.drain` lists is one of the pool's load balancers (`<pool>-<index>`).
pub fn validate_drain(pool: &str, spec: &LoadBalancerPoolSpec) -> Result<(), SpecError> {
    match spec
        .drain
        .iter()
        .find(|n| load_balancer_index(pool, n).is_none())
    {
        Some(name) => Err(SpecError::BadDrain {
            pool: pool.to_string(),
            name: name.clone(),
        }),
        None => Ok(()),
    }
}

/// The index of load balancer `name` (`<pool>-<index>`) of `pool`.
pub fn load_balancer_index(pool: &str, name: &str) -> Option<u32> {
    let index = name.strip_prefix(pool)?.strip_prefix('-')?;
    // `pool-01` would name load balancer 1 too: only the form the operator writes counts
    index.parse::<u32>().ok().filter(|i| i.to_string() == index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_names_are_the_pools_load_balancers_as_written() {
        use super::{load_balancer_index, validate_drain};
        assert_eq!(load_balancer_index("web", "web-0"), Some(0));
        assert_eq!(load_balancer_index("web", "web-12"), Some(12));
        for other in [
            "web-01", "web-", "web0", "webs-1", "api-1", "web--1", "web-1x",
        ] {
            assert_eq!(load_balancer_index("web", other), None, "{other}");
        }
        let spec = |names: &[&str]| -> LoadBalancerPoolSpec {
            serde_json::from_value(serde_json::json!({"provider": {"memory": {}}, "drain": names}))
                .expect("spec")
        };
        assert!(validate_drain("web", &spec(&["web-0", "web-3"])).is_ok());
        let e = validate_drain("web", &spec(&["web-0", "api-1"])).expect_err("another pool's");
        assert_eq!(e.reason(), "InvalidDrain");
        assert!(e.to_string().contains("\"api-1\""), "{e}");
        assert_eq!(
            spec(&["web-0", "web-3", "api-1"]).drained("web"),
            [0, 3].into_iter().collect()
        );
    }

    #[test]
    fn a_local_address_that_carries_ports_stays_where_it_is() {
        let row = |i: u32, ip: &str, used: u32| PoolLoadBalancer {
            name: format!("web-{i}"),
            id: None,
            ip: Some(ip.into()),
            hostname: None,
            ports_used: used,
            capacity: 10,
            ..PoolLoadBalancer::default()
        };
        let rows = [
            row(0, "10.0.0.1", 3),
            row(1, "10.0.0.2", 0),
            row(2, "10.0.0.3", 1),
        ];
        let local = |a: &[&str]| ProviderSpec {
            local: Some(crate::LocalSettings {
                addresses: a.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // adding, and dropping an unused address at the end, are fine
        let grown = local(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        assert_eq!(validate_local_addresses("web", &rows, &grown), Ok(()));
        // dropping the unused middle one moves 10.0.0.3 (in use) from position 2 to 1
        let shifted = local(&["10.0.0.1", "10.0.0.3"]);
        assert_eq!(
            validate_local_addresses("web", &rows, &shifted),
            Err(SpecError::AddressInUse {
                address: "10.0.0.3".into(),
                lb: "web-2".into(),
                index: 2,
                ports: 1
            })
        );
        let replaced = local(&["10.0.0.9", "10.0.0.2", "10.0.0.3"]);
        let e = validate_local_addresses("web", &rows, &replaced).expect_err("in use");
        assert_eq!(e.reason(), "AddressInUse");
        assert!(e.to_string().contains("10.0.0.1") && e.to_string().contains("web-0"));

        // what is served meanwhile: the addresses in use where they were, the rest as asked
        let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let in_effect = |a: &[&str]| local_addresses_in_effect("web", &rows, &owned(a));
        assert_eq!(
            in_effect(&["10.0.0.1", "10.0.0.3", "10.0.0.4"]),
            Some(owned(&["10.0.0.1", "10.0.0.4", "10.0.0.3"]))
        );
        assert_eq!(
            in_effect(&["10.0.0.1", "10.0.0.3"]),
            None,
            "no address left for position 1"
        );
        assert_eq!(
            in_effect(&["10.0.0.9", "10.0.0.8", "10.0.0.7", "10.0.0.6"]),
            Some(owned(&["10.0.0.1", "10.0.0.8", "10.0.0.3", "10.0.0.6"]))
        );
        assert_eq!(in_effect(&["10.0.0.1"]), None, "position 1 has neither");
    }
    use crate::{Cidr, Protocol, SharedLBPort};

    fn spec() -> SharedLBSpec {
        SharedLBSpec {
            selector: [("app".to_string(), "echo".to_string())].into(),
            ports: vec![SharedLBPort {
                name: "tcp".into(),
                port: Some(4001),
                target_port: IntOrString::Int(8080),
                protocol: Protocol::Tcp,
                health_check_port: None,
            }],
            pool: None,
            source_ranges: None,
            migration: None,
            proxy_protocol: None,
        }
    }

    #[test]
    fn accepts_a_good_spec() {
        assert_eq!(validate_shared_lb("echo", &spec()), Ok(()));
    }

    #[test]
    fn refuses_each_bad_input_with_its_reason() {
        type Mutation = Box<dyn Fn(&mut SharedLBSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.ports.clear()), "InvalidPorts"),
            (
                Box::new(|s| s.ports[0].name = "Bad_Name".into()),
                "InvalidPortName",
            ),
            (
                Box::new(|s| s.ports.push(s.ports[0].clone())),
                "InvalidPortName",
            ),
            (Box::new(|s| s.ports[0].port = Some(70000)), "InvalidPort"),
            (
                Box::new(|s| {
                    let mut p = s.ports[0].clone();
                    p.name = "other".into();
                    s.ports.push(p)
                }),
                "InvalidPort",
            ),
            (
                Box::new(|s| s.ports[0].target_port = IntOrString::Int(0)),
                "InvalidTargetPort",
            ),
            (Box::new(|s| s.selector.clear()), "InvalidSelector"),
            (
                Box::new(|s| {
                    s.selector.insert("bad key!".into(), "x".into());
                }),
                "InvalidSelector",
            ),
            (
                Box::new(|s| s.source_ranges = Some(vec![Cidr("10.0.0.0/33".into())])),
                "InvalidSourceRange",
            ),
        ];
        for (mutate, reason) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = validate_shared_lb("echo", &s).expect_err(reason);
            assert_eq!(err.reason(), reason, "{err}");
        }
        for bad_name in ["x".repeat(60), "web.v1".into(), "1web".into(), "Web".into()] {
            assert_eq!(
                validate_shared_lb(&bad_name, &spec()).map_err(|e| e.reason()),
                Err("InvalidName"),
                "{bad_name}"
            );
        }
        assert_eq!(validate_shared_lb(&"w".repeat(54), &spec()), Ok(()));
    }

    fn local_pool(addresses: &[&str]) -> LoadBalancerPoolSpec {
        LoadBalancerPoolSpec {
            provider: ProviderSpec {
                local: Some(crate::LocalSettings {
                    addresses: addresses.iter().map(|a| a.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            capacity: Default::default(),
            port_range: None,
            placement: Default::default(),
            namespace_selector: None,
            default: false,
            drain: Vec::new(),
        }
    }

    #[test]
    fn a_local_pool_lets_fixed_ports_come_from_its_ranges_only() {
        let mut local = crate::LocalSettings {
            addresses: vec!["127.0.0.10".into()],
            ..Default::default()
        };
        let spec_with = |ports: &[i32]| SharedLBSpec {
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, p)| SharedLBPort {
                    name: format!("p{i}"),
                    port: Some(*p),
                    target_port: IntOrString::Int(80),
                    protocol: Protocol::Tcp,
                    health_check_port: None,
                })
                .collect(),
            ..spec()
        };
        let range = (10000, 19999);
        let check = |s: &SharedLBSpec, l: &crate::LocalSettings| {
            validate_local_fixed_ports(s, l, range).map_err(|e| e.reason())
        };
        assert_eq!(check(&spec_with(&[10000, 19999]), &local), Ok(()));
        for refused in [9999, 20000, 80, 443, 22] {
            assert_eq!(
                check(&spec_with(&[10000, refused]), &local),
                Err("PortNotAllowed"),
                "{refused}"
            );
        }
        local.fixed_port_ranges = vec![crate::PortRange { min: 443, max: 443 }];
        assert_eq!(check(&spec_with(&[443, 10001]), &local), Ok(()));
        assert_eq!(check(&spec_with(&[80]), &local), Err("PortNotAllowed"));
        let e = validate_local_fixed_ports(&spec_with(&[80]), &local, range).expect_err("80");
        assert!(e.to_string().contains("10000-19999, 443-443"), "{e}");
    }

    #[test]
    fn local_addresses_must_be_concrete_ip_addresses() {
        let good = ["127.0.0.10", "::1", "192.0.2.10", "2001:db8::10"];
        assert_eq!(validate_pool(&local_pool(&good)), Ok(()));
        for bad in [
            "0.0.0.0",
            "::",
            "localhost",
            "10.0.0.1/32",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.169.254",
            "fe80::1",
            "ff02::1",
            "::ffff:169.254.1.1",
        ] {
            assert_eq!(
                validate_pool(&local_pool(&[bad])).map_err(|e| e.reason()),
                Err("InvalidAddress"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_providers_identity_cannot_change() {
        let aws = |region: &str, vpc: Option<&str>| ProviderSpec {
            aws: Some(crate::AwsSettings {
                region: region.into(),
                vpc_id: vpc.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        let local = local_pool(&["127.0.0.10"]).provider;
        let mut more_rules = aws("eu-west-1", Some("vpc-1"));
        if let Some(a) = more_rules.aws.as_mut() {
            a.security_group_rule_limit = Some(200);
        }
        assert_eq!(
            validate_provider_change(&aws("eu-west-1", Some("vpc-1")), &more_rules),
            Ok(())
        );
        for (old, new) in [
            (aws("eu-west-1", None), local.clone()),
            (aws("eu-west-1", None), aws("us-east-1", None)),
            (aws("eu-west-1", Some("vpc-1")), aws("eu-west-1", None)),
        ] {
            assert_eq!(
                validate_provider_change(&old, &new).map_err(|e| e.reason()),
                Err("ProviderChanged")
            );
        }
        assert_eq!(
            validate_provider_change(&local, &local_pool(&["127.0.0.11"]).provider),
            Ok(())
        );
    }

    #[test]
    fn same_port_on_two_protocols_is_allowed() {
        let mut s = spec();
        let mut udp = s.ports[0].clone();
        udp.name = "udp".into();
        udp.protocol = Protocol::Udp;
        s.ports.push(udp);
        assert_eq!(validate_shared_lb("dns", &s), Ok(()));
    }
}
