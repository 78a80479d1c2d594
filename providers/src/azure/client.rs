//! The ARM HTTP client: Microsoft's `azure_core` pipeline (bearer token from `azure_identity`, retries that honour
//! `Retry-After` on 429/503) plus what ARM adds on top: the JSON error body, ETags, and long-running operations
//! (`Azure-AsyncOperation` / `Location` polling). Every call is counted by operation for
//! `sharedlb_cloud_api_calls`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_core::http::headers::HeaderName;
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Method, Pipeline, PipelineSendOptions,
    RawResponse, Request, RetryOptions, Transport, Url,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::arm::{API_VERSION, AsyncOperation, ErrorResponse};
use crate::{ApiCalls, ProviderError};

const IF_MATCH: HeaderName = HeaderName::from_static("if-match");
const IF_NONE_MATCH: HeaderName = HeaderName::from_static("if-none-match");
const ASYNC_OPERATION: HeaderName = HeaderName::from_static("azure-asyncoperation");
const LOCATION: HeaderName = HeaderName::from_static("location");
const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");

/// How a PUT relates to what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition<'a> {
    /// Only if the resource still has this ETag (412 otherwise).
    IfMatch(&'a str),
    /// Only if the resource does not exist yet (412 otherwise).
    IfNoneMatch,
    None,
}

/// Retries of transport errors, 408, 429 (after `Retry-After`) and 5xx: four, within a minute.
pub fn retry_options() -> RetryOptions {
    RetryOptions::exponential(ExponentialRetryOptions {
        initial_delay: azure_core::time::Duration::milliseconds(500),
        max_retries: 4,
        max_total_elapsed: azure_core::time::Duration::seconds(60),
        max_delay: azure_core::time::Duration::seconds(20),
    })
}

/// A PUT lost a race: the resource changed since it was read.
pub fn is_precondition_failed(e: &ProviderError) -> bool {
    matches!(e, ProviderError::Other(m) if m.starts_with(PRECONDITION_FAILED))
}

const PRECONDITION_FAILED: &str = "PreconditionFailed";

#[derive(Debug)]
pub struct ArmClient {
    pipeline: Pipeline,
    base: Url,
    calls: Mutex<BTreeMap<(String, bool), u64>>,
    /// The shortest wait between two polls of a long-running operation (ARM asks with `Retry-After`).
    min_poll: Duration,
}

impl ArmClient {
    /// `endpoint` is ARM's (`https://management.azure.com`); `transport` replaces the default HTTP client (one
    /// that trusts an extra root CA).
    pub fn new(
        endpoint: &str,
        credential: Arc<dyn TokenCredential>,
        transport: Option<Transport>,
        min_poll: Duration,
    ) -> Result<Self, ProviderError> {
        let base = Url::parse(endpoint).map_err(|e| {
            ProviderError::InvalidConfig(format!("Azure endpoint {endpoint:?}: {e}"))
        })?;
        let scope = format!("{}/.default", endpoint.trim_end_matches('/'));
        let auth = BearerTokenAuthorizationPolicy::new(credential, [scope]);
        let options = ClientOptions {
            transport,
            retry: retry_options(),
            ..ClientOptions::default()
        };
        let pipeline = Pipeline::new(
            Some("sharedlb"),
            option_env!("CARGO_PKG_VERSION"),
            options,
            Vec::new(),
            vec![Arc::new(auth)],
            None,
        );
        Ok(ArmClient {
            pipeline,
            base,
            calls: Mutex::new(BTreeMap::new()),
            min_poll,
        })
    }

    fn count(&self, operation: &str, mutating: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry((operation.to_string(), mutating)).or_default() += 1;
    }

