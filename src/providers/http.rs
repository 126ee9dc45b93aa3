//! The only place that talks HTTP: the transport rule (https, or http on loopback), the per-host
//! limiter, timeouts, the response size cap, and the classification of anything that is not a 2xx.

use std::sync::Arc;
use std::time::Duration;

use oauth2::http::{self, HeaderValue, header};
use secrecy::{ExposeSecret, SecretString};

use super::classify::{self, Endpoint};
use super::limiter::HostLimiter;
use super::rules;
use super::{Failure, FailureKind, ValidatorConfig, ValidatorError, reason};

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    limiter: Arc<HostLimiter>,
    max_body: usize,
    request_timeout: Duration,
    /// Where credentials may go (checked on every request, also for URLs from provider answers).
    pub(crate) hosts: Arc<rules::HostPolicy>,
    /// The origin of `--entra-authority-override`, trusted as the administrator configured it.
    trusted_origin: Option<url::Origin>,
}

/// A [`Failure`] as the error type of the oauth2 crate's HTTP client hook.
#[derive(Debug)]
pub(crate) struct HttpFailure(pub Failure);

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HttpFailure {}

impl Http {
    pub(crate) fn new(config: &ValidatorConfig) -> Result<Self, ValidatorError> {
        if config.max_body_bytes == 0 {
            return Err(ValidatorError::Config("max_body_bytes must be at least 1".into()));
        }
        let limiter = HostLimiter::new(
            config.per_host_rate,
            config.per_host_burst,
            config.limiter_max_wait,
        )
        .map_err(ValidatorError::Config)?;
        let mut builder = reqwest::Client::builder();
        if let Some(roots) = &config.extra_roots {
            builder = roots.trust_in(builder);
        }
        let client = builder
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // Never follow redirects: a token must not travel to a host we did not choose.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("connection-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ValidatorError::Client)?;
        let trusted_origin = config
            .entra_authority_override
            .as_deref()
            .and_then(|raw| url::Url::parse(raw).ok())
            .map(|u| u.origin());
        Ok(Http {
            client,
            limiter: Arc::new(limiter),
            hosts: Arc::new(config.hosts.clone()),
            trusted_origin,
            max_body: config.max_body_bytes,
            request_timeout: config.request_timeout,
        })
    }

    /// A GET with a bearer token (identity URL, WhoAmI). The header is marked sensitive.
    pub(crate) fn bearer_get(
        url: &url::Url,
        token: &SecretString,
    ) -> Result<http::Request<Vec<u8>>, Failure> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).map_err(|_| {
            Failure::transient("the provider returned an access token that is not a valid header value")
        })?;
        auth.set_sensitive(true);
        http::Request::get(url.as_str())
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
            .body(Vec::new())
            .map_err(|_| Failure::transient("cannot build the identity request"))
    }

    /// Sends one request. `Ok` only for a 2xx answer whose body fits the cap; every other outcome is
    /// a classified [`Failure`].
    /// GETs `url` with the bearer `token` and parses the JSON answer as `T`; an answer that is not
    /// `T` is a malformed success named `what` (e.g. "the identity JSON").
    pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        url: &url::Url,
        token: &SecretString,
        what: &str,
    ) -> Result<T, Failure> {
        let response = self.send(endpoint, Self::bearer_get(url, token)?).await?;
        serde_json::from_slice(response.body()).map_err(|e| {
            super::classify::malformed_success(
                endpoint,
                &host_label(url),
                &format!("not {what} (line {}, column {})", e.line(), e.column()),
            )
        })
    }

    pub(crate) async fn send(
        &self,
        endpoint: Endpoint,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, Failure> {
        let request = reqwest::Request::try_from(request).map_err(|_| {
            Failure::configuration(reason::INVALID_URL, "cannot build the provider request URL")
        })?;
        let url = request.url().clone();
        let host = host_label(&url);
        if !rules::is_allowed_transport(&url) {
            // Also covers URLs taken from provider answers (Salesforce `id`).
            return Err(classify::transport_failure(
                endpoint,
                &host,
                "refusing to send credentials over plain http to a non-loopback host",
            ));
        }
        // Only to provider hosts (the spec was checked already; this also covers answers).
        if self.trusted_origin.as_ref() != Some(&url.origin())
            && let Err(why) = self.hosts.check(&url)
        {
            return Err(Failure::configuration(
                rules::PROVIDER_HOST_NOT_ALLOWED,
                format!("refusing to send credentials to {host}: {why}"),
            ));
        }
        if let Err(wait) = self.limiter.acquire(&host).await {
            return Err(Failure {
                kind: FailureKind::Transient,
                reason: reason::THROTTLED,
                message: format!(
                    "the operator's per-host rate limit for {host} is exhausted; retrying in {}s",
                    wait.as_secs_f64().ceil()
                ),
                retry_after: Some(wait),
                rotated_refresh_token: None,
                access_token_refused: false,
            });
        }
        tracing::debug!(endpoint = endpoint.describe(), host = %host, "provider request");
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| classify::transport_failure(endpoint, &host, &self.describe(&e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| classify::parse_retry_after(v, k8s_openapi::jiff::Timestamp::now()));
        let headers = response.headers().clone();
        let body = self.read_capped(endpoint, &host, response).await?;
        tracing::debug!(endpoint = endpoint.describe(), host = %host, status = status.as_u16(), "provider answered");
        if !status.is_success() {
            return Err(classify::classify_response(
                endpoint,
                &host,
                status.as_u16(),
                retry_after,
                &body,
            ));
        }
        let mut out = http::Response::new(body);
        *out.status_mut() = http::StatusCode::OK;
        *out.headers_mut() = headers;
        Ok(out)
    }

    async fn read_capped(
        &self,
        endpoint: Endpoint,
        host: &str,
        mut response: reqwest::Response,
    ) -> Result<Vec<u8>, Failure> {
        let too_large = || {
            classify::transport_failure(
                endpoint,
                host,
                &format!("response larger than {} bytes refused", self.max_body),
            )
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_body {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => return Err(classify::transport_failure(endpoint, host, &self.describe(&e))),
            }
        }
    }

    /// A reqwest error as text: what happened and its causes, without the URL.
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!("timed out after {}s", self.request_timeout.as_secs_f64());
        }
        let what = if error.is_connect() {
            "connection failed"
        } else if error.is_body() || error.is_decode() {
            "reading the response failed"
        } else {
            "request failed"
        };
        let mut text = what.to_string();
        let mut source = std::error::Error::source(error);
        let mut depth = 0;
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
            depth += 1;
            if depth > 4 {
                break;
            }
        }
        text
    }
}

/// `host` or `host:port` when the port is not the scheme's default (the limiter key and message label).
pub(crate) fn host_label(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// The oauth2 crate's HTTP hook: token requests go through [`Http::send`] (limiter, timeouts, size
/// cap, classification). A named type rather than a closure keeps the futures `Send` for any lifetime.
pub(crate) struct OAuthHttp<'a> {
    pub(crate) http: &'a Http,
    pub(crate) endpoint: Endpoint,
}

impl<'c> oauth2::AsyncHttpClient<'c> for OAuthHttp<'_> {
    type Error = HttpFailure;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpFailure>> + Send + 'c>,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move { self.http.send(self.endpoint, request).await.map_err(HttpFailure) })
    }
}
