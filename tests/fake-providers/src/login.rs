//! Interactive logins: the device authorization grant and the authorization code grant with PKCE,
//! for Salesforce and Entra ID, and Dataverse's Global Discovery Service.
//!
//! Nobody types anything into the fake: a test "browser" decides through the admin API.
//! - Device codes: [`FakeProviders::device_codes`] lists the pending ones (`GET
//!   /_admin/device-codes`); [`FakeProviders::decide_device_code`] (`POST
//!   /_admin/device-codes/{userCode}`) approves one as an org or environment, denies it, expires it,
//!   or makes its next poll answer `slow_down`.
//! - Browser logins: [`FakeProviders::queue_authorization`] (`POST /_admin/authorizations`) queues
//!   the decision of the next `GET …/authorize`, which then redirects to the client's `redirect_uri`
//!   with `code` (or `error`) and the `state` it was given. Without a queued decision the authorize
//!   page answers 200 with a sign-in page (a real user would still be typing).
//!
//! What is checked, as the providers do:
//! - polls faster than the code's interval (1 s, +5 s after each `slow_down`, RFC 8628 §3.5) get
//!   `slow_down`;
//! - a device code or authorization code is used once;
//! - the code exchange must send the `redirect_uri` of the authorization request and a
//!   `code_verifier` whose S256 hash is the `code_challenge` (RFC 7636 §4.6); only `S256` is
//!   accepted;
//! - the client ID must be one an org or environment was registered with.
//!
//! Error codes: Salesforce device flow `authorization_pending`, `slow_down`, `access_denied`,
//! `invalid_grant` (expired code); Entra `authorization_pending`, `slow_down`,
//! `authorization_declined`, `expired_token`, `bad_verification_code`; the code exchange
//! `invalid_grant`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    Account, Shared, Shared_, State, bearer, entra_error, entra_grant, json_response, salesforce_grant,
};

/// The polling interval the fake announces for device codes, in seconds.
pub const DEVICE_INTERVAL_SECS: u64 = 1;
/// How long a device code lives, in seconds.
pub const DEVICE_EXPIRES_SECS: u64 = 600;

/// What the test "browser" does with a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "decision")]
pub enum LoginDecision {
    /// The user signs in as the (Salesforce) org's user or the (Dynamics) environment's user and
    /// allows access.
    #[serde(rename_all = "camelCase")]
    Approve { remote_id: String },
    /// The user refuses access.
    Deny,
    /// (Device codes) the code expires.
    Expire,
    /// (Device codes) the next poll answers `slow_down`; the code stays pending.
    SlowDown,
}

/// Which provider a login belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoginProvider {
    Salesforce,
    Entra,
}

/// A pending device code, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingDeviceCode {
    pub user_code: String,
    pub client_id: String,
    pub provider: LoginProvider,
    /// The scope requested (Entra), or `api refresh_token` style scopes (Salesforce).
    pub scope: String,
}

#[derive(Debug, Clone)]
enum DeviceState {
    Pending,
    Approved(String),
    Denied,
    Expired,
}

