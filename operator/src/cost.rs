//! What a pool's load balancers cost per hour: an estimate from a price table per provider, which the user
//! overrides (`--prices`) for their region, discounts or currency. Traffic charges (AWS LCUs, data processing)
//! depend on traffic, not on the packing, and are left out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One provider's prices, per hour.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    /// Once per pool that has a load balancer (Azure's and GCP's charge for the first rules).
    #[serde(default)]
    pub pool_hour: f64,
    /// Ports (rules) the pool charge covers.
    #[serde(default)]
    pub included_ports: u32,
    /// Per load balancer (an NLB; a GCP or Azure frontend's public IP).
    #[serde(default)]
    pub load_balancer_hour: f64,
    /// Per port/protocol pair beyond the included ones (a GCP forwarding rule, an Azure rule).
    #[serde(default)]
    pub port_hour: f64,
}

impl Price {
    const FREE: Price = Price {
        pool_hour: 0.0,
        included_ports: 0,
        load_balancer_hour: 0.0,
        port_hour: 0.0,
    };

    /// The cost of `lbs` load balancers holding `ports` port/protocol pairs.
    pub fn hourly(&self, lbs: u32, ports: u32) -> f64 {
        if lbs == 0 {
            return 0.0;
        }
        self.pool_hour
            + self.load_balancer_hour * f64::from(lbs)
            + self.port_hour * f64::from(ports.saturating_sub(self.included_ports))
    }
}

/// Prices by provider kind (`aws`, `gcp`, `azure`, `local`, `memory`), in one currency.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PriceTable {
    pub currency: String,
    pub providers: BTreeMap<String, Price>,
}

/// The built-in table: public on-demand list prices in USD (AWS us-east-1, GCP us-central1, Azure East US).
/// AWS: an NLB-hour ($0.0225). GCP: the first 5 forwarding rules $0.025, each further one $0.01, and each
/// in-use external IP $0.005. Azure Standard Load Balancer: the first 5 rules $0.025, each further one $0.01,
/// and each frontend's public IP $0.005. The local and memory providers cost nothing.
impl Default for PriceTable {
    fn default() -> Self {
        let providers = BTreeMap::from([
            (
                "aws".to_string(),
                Price {
                    load_balancer_hour: 0.0225,
                    ..Price::FREE
                },
            ),
            (
                "gcp".to_string(),
                Price {
                    pool_hour: 0.025,
                    included_ports: 5,
                    load_balancer_hour: 0.005,
                    port_hour: 0.01,
                },
            ),
            (
                "azure".to_string(),
                Price {
                    pool_hour: 0.025,
                    included_ports: 5,
                    load_balancer_hour: 0.005,
                    port_hour: 0.01,
                },
            ),
            ("local".to_string(), Price::FREE),
            ("memory".to_string(), Price::FREE),
        ]);
        PriceTable {
            currency: "USD".to_string(),
            providers,
        }
    }
}

/// An override as the user writes it: any providers, any of their prices, and the currency.
#[derive(Deserialize, Debug, Default)]
struct Overrides {
    currency: Option<String>,
    #[serde(flatten)]
    providers: BTreeMap<String, PriceOverride>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PriceOverride {
    pool_hour: Option<f64>,
    included_ports: Option<u32>,
    load_balancer_hour: Option<f64>,
    port_hour: Option<f64>,
}

impl PriceTable {
    /// The built-in table with `text` (YAML or JSON, e.g. `{aws: {loadBalancerHour: 0.0252}}`) laid over it;
    /// `@path` reads it from a file.
    pub fn with_overrides(text: &str) -> Result<Self, String> {
        let text = match text.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("reading the price table {path}: {e}"))?,
            None => text.to_string(),
        };
        let o: Overrides = serde_yaml::from_str::<Option<Overrides>>(&text)
            .map_err(|e| format!("the price table: {e}"))?
            .unwrap_or_default();
        let mut table = PriceTable::default();
        if let Some(c) = o.currency {
            table.currency = c;
        }
        for (kind, p) in o.providers {
            let Some(price) = table.providers.get_mut(&kind) else {
                return Err(format!(
                    "the price table names provider {kind:?}; known: aws, gcp, azure, local, memory"
                ));
            };
            let each = [p.pool_hour, p.load_balancer_hour, p.port_hour];
            if each.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) {
                return Err("the price table has a negative or non-finite price".to_string());
            }
            price.pool_hour = p.pool_hour.unwrap_or(price.pool_hour);
            price.included_ports = p.included_ports.unwrap_or(price.included_ports);
            price.load_balancer_hour = p.load_balancer_hour.unwrap_or(price.load_balancer_hour);
            price.port_hour = p.port_hour.unwrap_or(price.port_hour);
        }
        Ok(table)
    }

    /// The hourly cost of `lbs` load balancers holding `ports` on provider `kind`; a kind the table lacks costs 0.
    pub fn hourly(&self, kind: &str, lbs: u32, ports: u32) -> f64 {
        self.providers
            .get(kind)
            .map_or(0.0, |p| p.hourly(lbs, ports))
    }

    /// `0.0450 USD`.
    pub fn format(&self, amount: f64) -> String {
        format!("{amount:.4} {}", self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_prices_follow_each_clouds_billing() {
        let t = PriceTable::default();
        assert_eq!(t.format(t.hourly("aws", 2, 70)), "0.0450 USD");
        // Azure: 0.025 for the first 5 rules, 0.01 for each of 7 more, 0.005 for each of 3 frontends
        assert_eq!(t.format(t.hourly("azure", 3, 12)), "0.1100 USD");
        assert_eq!(
            t.hourly("gcp", 0, 0),
            0.0,
            "a pool without load balancers costs nothing"
        );
        assert_eq!(t.hourly("local", 4, 400), 0.0);
    }

    #[test]
    fn overrides_lay_over_the_built_in_table_and_bad_ones_are_refused() {
        let t = PriceTable::with_overrides("{currency: EUR, aws: {loadBalancerHour: 0.03}}")
            .expect("parses");
        assert_eq!(t.format(t.hourly("aws", 1, 1)), "0.0300 EUR");
        assert_eq!(
            t.providers["gcp"],
            PriceTable::default().providers["gcp"],
            "an override leaves other providers as they were"
        );
        for bad in [
            "{oracle: {portHour: 1}}",
            "{aws: {loadBalancerHour: -1}}",
            "{aws: {lbHour: 1}}",
        ] {
            assert!(PriceTable::with_overrides(bad).is_err(), "{bad}");
        }
        assert!(PriceTable::with_overrides("@/nonexistent/prices.yaml").is_err());
    }
}
