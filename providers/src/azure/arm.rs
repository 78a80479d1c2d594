//! Typed ARM request/response models for the few `Microsoft.Network` resources the azure provider uses
//! (api-version [`API_VERSION`]): load balancers, public IP addresses, network security groups, and ARM's error
//! and async-operation shapes. Field names are ARM's. Every object keeps the fields it does not model in `other`
//! and writes them back unchanged, so a read-modify-write PUT never drops what someone else set (the NSG is
//! shared with the cluster). An official resource-manager crate can replace this module later.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The Microsoft.Network API version every call uses.
pub const API_VERSION: &str = "2024-05-01";

/// A top-level ARM resource with typed `properties`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource<P> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<Sku>,
    pub properties: P,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sku {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// A reference to another resource or child resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubResource {
    pub id: String,
}

/// A named child resource (frontend, rule, probe, security rule...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Child<P> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    pub properties: P,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl<P> Child<P> {
    pub fn new(name: impl Into<String>, properties: P) -> Self {
        Child {
            id: None,
            name: name.into(),
            properties,
            other: Map::new(),
        }
    }
}

pub type LoadBalancer = Resource<LoadBalancerProperties>;
pub type PublicIpAddress = Resource<PublicIpProperties>;
pub type NetworkSecurityGroup = Resource<NsgProperties>;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadBalancerProperties {
    #[serde(rename = "frontendIPConfigurations", default)]
    pub frontends: Vec<Child<FrontendProperties>>,
    #[serde(rename = "backendAddressPools", default)]
    pub backend_pools: Vec<Child<BackendPoolProperties>>,
    #[serde(rename = "loadBalancingRules", default)]
    pub rules: Vec<Child<RuleProperties>>,
    #[serde(default)]
    pub probes: Vec<Child<ProbeProperties>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FrontendProperties {
    #[serde(
        rename = "publicIPAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ip: Option<SubResource>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BackendPoolProperties {
    #[serde(rename = "loadBalancerBackendAddresses", default)]
    pub addresses: Vec<Child<BackendAddressProperties>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct BackendAddressProperties {
    #[serde(rename = "ipAddress", default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(
        rename = "virtualNetwork",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_network: Option<SubResource>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleProperties {
    #[serde(rename = "frontendIPConfiguration")]
    pub frontend: SubResource,
    #[serde(
        rename = "backendAddressPool",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_pool: Option<SubResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<SubResource>,
    /// `Tcp`, `Udp` or `All`.
    pub protocol: String,
    #[serde(rename = "frontendPort")]
    pub frontend_port: u16,
    #[serde(rename = "backendPort")]
    pub backend_port: u16,
    #[serde(rename = "enableFloatingIP", default)]
    pub floating_ip: bool,
    #[serde(rename = "disableOutboundSnat", default)]
    pub disable_outbound_snat: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeProperties {
    /// `Tcp`, `Http` or `Https`.
    pub protocol: String,
    pub port: u16,
    #[serde(
        rename = "intervalInSeconds",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub interval_seconds: Option<u32>,
    #[serde(
        rename = "numberOfProbes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub number_of_probes: Option<u32>,
    /// For `Http` probes.
    #[serde(
        rename = "requestPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub request_path: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PublicIpProperties {
    #[serde(
        rename = "publicIPAllocationMethod",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allocation_method: Option<String>,
    #[serde(
        rename = "publicIPAddressVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    #[serde(rename = "ipAddress", default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NsgProperties {
    #[serde(rename = "securityRules", default)]
    pub security_rules: Vec<Child<SecurityRuleProperties>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityRuleProperties {
    /// `Tcp`, `Udp`, `Icmp`, `Esp`, `Ah` or `*`.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_port_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_address_prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_address_prefix: Option<String>,
    /// `Allow` or `Deny`.
    pub access: String,
    pub priority: u32,
    /// `Inbound` or `Outbound`.
    pub direction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A list response.
#[derive(Debug, Clone, Deserialize)]
pub struct List<T> {
    #[serde(default = "Vec::new")]
    pub value: Vec<T>,
    #[serde(rename = "nextLink", default)]
    pub next_link: Option<String>,
}

/// ARM's error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorResponse {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// What an `Azure-AsyncOperation` URL returns.
#[derive(Debug, Clone, Deserialize)]
pub struct AsyncOperation {
    /// `InProgress`, `Succeeded`, `Failed` or `Canceled`.
    pub status: String,
    #[serde(default)]
    pub error: Option<ErrorDetail>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the models do not know survives a read-modify-write: a PUT must not drop others' settings.
    #[test]
    fn unknown_fields_round_trip() {
        let doc = serde_json::json!({
            "name": "nsg", "location": "westeurope", "etag": "W/\"1\"", "tags": {},
            "properties": {
                "securityRules": [{"name": "theirs", "properties": {
                    "protocol": "Tcp", "access": "Allow", "priority": 100, "direction": "Inbound",
                    "sourceApplicationSecurityGroups": [{"id": "asg"}]}}],
                "flowLogs": [{"id": "f"}]
            }
        });
        let nsg: NetworkSecurityGroup = serde_json::from_value(doc.clone()).expect("parse");
        assert_eq!(nsg.properties.security_rules[0].properties.priority, 100);
        let back = serde_json::to_value(&nsg).expect("serialize");
        assert_eq!(
            back["properties"]["securityRules"][0]["properties"]["sourceApplicationSecurityGroups"],
            doc["properties"]["securityRules"][0]["properties"]["sourceApplicationSecurityGroups"]
        );
        assert_eq!(
            back["properties"]["flowLogs"],
            doc["properties"]["flowLogs"]
        );
    }
}