#[derive(Debug, Clone)]
struct DeviceCode {
    user_code: String,
    client_id: String,
    provider: LoginProvider,
    scope: String,
    state: DeviceState,
    interval: Duration,
    slow_down_next: bool,
    last_poll: Option<Instant>,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct AuthorizationCode {
    key: String,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    provider: LoginProvider,
}

/// The login state of the fake.
#[derive(Default)]
pub(crate) struct Logins {
    /// By device code.
    devices: HashMap<String, DeviceCode>,
    /// By authorization code.
    codes: HashMap<String, AuthorizationCode>,
    /// Decisions for the next authorize requests, in order.
    next_authorizations: VecDeque<LoginDecision>,
}

impl Logins {
    pub(crate) fn pending(&self) -> Vec<PendingDeviceCode> {
        let mut out: Vec<PendingDeviceCode> = self
            .devices
            .values()
            .filter(|d| matches!(d.state, DeviceState::Pending))
            .map(|d| PendingDeviceCode {
                user_code: d.user_code.clone(),
                client_id: d.client_id.clone(),
                provider: d.provider,
                scope: d.scope.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.user_code.cmp(&b.user_code));
        out
    }

    pub(crate) fn queue(&mut self, decision: LoginDecision) {
        self.next_authorizations.push_back(decision);
    }
}

/// Applies a decision to a pending device code. `Err` when the code is unknown, not pending, or
/// the approved ID unknown.
pub(crate) fn decide(state: &mut State, user_code: &str, decision: LoginDecision) -> Result<(), String> {
    let key = match &decision {
        LoginDecision::Approve { remote_id } => Some(
            state
                .key_of(remote_id)
                .ok_or_else(|| format!("unknown org or environment {remote_id}"))?,
        ),
        _ => None,
    };
    let device = state
        .logins
        .devices
        .values_mut()
        .find(|d| d.user_code == user_code && matches!(d.state, DeviceState::Pending))
        .ok_or_else(|| format!("no pending device code {user_code}"))?;
    match decision {
        LoginDecision::Approve { .. } => device.state = DeviceState::Approved(key.unwrap_or_default()),
        LoginDecision::Deny => device.state = DeviceState::Denied,
        LoginDecision::Expire => device.state = DeviceState::Expired,
        LoginDecision::SlowDown => device.slow_down_next = true,
    }
    Ok(())
}

fn client_known(state: &State, client_id: &str, provider: LoginProvider) -> bool {
    state.accounts.values().any(|a| match (a, provider) {
        (Account::Salesforce(org), LoginProvider::Salesforce) => org.client_id == client_id,
        (Account::Dynamics(env), LoginProvider::Entra) => env.client_id == client_id,
        _ => false,
    })
}

fn user_code(shared: &Shared) -> String {
    // Eight letters from the token generator's hex, as "ABCD-EFGH".
    let raw = shared.token("");
    let letters: String = raw
        .chars()
        .rev()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .map(|c| (b'A' + (c.to_digit(16).unwrap_or(0) as u8)) as char)
        .collect();
    format!("{}-{}", &letters[..4], &letters[4..])
}

fn start_device(
    shared: &Shared,
    provider: LoginProvider,
    client_id: &str,
    scope: &str,
) -> Option<(String, String)> {
    let mut state = shared.lock();
    if !client_known(&state, client_id, provider) {
        return None;
    }
    let device_code = shared.token("fake-dc-");
    let code = user_code(shared);
    state.logins.devices.insert(
        device_code.clone(),
        DeviceCode {
            user_code: code.clone(),
            client_id: client_id.to_string(),
            provider,
            scope: scope.to_string(),
            state: DeviceState::Pending,
            interval: Duration::from_secs(DEVICE_INTERVAL_SECS),
            slow_down_next: false,
            last_poll: None,
            expires: Instant::now() + Duration::from_secs(DEVICE_EXPIRES_SECS),
        },
    );
    Some((device_code, code))
}

/// What a device poll found.
enum Poll {
    Unknown,
    Pending,
    SlowDown,
    Denied,
    Expired,
    WrongClient,
    Approved { key: String, scope: String },
}

fn poll_device(state: &mut State, device_code: &str, client_id: &str) -> Poll {
    let slow_downs = &mut state.stats.device_slow_downs;
    let Some(device) = state.logins.devices.get_mut(device_code) else {
        return Poll::Unknown;
    };
    if device.client_id != client_id {
        return Poll::WrongClient;
    }
    let now = Instant::now();
    if now >= device.expires {
        device.state = DeviceState::Expired;
    }
    // RFC 8628 §3.5: polling faster than the interval gets slow_down, and the interval grows by 5 s.
    let too_soon = device
        .last_poll
        .is_some_and(|last| now.duration_since(last) < device.interval);
    device.last_poll = Some(now);
    if device.slow_down_next || too_soon {
        device.slow_down_next = false;
        device.interval += Duration::from_secs(5);
        *slow_downs += 1;
        return Poll::SlowDown;
    }
    match device.state.clone() {
        DeviceState::Pending => Poll::Pending,
        DeviceState::Denied => Poll::Denied,
        DeviceState::Expired => Poll::Expired,
        DeviceState::Approved(key) => {
            let scope = device.scope.clone();
            // A device code is exchanged once.
            state.logins.devices.remove(device_code);
            Poll::Approved { key, scope }
        }
    }
}

fn sf_error(error: &str, description: &str) -> Response {
    json_response(400, json!({"error": error, "error_description": description}))
}

/// Salesforce `POST /services/oauth2/token` with `response_type=device_code`.
pub(crate) fn salesforce_device_start(shared: &Shared, form: &BTreeMap<String, String>) -> Response {
    let client_id = form.get("client_id").map(String::as_str).unwrap_or_default();
    let scope = form.get("scope").map(String::as_str).unwrap_or_default();
    match start_device(shared, LoginProvider::Salesforce, client_id, scope) {
        None => sf_error("invalid_client_id", "client identifier invalid"),
        Some((device_code, user_code)) => json_response(
            200,
            json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": format!("{}/setup/connect", shared.url),
                "interval": DEVICE_INTERVAL_SECS,
            }),
        ),
    }
}