    pub fn api_calls(&self) -> Vec<ApiCalls> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls
            .iter()
            .map(|((operation, mutating), n)| ApiCalls {
                operation: operation.clone(),
                mutating: *mutating,
                calls: *n,
            })
            .collect()
    }

    fn url(&self, path: &str) -> Result<Url, ProviderError> {
        let mut url = self.base.join(path).map_err(|e| {
            ProviderError::InvalidConfig(format!("Azure resource path {path}: {e}"))
        })?;
        if !url.query_pairs().any(|(k, _)| k == "api-version") {
            url.query_pairs_mut()
                .append_pair("api-version", API_VERSION);
        }
        Ok(url)
    }

    async fn send(
        &self,
        operation: &str,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        precondition: Precondition<'_>,
    ) -> Result<RawResponse, ProviderError> {
        let mutating = !matches!(method, Method::Get);
        self.count(operation, mutating);
        let mut req = Request::new(url, method);
        if let Some(b) = body {
            req.insert_header(CONTENT_TYPE, "application/json");
            req.set_body(b);
        }
        match precondition {
            Precondition::IfMatch(etag) => req.insert_header(IF_MATCH, etag.to_string()),
            Precondition::IfNoneMatch => req.insert_header(IF_NONE_MATCH, "*"),
            Precondition::None => {}
        }
        let ctx = Context::new();
        self.pipeline
            .send(
                &ctx,
                &mut req,
                Some(PipelineSendOptions {
                    skip_checks: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| classify_transport(operation, &e))
    }

    /// GET a resource; `None` when it does not exist.
    pub async fn get<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
    ) -> Result<Option<T>, ProviderError> {
        let url = self.url(path)?;
        let res = self
            .send(operation, Method::Get, url, None, Precondition::None)
            .await?;
        match u16::from(res.status()) {
            404 => Ok(None),
            200 => parse(operation, &res).map(Some),
            _ => Err(classify(operation, &res)),
        }
    }

    /// Every page of a list.
    pub async fn list<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
    ) -> Result<Vec<T>, ProviderError> {
        let mut out = Vec::new();
        let mut url = self.url(path)?;
        loop {
            let res = self
                .send(operation, Method::Get, url, None, Precondition::None)
                .await?;
            if u16::from(res.status()) != 200 {
                return Err(classify(operation, &res));
            }
            let page: super::arm::List<T> = parse(operation, &res)?;
            out.extend(page.value);
            match page.next_link {
                Some(next) => {
                    url = Url::parse(&next).map_err(|e| {
                        ProviderError::Other(format!("{operation}: nextLink {next:?}: {e}"))
                    })?
                }
                None => return Ok(out),
            }
        }
    }

    /// PUT a resource and wait for its long-running operation to finish.
    pub async fn put<T: Serialize>(
        &self,
        operation: &str,
        path: &str,
        body: &T,
        precondition: Precondition<'_>,
    ) -> Result<(), ProviderError> {
        let url = self.url(path)?;
        let body = serde_json::to_vec(body)
            .map_err(|e| ProviderError::Other(format!("{operation}: serializing: {e}")))?;
        let res = self
            .send(operation, Method::Put, url, Some(body), precondition)
            .await?;
        match u16::from(res.status()) {
            200..=202 => self.wait(operation, &res).await,
            _ => Err(classify(operation, &res)),
        }
    }

    /// DELETE a resource and wait until it is gone; a resource that is already gone is success.
    pub async fn delete(&self, operation: &str, path: &str) -> Result<(), ProviderError> {
        let url = self.url(path)?;
        let res = self
            .send(operation, Method::Delete, url, None, Precondition::None)
            .await?;
        match u16::from(res.status()) {
            200 | 204 | 404 => Ok(()),
            202 => self.wait(operation, &res).await,
            _ => Err(classify(operation, &res)),
        }
    }

    fn poll_delay(&self, res: &RawResponse) -> Duration {
        let asked = res
            .headers()
            .get_optional_str(&RETRY_AFTER)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(2), Duration::from_secs);
        asked.clamp(self.min_poll, Duration::from_secs(30))
    }

    /// Waits for a long-running operation: `Azure-AsyncOperation` (a status document) when given, else
    /// `Location` (202 while running, 200/204 when done); neither means it finished synchronously.
    async fn wait(&self, operation: &str, first: &RawResponse) -> Result<(), ProviderError> {
        let headers = first.headers();
        let (url, by_status) = match (
            headers.get_optional_str(&ASYNC_OPERATION),
            headers.get_optional_str(&LOCATION),
        ) {
            (Some(u), _) => (u.to_string(), true),
            (None, Some(u)) => (u.to_string(), false),
            (None, None) => return Ok(()),
        };
        let url = Url::parse(&url).map_err(|e| {
            ProviderError::Other(format!("{operation}: operation URL {url:?}: {e}"))
        })?;
        let poll_op = if by_status {
            "Operations.Get"
        } else {
            "OperationResults.Get"
        };
        let mut delay = self.poll_delay(first);
        // ARM operations on network resources finish in minutes; give up after about ten
        for _ in 0..300 {
            tokio::time::sleep(delay).await;
            let res = self
                .send(poll_op, Method::Get, url.clone(), None, Precondition::None)
                .await?;
            let status = u16::from(res.status());
            delay = self.poll_delay(&res);
            if by_status {
                if status != 200 {
                    return Err(classify(operation, &res));
                }
                let op: AsyncOperation = parse(poll_op, &res)?;
                match op.status.as_str() {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" => {
                        let e = op.error.unwrap_or_default();
                        return Err(by_code(
                            operation,
                            &e.code,
                            &format!("{} ({})", e.message, op.status),
                        ));
                    }
                    _ => {}
                }
            } else {
                match status {
                    202 => {}
                    200 | 204 => return Ok(()),
                    _ => return Err(classify(operation, &res)),
                }
            }
        }
        Err(ProviderError::Other(format!(
            "{operation}: the operation did not finish in time"
        )))
    }
}

