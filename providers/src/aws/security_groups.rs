//! The security groups of the pool's NLBs, as AWS's Load Balancer Controller arranges them since NLBs took
//! security groups: each NLB has its own ("frontend") group, which opens its listener ports to the client
//! ranges; all NLBs of the pool share one "backend" group, which the nodes' group admits on the node-port range
//! and kube-proxy's health port. Clients are filtered at the NLB, per NLB, and the nodes' group holds a constant
//! three rules of the pool's however many ports it serves.
//!
//! Groups are named (`<prefix><index>`, `<prefix>backend`: unique in the VPC, so a retry cannot make a second)
//! and tagged with the cluster, the pool and their role at creation, in the same call; they are found again by
//! those tags, so a crash between making a group and its NLB leaves a group the next ensure reuses or the next
//! delete removes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elb;
use ec2::error::ProvideErrorMetadata;
use ec2::types::{Filter, IpPermission, ResourceType, TagSpecification, UserIdGroupPair};

use super::{AwsProvider, KUBE_PROXY_HEALTH_PORT, NODE_PORT_RANGE, classify};
use crate::{ProviderError, tags};

/// Which of the pool's groups a security group is (its `sharedlb.dev/security-group` tag, and the index tag
/// of a frontend group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecurityGroupRole {
    Frontend(u32),
    Backend,
}

/// Where one NLB's listeners are opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Firewall {
    /// In the NLB's own group (the listener port, from the client ranges); the node group admits `backend`.
    Frontend { group: String, backend: String },
    /// In the node group (the node port, from the client ranges and the VPC): an NLB made before NLBs had
    /// security groups, which AWS does not let anyone add to it.
    Nodes,
}

const TAG_ROLE: &str = "sharedlb.dev/security-group";
const FRONTEND: &str = "frontend";
const BACKEND: &str = "backend";
/// The node group's rules that admit the backend group: the node-port range in TCP and UDP, and kube-proxy's
/// health port (UDP target groups are health-checked there); with pod targets, every port in TCP and UDP.
pub(super) const NODE_ACCESS_RULES: u32 = 3;
/// Between two attempts to delete a group AWS still holds (`DependencyViolation`).
const RELEASE_POLL: Duration = Duration::from_secs(5);

impl AwsProvider {
    /// The pool's security groups in its VPC, found by their tags; remembered for `firewall_of`. What is
    /// remembered is added to, not replaced: EC2 may list a group only a moment after making it, and a deleted
    /// group is forgotten by `delete_group` (a stale entry is only ever matched against an NLB's own groups).
    pub(super) async fn pool_groups(
        &self,
    ) -> Result<Vec<(String, SecurityGroupRole)>, ProviderError> {
        self.security_groups_where(None).await
    }

