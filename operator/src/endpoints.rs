//! The ready endpoints behind a backing Service, from its EndpointSlices, for providers that forward to
//! endpoints themselves (`local`). The cluster may serve `discovery.k8s.io/v1` or, before 1.21, only `v1beta1`:
//! the version is discovered once and both are read through the fields they share.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use sharedlb_crds::{LocalSettings, is_concrete_unicast};

use crate::Error;
use crate::model::Endpoints;

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone)]
pub struct EndpointSlices {
    resource: ApiResource,
}

#[derive(Deserialize)]
struct Slice {
    #[serde(default)]
    endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    ports: Vec<SlicePort>,
}

#[derive(Deserialize)]
struct SliceEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: SliceConditions,
}

#[derive(Deserialize, Default)]
struct SliceConditions {
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct SlicePort {
    name: Option<String>,
    port: Option<i32>,
    protocol: Option<String>,
}

impl EndpointSlices {
    /// Asks the apiserver which EndpointSlice version it serves.
    pub async fn discover(client: &Client) -> Result<Self, Error> {
        let version = match client.list_api_group_resources("discovery.k8s.io/v1").await {
            Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => "v1",
            _ => "v1beta1",
        };
        let gvk = GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice");
        Ok(EndpointSlices {
            resource: ApiResource::from_gvk_with_plural(&gvk, "endpointslices"),
        })
    }

    pub fn resource(&self) -> &ApiResource {
        &self.resource
    }

    /// Ready endpoints of `service` by (service port name, protocol), from the slices `policy` trusts and
    /// without the addresses it refuses; what was refused is listed for the SharedLB's status. An endpoint with
    /// no `ready` condition counts as ready, as the API documents.
    pub async fn ready_endpoints(
        &self,
        client: &Client,
        namespace: &str,
        service: &str,
        policy: &EndpointPolicy,
    ) -> Result<Backends, Error> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &self.resource);
        let list = api
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}")))
            .await
            .map_err(Error::from_kube)?;
        Ok(backends_from(&list.items, policy))
    }
}

/// The backends `slices` (of one Service) give under `policy`.
pub fn backends_from<'a>(
    slices: impl IntoIterator<Item = &'a DynamicObject>,
    policy: &EndpointPolicy,
) -> Backends {
    let mut out = Backends::default();
    for obj in slices {
        let manager = obj
            .labels()
            .get(MANAGED_BY_LABEL)
            .cloned()
            .unwrap_or_default();
        if !policy.trusts(&manager) {
            out.refused.insert(format!(
                "EndpointSlice {} (managed by {manager:?}, not a manager the pool trusts)",
                obj.name_any()
            ));
            continue;
        }
        let Ok(slice) = Slice::deserialize(&obj.data) else {
            continue;
        };
        let mut ready: Vec<IpAddr> = Vec::new();
        let addresses = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false))
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()));
        for ip in addresses {
            match policy.refuses(ip) {
                Some(why) => {
                    out.refused.insert(format!("{ip} ({why})"));
                }
                None => ready.push(ip),
            }
        }
        for p in &slice.ports {
            let (Some(port), name) = (
                p.port.and_then(|x| u16::try_from(x).ok()),
                p.name.clone().unwrap_or_default(),
            ) else {
                continue;
            };
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            out.ready
                .entry((name, protocol))
                .or_default()
                .extend(ready.iter().map(|ip| SocketAddr::new(*ip, port)));
        }
    }
    for v in out.ready.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// What the forwarder may send to, read from the backing Service's EndpointSlices.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Backends {
    pub ready: Endpoints,
    /// Slices and addresses left out, each with why, for the SharedLB's status and Events.
    pub refused: BTreeSet<String>,
}

/// The manager label of the EndpointSlice controller, which writes slices from the ready pods a Service selects.
pub const ENDPOINT_SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Cloud metadata and platform endpoints that are not link-local, so the link-local rule alone misses them:
/// AWS's IPv6 instance metadata, Azure's wire server, Alibaba Cloud's metadata.
const METADATA_ADDRESSES: [IpAddr; 3] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

/// Which slices and addresses a local pool's listeners forward to: slices of the EndpointSlice controller or a
/// manager the pool names, and pod addresses only (never link-local, where clouds serve metadata, nor the
/// machine's own loopback unless the pool allows it for a single machine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    managers: Vec<String>,
    allow_loopback: bool,
    any_manager: bool,
    /// The pool's own addresses: a listener forwarding to one would loop.
    own: Vec<IpAddr>,
}

impl EndpointPolicy {
    pub fn of(local: &LocalSettings) -> Self {
        EndpointPolicy {
            managers: local.endpoint_slice_managers.clone(),
            allow_loopback: local.allow_loopback_endpoints,
            any_manager: false,
            own: local
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
        }
    }

    /// For a cloud's pod targets: the cloud checks its targets are its network's addresses, and the pool names
    /// no managers, so every slice of the Service is read; the addresses are still checked.
    pub fn cloud() -> Self {
        EndpointPolicy {
            any_manager: true,
            ..EndpointPolicy::default()
        }
    }

    pub fn trusts(&self, manager: &str) -> bool {
        self.any_manager
            || manager == ENDPOINT_SLICE_CONTROLLER
            || self.managers.iter().any(|m| m == manager)
    }

    /// Why `ip` is no endpoint to forward to, if it is not.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = ip.to_canonical();
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if link_local || METADATA_ADDRESSES.contains(&ip) {
            Some("link-local or cloud metadata address")
        } else if self.own.contains(&ip) {
            Some("an address of the pool itself: a loop")
        } else if ip.is_loopback() {
            (!self.allow_loopback).then_some("loopback: the forwarder's own machine")
        } else if !is_concrete_unicast(ip) {
            Some("not a unicast address")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_pool_forwards_to_pod_addresses_only() {
        let mut local = LocalSettings::default();
        let strict = EndpointPolicy::of(&local);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        for pod in ["10.244.1.7", "192.0.2.40", "2001:db8::7", "fd00:10::7"] {
            assert_eq!(strict.refuses(ip(pod)), None, "{pod}");
        }
        for (bad, why) in [
            ("169.254.169.254", "metadata"),
            ("::ffff:169.254.169.254", "metadata"),
            ("fd00:ec2::254", "metadata"),
            ("168.63.129.16", "metadata"),
            ("fe80::1", "link-local"),
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unicast"),
            ("224.0.0.251", "unicast"),
            ("255.255.255.255", "unicast"),
        ] {
            let said = strict.refuses(ip(bad)).unwrap_or_default();
            assert!(said.contains(why), "{bad}: {said:?}");
        }
        local.allow_loopback_endpoints = true;
        local.endpoint_slice_managers = vec!["sharedlb-demo".into()];
        local.addresses = vec!["127.0.0.10".into()];
        let single_machine = EndpointPolicy::of(&local);
        assert_eq!(single_machine.refuses(ip("127.0.0.1")), None);
        let own = single_machine.refuses(ip("127.0.0.10")).unwrap_or_default();
        assert!(own.contains("loop"), "the pool's own address: {own:?}");
        assert!(single_machine.refuses(ip("169.254.169.254")).is_some());
        assert!(strict.trusts(ENDPOINT_SLICE_CONTROLLER) && !strict.trusts("sharedlb-demo"));
        assert!(single_machine.trusts("sharedlb-demo") && !single_machine.trusts("mirror"));
    }
}
