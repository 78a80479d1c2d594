//! The ready endpoints behind a backing Service, from its EndpointSlices, for providers that forward to
//! endpoints themselves (`local`). The cluster may serve `discovery.k8s.io/v1` or, before 1.21, only `v1beta1`:
//! the version is discovered once and both are read through the fields they share.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde::Deserialize;

use crate::Error;

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

    /// Ready endpoints of `service` by (service port name, protocol). An endpoint with no `ready` condition
    /// counts as ready, as the API documents.
    pub async fn ready_endpoints(
        &self,
        client: &Client,
        namespace: &str,
        service: &str,
    ) -> Result<BTreeMap<(String, String), Vec<SocketAddr>>, Error> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &self.resource);
        let list = api
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}")))
            .await
            .map_err(Error::from_kube)?;
        let mut out: BTreeMap<(String, String), Vec<SocketAddr>> = BTreeMap::new();
        for obj in list.items {
            let Ok(slice) = serde_json::from_value::<Slice>(obj.data) else {
                continue;
            };
            let ready: Vec<IpAddr> = slice
                .endpoints
                .iter()
                .filter(|e| e.conditions.ready != Some(false))
                .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
                .collect();
            for p in &slice.ports {
                let (Some(port), name) = (
                    p.port.and_then(|x| u16::try_from(x).ok()),
                    p.name.clone().unwrap_or_default(),
                ) else {
                    continue;
                };
                let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                out.entry((name, protocol))
                    .or_default()
                    .extend(ready.iter().map(|ip| SocketAddr::new(*ip, port)));
            }
        }
        for v in out.values_mut() {
            v.sort();
            v.dedup();
        }
        Ok(out)
    }
}