    /// The pool's groups in its VPC (by their cluster and pool tags), and of that name when one is given.
    async fn security_groups_where(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<(String, SecurityGroupRole)>, ProviderError> {
        let f = |k: &str, v: &str| Filter::builder().name(k).values(v).build();
        let mut filters = vec![
            f("vpc-id", &self.settings.vpc_id),
            f(&format!("tag:{}", tags::CLUSTER), &self.cluster_id),
            f(&format!("tag:{}", tags::POOL), &self.pool),
        ];
        filters.extend(name.map(|n| f("group-name", n)));
        let mut pages = self
            .ec2
            .describe_security_groups()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("describe_security_groups", e))?;
            for g in page.security_groups() {
                let t: BTreeMap<&str, &str> = g
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value()?)))
                    .collect();
                let role = match t.get(TAG_ROLE).copied() {
                    Some(BACKEND) => SecurityGroupRole::Backend,
                    Some(FRONTEND) => match t.get(tags::INDEX).and_then(|i| i.parse().ok()) {
                        Some(i) => SecurityGroupRole::Frontend(i),
                        None => continue,
                    },
                    _ => continue,
                };
                if let Some(id) = g.group_id() {
                    found.push((id.to_string(), role));
                }
            }
        }
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(found.iter().cloned());
        Ok(found)
    }

    /// The groups a new NLB is made with, `[frontend, backend]`, found or made; the node group admits the
    /// backend group before any NLB can send through it. Called under `creating`.
    pub(super) async fn groups_for_new_lb(&self, index: u32) -> Result<Vec<String>, ProviderError> {
        let have = self.pool_groups().await?;
        let find = |role| {
            have.iter()
                .find(|(_, r)| *r == role)
                .map(|(id, _)| id.clone())
        };
        let backend = match find(SecurityGroupRole::Backend) {
            Some(id) => id,
            None => self.make_group(SecurityGroupRole::Backend).await?,
        };
        self.ensure_node_access(&backend).await?;
        let frontend = match find(SecurityGroupRole::Frontend(index)) {
            Some(id) => id,
            None => self.make_group(SecurityGroupRole::Frontend(index)).await?,
        };
        Ok(vec![frontend, backend])
    }

    /// Makes one of the pool's groups, tagged in the same call. Its default egress (everything) stays: an NLB's
    /// groups also govern what it sends to the nodes, health checks included.
    async fn make_group(&self, role: SecurityGroupRole) -> Result<String, ProviderError> {
        let (name, what) = match role {
            SecurityGroupRole::Frontend(i) => (self.lb_name(i), format!("clients of NLB {i}")),
            SecurityGroupRole::Backend => {
                (format!("{}{BACKEND}", self.prefix), "NLBs to nodes".into())
            }
        };
        let made = self
            .ec2
            .create_security_group()
            .group_name(&name)
            .description(format!("{}: {what}", self.description()))
            .vpc_id(&self.settings.vpc_id)
            .tag_specifications(self.group_tags(role))
            .send()
            .await
            .map_err(|e| classify("create_security_group", e));
        let id = match made {
            Ok(m) => m.group_id.ok_or_else(|| {
                ProviderError::Other("aws: create_security_group returned no id".into())
            })?,
            Err(ProviderError::AlreadyExists(m)) => self.claim_named(&name, role, &m).await?,
            Err(e) => return Err(e),
        };
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), role);
        Ok(id)
    }

    fn group_tags(&self, role: SecurityGroupRole) -> TagSpecification {
        let tag = |k: &str, v: &str| ec2::types::Tag::builder().key(k).value(v).build();
        let spec = TagSpecification::builder()
            .resource_type(ResourceType::SecurityGroup)
            .tags(tag(tags::MANAGED_BY, "sharedlb"))
            .tags(tag(tags::CLUSTER, &self.cluster_id))
            .tags(tag(tags::POOL, &self.pool));
        match role {
            SecurityGroupRole::Frontend(i) => spec
                .tags(tag(TAG_ROLE, FRONTEND))
                .tags(tag(tags::INDEX, &i.to_string())),
            SecurityGroupRole::Backend => spec.tags(tag(TAG_ROLE, BACKEND)),
        }
        .build()
    }

    /// The name is taken in the VPC: the group is ours if it carries the pool's tags and this role (made a
    /// moment ago and not yet listed by tags), someone else's if not.
    async fn claim_named(
        &self,
        name: &str,
        role: SecurityGroupRole,
        refusal: &str,
    ) -> Result<String, ProviderError> {
        let named = self.security_groups_where(Some(name)).await?;
        match named.into_iter().find(|(_, r)| *r == role) {
            Some((id, _)) => Ok(id),
            None => Err(ProviderError::AlreadyExists(format!(
                "aws: a security group named {name} exists in {} that sharedlb did not make for this cluster and pool ({refusal})",
                self.settings.vpc_id
            ))),
        }
    }

    /// How this NLB's listeners are opened: by its own group when it has groups, in the node group when not.
    pub(super) async fn firewall_of(
        &self,
        index: u32,
        nlb: &elb::types::LoadBalancer,
    ) -> Result<Firewall, ProviderError> {
        let ids = nlb.security_groups();
        if ids.is_empty() {
            return Ok(Firewall::Nodes);
        }
        let known = || {
            let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let of = |role| {
                ids.iter()
                    .find(|id| groups.get(id.as_str()) == Some(&role))
                    .cloned()
            };
            Some(Firewall::Frontend {
                group: of(SecurityGroupRole::Frontend(index))?,
                backend: of(SecurityGroupRole::Backend)?,
            })
        };
        if let Some(fw) = known() {
            return Ok(fw);
        }
        let found = self.pool_groups().await?;
        known().ok_or_else(|| {
            ProviderError::Other(format!(
                "aws: {} has security groups {ids:?}, but not sharedlb's frontend and backend groups for it (the pool's groups: {found:?})",
                self.lb_name(index)
            ))
        })
    }

    /// The node group's rules that admit `backend`, described as sharedlb's.
    fn node_access_permissions(&self, backend: &str) -> Vec<IpPermission> {
        let (lo, hi) = NODE_PORT_RANGE;
        // pods listen on any port, and are health-checked on the port they serve
        let rules: &[(&str, u16, u16)] = if self.settings.pod_targets {
            &[("tcp", 0, u16::MAX), ("udp", 0, u16::MAX)]
        } else {
            &[
                ("tcp", lo, hi),
                ("udp", lo, hi),
                ("tcp", KUBE_PROXY_HEALTH_PORT, KUBE_PROXY_HEALTH_PORT),
            ]
        };
        rules
            .iter()
            .map(|(proto, from, to)| {
                self.node_access_permission(backend, proto, i32::from(*from), i32::from(*to))
            })
            .collect()
    }

    /// One rule of the node group that admits `backend`, with sharedlb's description.
    fn node_access_permission(
        &self,
        backend: &str,
        proto: &str,
        from: i32,
        to: i32,
    ) -> IpPermission {
        let pair = UserIdGroupPair::builder()
            .group_id(backend)
            .description(self.description())
            .build();
        IpPermission::builder()
            .ip_protocol(proto)
            .from_port(from)
            .to_port(to)
            .user_id_group_pairs(pair)
            .build()
    }

    /// (protocol, from, to) of the node group's rules whose source is `backend`.
    async fn node_access_rules(
        &self,
        node_sg: &str,
        backend: &str,
    ) -> Result<BTreeSet<(String, i32, i32)>, ProviderError> {
        let r = self
            .ec2
            .describe_security_groups()
            .group_ids(node_sg)
            .send()
            .await
            .map_err(|e| classify("describe_security_groups", e))?;
        Ok(r.security_groups()
            .iter()
            .flat_map(|g| g.ip_permissions())
            .filter(|p| {
                p.user_id_group_pairs()
                    .iter()
                    .any(|g| g.group_id() == Some(backend))
            })
            .map(rule_key)
            .collect())
    }

    /// The node group admits the backend group: read again once older than the firewall recheck, so a rule
    /// deleted behind the operator's back comes back; only what is missing is added.
    pub(super) async fn ensure_node_access(&self, backend: &str) -> Result<(), ProviderError> {
        let Some(node_sg) = &self.settings.node_security_group_id else {
            return Ok(());
        };
        let mut seen = self.node_access.lock().await;
        let fresh = seen
            .as_ref()
            .is_some_and(|(b, at)| b == backend && at.elapsed() < self.firewall_recheck);
        if fresh {
            return Ok(());
        }
        let have = self.node_access_rules(node_sg, backend).await?;
        let wanted = self.node_access_permissions(backend);
        let missing: Vec<IpPermission> = wanted
            .iter()
            .filter(|p| !have.contains(&rule_key(p)))
            .cloned()
            .collect();
        if !missing.is_empty() {
            self.authorize(node_sg, missing).await?;
        }
        // what the other kind of targets needed (the pool changed `targets`) goes, after the new rules are in
        let wanted: BTreeSet<_> = wanted.iter().map(rule_key).collect();
        let extra: Vec<IpPermission> = have
            .difference(&wanted)
            .map(|(proto, from, to)| self.node_access_permission(backend, proto, *from, *to))
            .collect();
        self.revoke_from_nodes(node_sg, extra).await?;
        *seen = Some((backend.to_string(), Instant::now()));
        Ok(())
    }

    /// Takes the node group's rules that admit `backend` away (AWS deletes no group another group's rule
    /// names).
    async fn revoke_node_access(&self, backend: &str) -> Result<(), ProviderError> {
        *self.node_access.lock().await = None;
        let Some(node_sg) = &self.settings.node_security_group_id else {
            return Ok(());
        };
        let present: Vec<IpPermission> = self
            .node_access_rules(node_sg, backend)
            .await?
            .iter()
            .map(|(proto, from, to)| self.node_access_permission(backend, proto, *from, *to))
            .collect();
        self.revoke_from_nodes(node_sg, present).await
    }

    async fn revoke_from_nodes(
        &self,
        node_sg: &str,
        rules: Vec<IpPermission>,
    ) -> Result<(), ProviderError> {
        if rules.is_empty() {
            return Ok(());
        }
        crate::gone_is_ok(
            self.ec2
                .revoke_security_group_ingress()
                .group_id(node_sg)
                .set_ip_permissions(Some(rules))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("revoke_security_group_ingress", e)),
        )
    }

    /// Deletes the frontend groups of NLBs not in `live` (the one just deleted, any a crash left), and with
    /// no NLB left the backend group. Called under `creating`.
    pub(super) async fn release_groups(&self, live: &BTreeSet<u32>) -> Result<(), ProviderError> {
        let groups = self.pool_groups().await?;
        for (id, role) in &groups {
            if matches!(role, SecurityGroupRole::Frontend(i) if !live.contains(i)) {
                self.delete_group(id).await?;
            }
        }
        if live.is_empty() {
            for (id, _) in groups
                .iter()
                .filter(|(_, r)| *r == SecurityGroupRole::Backend)
            {
                self.revoke_node_access(id).await?;
                self.delete_group(id).await?;
            }
        }
        Ok(())
    }

    /// Deletes a group, gone already being success. A just-deleted NLB's network interfaces hold its groups
    /// for a while (`DependencyViolation`): waited for up to `group_release_wait`, so that one delete call
    /// usually finishes the job, then an error for the caller to retry.
    async fn delete_group(&self, id: &str) -> Result<(), ProviderError> {
        let deadline = Instant::now() + self.group_release_wait;
        loop {
            match self.ec2.delete_security_group().group_id(id).send().await {
                Err(e) if e.code() == Some("DependencyViolation") && Instant::now() < deadline => {
                    tokio::time::sleep(RELEASE_POLL).await;
                }
                r => {
                    crate::gone_is_ok(
                        r.map(|_| ())
                            .map_err(|e| classify("delete_security_group", e)),
                    )?;
                    break;
                }
            }
        }
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(sg, _, _), _| sg != id);
        Ok(())
    }
}

/// A rule's (protocol, from port, to port), to compare what a group holds with what is wanted.
fn rule_key(p: &IpPermission) -> (String, i32, i32) {
    (
        p.ip_protocol().unwrap_or_default().to_string(),
        p.from_port().unwrap_or_default(),
        p.to_port().unwrap_or_default(),
    )
}