/// Salesforce `POST /services/oauth2/token` with `grant_type=device` and `code`.
pub(crate) fn salesforce_device_poll(shared: &Shared, form: &BTreeMap<String, String>) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let mut state = shared.lock();
    match poll_device(&mut state, field("code"), field("client_id")) {
        Poll::Unknown => sf_error("invalid_grant", "invalid device code"),
        Poll::WrongClient => sf_error("invalid_client_id", "client identifier invalid"),
        Poll::Pending => sf_error("authorization_pending", "authorization pending"),
        Poll::SlowDown => sf_error("slow_down", "polling too quickly"),
        Poll::Denied => sf_error("access_denied", "end-user denied authorization"),
        Poll::Expired => sf_error("invalid_grant", "expired authorization code"),
        Poll::Approved { key, .. } => salesforce_login_tokens(shared, &mut state, &key),
    }
}

/// The token answer of a Salesforce login: a grant with a new refresh token.
fn salesforce_login_tokens(shared: &Shared, state: &mut State, key: &str) -> Response {
    let Some(Account::Salesforce(org)) = state.accounts.get(key).cloned() else {
        return sf_error("invalid_grant", "the user is not a Salesforce user");
    };
    let mut body = salesforce_grant(shared, state, key, &org);
    let refresh = shared.token("5Aep861.fake-rt-");
    state.refresh_tokens.insert(refresh.clone(), key.to_string());
    let access = body["access_token"].as_str().unwrap_or_default().to_string();
    state.access_token_origin.insert(access, refresh.clone());
    body["refresh_token"] = json!(refresh);
    json_response(200, body)
}

/// Entra `POST /{tenant}/oauth2/v2.0/devicecode`.
pub(crate) async fn entra_device_start(
    AxState(shared): Shared_,
    Path(_tenant): Path<String>,
    axum::extract::Form(form): axum::extract::Form<BTreeMap<String, String>>,
) -> Response {
    let client_id = form.get("client_id").map(String::as_str).unwrap_or_default();
    let scope = form.get("scope").map(String::as_str).unwrap_or_default();
    match start_device(&shared, LoginProvider::Entra, client_id, scope) {
        None => entra_error(
            400,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        ),
        Some((device_code, user_code)) => {
            let verification_uri = format!("{}/devicelogin", shared.url);
            json_response(
                200,
                json!({
                    "device_code": device_code,
                    "user_code": user_code,
                    "verification_uri": verification_uri,
                    "expires_in": DEVICE_EXPIRES_SECS,
                    "interval": DEVICE_INTERVAL_SECS,
                    "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
                }),
            )
        }
    }
}