fn parse<T: DeserializeOwned>(operation: &str, res: &RawResponse) -> Result<T, ProviderError> {
    serde_json::from_slice(res.body().as_ref())
        .map_err(|e| ProviderError::Other(format!("{operation}: unexpected response: {e}")))
}

/// An error with every cause it wraps (the pipeline wraps the credential's error with its own context).
fn chain(e: &azure_core::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn classify_transport(operation: &str, err: &azure_core::Error) -> ProviderError {
    use azure_core::error::ErrorKind;
    let e = chain(err);
    match err.kind() {
        ErrorKind::HttpResponse { status, .. } if matches!(u16::from(*status), 400 | 401) => {
            ProviderError::InvalidConfig(format!("{operation}: Azure credentials refused: {e}"))
        }
        ErrorKind::Credential => ProviderError::InvalidConfig(format!(
            "{operation}: no Azure credentials (workload identity, AZURE_CLIENT_SECRET, or a managed identity): {e}"
        )),
        _ => ProviderError::Other(format!("{operation}: {e}")),
    }
}

/// An ARM error response as a `ProviderError`, with Azure's code and message.
fn classify(operation: &str, res: &RawResponse) -> ProviderError {
    let status = u16::from(res.status());
    let body: ErrorResponse = serde_json::from_slice(res.body().as_ref()).unwrap_or_default();
    let message = if body.error.message.is_empty() {
        format!("HTTP {status}")
    } else {
        body.error.message.clone()
    };
    match status {
        412 => ProviderError::Other(format!("{PRECONDITION_FAILED}: {operation}: {message}")),
        429 => ProviderError::Throttled {
            retry_after: res
                .headers()
                .get_optional_str(&RETRY_AFTER)
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(10), Duration::from_secs),
            message: format!("{operation}: {} {message}", body.error.code),
        },
        401 | 403 => ProviderError::InvalidConfig(format!(
            "{operation}: {} {message} (the identity needs Network Contributor on the resource group)",
            body.error.code
        )),
        404 => ProviderError::NotFound(format!("{operation}: {message}")),
        _ => by_code(operation, &body.error.code, &message),
    }
}

fn by_code(operation: &str, code: &str, message: &str) -> ProviderError {
    let text = format!("{operation}: {code}: {message}");
    if code.contains("LimitReached") || code.contains("Quota") || code.contains("LimitExceeded") {
        ProviderError::QuotaExceeded(text)
    } else if code == "Conflict" || code.contains("AlreadyExists") {
        ProviderError::AlreadyExists(text)
    } else if code.starts_with("Invalid") || code.contains("NotFound") {
        ProviderError::InvalidConfig(text)
    } else {
        ProviderError::Other(text)
    }
}
