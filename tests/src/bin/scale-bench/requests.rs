//! The apiserver's own count of the requests it served (`apiserver_request_total` on its /metrics).

use std::collections::BTreeMap;

use anyhow::Context as _;
use kube::Client;

/// What the apiserver's request counters call a write (1.20: a server-side apply is APPLY, not PATCH).
const MUTATING: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// A kind of apiserver request, as its `apiserver_request_total` counter labels it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Call {
    pub resource: String,
    pub subresource: String,
    pub verb: String,
}

impl Call {
    pub fn new(resource: &str, subresource: &str, verb: &str) -> Call {
        Call {
            resource: resource.into(),
            subresource: subresource.into(),
            verb: verb.into(),
        }
    }

    pub fn is_write(&self) -> bool {
        MUTATING.contains(&self.verb.as_str())
    }

    /// Leader election's renewals, expected at any time: shown apart from the other writes.
    pub fn is_lease(&self) -> bool {
        self.resource == "leases"
    }

    /// `sharedlbs/status`, `services`.
    pub fn path(&self) -> String {
        match self.subresource.as_str() {
            "" => self.resource.clone(),
            sub => format!("{}/{sub}", self.resource),
        }
    }
}

/// Requests counted by the apiserver, by kind (summed over group, version, scope, code, ...); `failed` are the
/// ones answered with anything but 2xx (a 409 conflict, a 404 on a delete).
#[derive(Clone, Debug, Default)]
pub struct Requests {
    pub calls: BTreeMap<Call, f64>,
    pub failed: BTreeMap<Call, f64>,
}

impl Requests {
    pub fn of(calls: impl IntoIterator<Item = (Call, f64)>) -> Requests {
        Requests {
            calls: calls.into_iter().collect(),
            failed: BTreeMap::new(),
        }
    }

    /// The apiserver's /metrics, read with the kubeconfig's credentials.
    pub async fn scrape(client: &Client) -> anyhow::Result<Requests> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = client
            .request_text(request)
            .await
            .context("GET the apiserver's /metrics")?;
        Ok(Requests::parse(&text))
    }

    pub fn parse(text: &str) -> Requests {
        let mut out = Requests::default();
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = split_series(series);
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if name != "apiserver_request_total" {
                continue;
            }
            let label = |k: &str| labels.get(k).map_or("", String::as_str);
            let call = Call::new(label("resource"), label("subresource"), label("verb"));
            if !label("code").starts_with('2') {
                *out.failed.entry(call.clone()).or_default() += value;
            }
            *out.calls.entry(call).or_default() += value;
        }
        out
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Requests) -> Requests {
        let delta = |now: &BTreeMap<Call, f64>, then: &BTreeMap<Call, f64>| {
            now.iter()
                .map(|(c, v)| (c.clone(), v - then.get(c).unwrap_or(&0.0)))
                .filter(|(_, v)| *v != 0.0)
                .collect()
        };
        Requests {
            calls: delta(&self.calls, &before.calls),
            failed: delta(&self.failed, &before.failed),
        }
    }

    /// Without the requests the bench sent itself.
    pub fn minus(mut self, own: &Requests) -> Requests {
        for (c, v) in &own.calls {
            *self.calls.entry(c.clone()).or_default() -= v;
        }
        self.calls.retain(|_, v| *v != 0.0);
        self
    }

    /// Writes, leases left out.
    pub fn writes(&self) -> impl Iterator<Item = (&Call, f64)> {
        self.calls
            .iter()
            .filter(|(c, _)| c.is_write() && !c.is_lease())
            .map(|(c, v)| (c, *v))
    }

    pub fn total_writes(&self) -> f64 {
        total(self.writes().map(|(_, v)| v))
    }

    pub fn lease_writes(&self) -> f64 {
        let leases = self
            .calls
            .iter()
            .filter(|(c, _)| c.is_write() && c.is_lease());
        total(leases.map(|(_, v)| *v))
    }

    /// Reads of resources (not /metrics, /readyz, ...), by verb.
    pub fn reads_by_verb(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (c, v) in &self.calls {
            if !c.is_write() && !c.resource.is_empty() {
                *out.entry(c.verb.clone()).or_default() += v;
            }
        }
        out
    }

    pub fn get(&self, call: &Call) -> f64 {
        self.calls.get(call).copied().unwrap_or(0.0)
    }
}

/// The sum, 0 when there is nothing to add (`Sum for f64` gives -0, printed as "-0.00").
pub fn total(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

/// `name{a="x",b="y"}` -> (name, labels).
pub fn split_series(series: &str) -> (&str, BTreeMap<String, String>) {
    match series.split_once('{') {
        Some((name, rest)) => (name, labels(rest.strip_suffix('}').unwrap_or(rest))),
        None => (series, BTreeMap::new()),
    }
}

/// `a="x",b="y \"quoted\""` -> {a: x, b: y "quoted"}.
pub fn labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while let Some((key, after)) = rest.split_once("=\"") {
        let (mut value, mut end) = (String::new(), after.len());
        let mut chars = after.char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '\\' => value.extend(chars.next().map(|(_, e)| if e == 'n' { '\n' } else { e })),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}