/// Entra token endpoint, `grant_type=urn:ietf:params:oauth:grant-type:device_code`.
pub(crate) fn entra_device_poll(shared: &Shared, form: &BTreeMap<String, String>) -> Response {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let mut state = shared.lock();
    match poll_device(&mut state, field("device_code"), field("client_id")) {
        Poll::Unknown => entra_error(
            400,
            "bad_verification_code",
            70000,
            "The device code is not valid.",
        ),
        Poll::WrongClient => entra_error(
            400,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        ),
        Poll::Pending => entra_error(
            400,
            "authorization_pending",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending.",
        ),
        Poll::SlowDown => entra_error(400, "slow_down", 70016, "Polling too quickly."),
        Poll::Denied => entra_error(
            400,
            "authorization_declined",
            70015,
            "The user declined the request.",
        ),
        Poll::Expired => entra_error(
            400,
            "expired_token",
            70020,
            "The provided device code has expired.",
        ),
        Poll::Approved { key, scope } => entra_login_tokens(shared, &mut state, &key, &scope),
    }
}

/// The token answer of an Entra login for the scopes `requested` (a resource's
/// `…/user_impersonation` and `offline_access`): the user's environment serving that resource.
fn entra_login_tokens(shared: &Shared, state: &mut State, key: &str, requested: &str) -> Response {
    let Some(target) = super::entra_target(shared, state, key, requested) else {
        return entra_error(
            400,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' is not valid.",
        );
    };
    let scope = requested
        .split(' ')
        .find(|s| s.ends_with("/user_impersonation"))
        .unwrap_or_default()
        .to_string();
    json_response(200, entra_grant(shared, state, &target, &scope))
}

/// `GET /services/oauth2/authorize` and `GET /{tenant}/oauth2/v2.0/authorize`: the sign-in page. With
/// a queued decision it redirects to `redirect_uri` as the provider does after the user answers.
pub(crate) async fn authorize(
    AxState(shared): Shared_,
    uri: axum::http::Uri,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let provider = if uri.path().starts_with("/services/") {
        LoginProvider::Salesforce
    } else {
        LoginProvider::Entra
    };
    let field = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let mut state = shared.lock();
    if field("response_type") != "code" {
        return (StatusCode::BAD_REQUEST, "unsupported response_type").into_response();
    }
    if !client_known(&state, field("client_id"), provider) {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    let Ok(redirect) = url::Url::parse(field("redirect_uri")) else {
        return (StatusCode::BAD_REQUEST, "redirect_uri is not a URL").into_response();
    };
    if field("code_challenge_method") != "S256" || field("code_challenge").len() < 43 {
        return (
            StatusCode::BAD_REQUEST,
            "PKCE with code_challenge_method=S256 is required",
        )
            .into_response();
    }
    let Some(decision) = state.logins.next_authorizations.pop_front() else {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>Fake sign-in page: queue a decision with POST /_admin/authorizations</body></html>",
        )
            .into_response();
    };
    let mut target = redirect.clone();
    {
        let mut pairs = target.query_pairs_mut();
        match decision {
            LoginDecision::Approve { remote_id } => {
                let Some(key) = state.key_of(&remote_id) else {
                    return (StatusCode::BAD_REQUEST, "unknown org or environment").into_response();
                };
                let code = shared.token("fake-code-");
                state.logins.codes.insert(
                    code.clone(),
                    AuthorizationCode {
                        key,
                        client_id: field("client_id").to_string(),
                        redirect_uri: field("redirect_uri").to_string(),
                        challenge: field("code_challenge").to_string(),
                        scope: field("scope").to_string(),
                        provider,
                    },
                );
                pairs.append_pair("code", &code);
            }
            _ => {
                pairs.append_pair("error", "access_denied");
                pairs.append_pair("error_description", "end-user denied authorization");
            }
        }
        if let Some(state_param) = query.get("state") {
            pairs.append_pair("state", state_param);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

/// The code exchange (`grant_type=authorization_code`) of either provider: `None` when the code,
/// client, redirect URI or verifier do not match (an `invalid_grant`).
fn redeem(
    state: &mut State,
    form: &BTreeMap<String, String>,
    provider: LoginProvider,
) -> Option<AuthorizationCode> {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    // A code is single-use, also when the exchange fails.
    let code = state.logins.codes.remove(field("code"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, field("code_verifier").as_bytes());
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
    (code.provider == provider
        && code.client_id == field("client_id")
        && code.redirect_uri == field("redirect_uri")
        && code.challenge == challenge)
        .then_some(code)
}

/// Salesforce `grant_type=authorization_code`.
pub(crate) fn salesforce_code_exchange(shared: &Shared, form: &BTreeMap<String, String>) -> Response {
    let mut state = shared.lock();
    match redeem(&mut state, form, LoginProvider::Salesforce) {
        None => sf_error("invalid_grant", "invalid authorization code"),
        Some(code) => salesforce_login_tokens(shared, &mut state, &code.key),
    }
}

/// Entra `grant_type=authorization_code`.
pub(crate) fn entra_code_exchange(shared: &Shared, form: &BTreeMap<String, String>) -> Response {
    let mut state = shared.lock();
    match redeem(&mut state, form, LoginProvider::Entra) {
        None => entra_error(
            400,
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired or is invalid.",
        ),
        Some(code) => {
            let requested = form.get("scope").cloned().unwrap_or(code.scope);
            entra_login_tokens(shared, &mut state, &code.key, &requested)
        }
    }
}

/// Global Discovery Service `GET /api/discovery/v2.0/Instances` (bearer): the environments the
/// token's user can reach (every registered environment with the same user ID and client ID).
pub(crate) async fn discovery_instances(AxState(shared): Shared_, headers: HeaderMap) -> Response {
    let state = shared.lock();
    let Some(Account::Dynamics(me)) = bearer(&headers)
        .and_then(|token| state.access_tokens.get(&token).cloned())
        .and_then(|key| state.accounts.get(&key).cloned())
    else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
            "",
        )
            .into_response();
    };
    let mut environments: Vec<_> = state
        .accounts
        .values()
        .filter_map(|a| match a {
            Account::Dynamics(env) if env.user_id == me.user_id && env.client_id == me.client_id => {
                Some(env.clone())
            }
            _ => None,
        })
        .collect();
    environments.sort_by(|a, b| a.organization_id.cmp(&b.organization_id));
    let value: Vec<serde_json::Value> = environments
        .iter()
        .enumerate()
        .map(|(i, env)| {
            let url = env.environment_url.clone().unwrap_or_else(|| shared.url.clone());
            let name = env.friendly_name.clone().unwrap_or_else(|| format!("Environment {}", i + 1));
            json!({
                "Id": env.organization_id,
                "UniqueName": format!("org{:08x}", i + 1),
                "UrlName": format!("org{}", i + 1),
                "FriendlyName": name,
                "State": 0,
                "Version": "9.2.25101.00000",
                "Url": url,
                "ApiUrl": url,
                "LastUpdated": "2026-11-01T00:00:00Z",
                "EnvironmentId": format!("{}-env", env.organization_id),
                "TenantId": env.tenant.clone().unwrap_or_else(|| "00000000-0000-0000-0000-0000000000aa".into()),
            })
        })
        .collect();
    json_response(200, json!({ "value": value }))
}

pub(crate) async fn admin_device_codes(AxState(shared): Shared_) -> Json<Vec<PendingDeviceCode>> {
    Json(shared.lock().logins.pending())
}

pub(crate) async fn admin_decide_device_code(
    AxState(shared): Shared_,
    Path(user_code): Path<String>,
    Json(decision): Json<LoginDecision>,
) -> Response {
    match decide(&mut shared.lock(), &user_code, decision) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(why) => json_response(404, json!({"error": why})),
    }
}

pub(crate) async fn admin_queue_authorization(
    AxState(shared): Shared_,
    Json(decision): Json<LoginDecision>,
) -> StatusCode {
    shared.lock().logins.queue(decision);
    StatusCode::NO_CONTENT
}
