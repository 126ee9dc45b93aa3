//! The loopback redirect of the authorization code flow: a one-shot HTTP listener on
//! `http://127.0.0.1:<random port>/callback` (RFC 8252 §7.3), and opening the user's browser.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::Html;
use oauth2::{CsrfToken, RedirectUrl};
use secrecy::SecretString;
use tokio::sync::mpsc;

use super::LoginError;
use crate::providers::rules;

/// How long the user has to answer in the browser.
const BROWSER_DEADLINE: Duration = Duration::from_secs(300);

pub(super) struct Callback {
    listener: tokio::net::TcpListener,
    port: u16,
}

impl Callback {
    pub(super) async fn listen() -> Result<Self, LoginError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| {
                LoginError::Failed(format!("cannot listen on 127.0.0.1 for the login redirect: {e}"))
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| LoginError::Failed(e.to_string()))?
            .port();
        Ok(Callback { listener, port })
    }

    pub(super) fn redirect_url(&self) -> RedirectUrl {
        RedirectUrl::new(format!("http://127.0.0.1:{}/callback", self.port)).expect("a valid URL")
    }

    /// Shows (and opens) `url`, then waits for the redirect carrying `state`: the authorization
    /// code, or why there is none. Redirects with another `state` are refused and ignored (RFC 6749
    /// §10.12: another site may send the browser there).
    pub(super) async fn wait(
        self,
        url: &url::Url,
        state: &CsrfToken,
        prompt: &mut (dyn std::io::Write + Send),
    ) -> Result<SecretString, LoginError> {
        let (tx, mut rx) = mpsc::channel::<BTreeMap<String, String>>(4);
        let expected = state.secret().clone();
        let app = axum::Router::new()
            .route("/callback", axum::routing::get(callback))
            .with_state((tx, expected.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(self.listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        let opened = open_in_browser(url.as_str());
        let _ = writeln!(
            prompt,
            "{} {url}\nWaiting for you to allow access...",
            if opened {
                "Your browser was opened to sign in. If it did not open, visit:"
            } else {
                "To sign in, open this URL in a browser on this machine:"
            }
        );
        let outcome = tokio::time::timeout(BROWSER_DEADLINE, rx.recv()).await;
        // The browser gets its page before this process goes on (and may exit): the server stops
        // gracefully, finishing the answer in flight.
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        let query = match outcome {
            Err(_) | Ok(None) => return Err(LoginError::Expired("5 minutes".into())),
            Ok(Some(query)) => query,
        };
        if let Some(error) = query.get("error") {
            let description = query.get("error_description").map(String::as_str);
            return Err(if error == "access_denied" {
                LoginError::Denied(
                    description
                        .map(|d| format!(" ({})", rules::display_text(d)))
                        .unwrap_or_default(),
                )
            } else {
                LoginError::provider(error, description)
            });
        }
        match query.get("code") {
            Some(code) if !code.is_empty() => Ok(SecretString::from(code.as_str())),
            _ => Err(LoginError::Failed(
                "the login redirect carried no authorization code".into(),
            )),
        }
    }
}

type CallbackState = (mpsc::Sender<BTreeMap<String, String>>, String);

async fn callback(
    State((tx, expected)): State<CallbackState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> (axum::http::StatusCode, Html<&'static str>) {
    if query.get("state") != Some(&expected) {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Html(
                "<html><body>This sign-in answer does not belong to the login that is waiting; it was ignored.</body></html>",
            ),
        );
    }
    let denied = query.contains_key("error");
    let _ = tx.send(query).await;
    (
        axum::http::StatusCode::OK,
        Html(if denied {
            "<html><body>Access was not allowed. You can close this window.</body></html>"
        } else {
            "<html><body>Signed in. You can close this window and return to the terminal.</body></html>"
        }),
    )
}

/// Opens `url` in the user's browser: `$BROWSER` (a command; the URL is its last argument), else
/// `xdg-open` (Linux) or `open` (macOS) when present. False when none could be started (the caller
/// prints the URL either way). The URL carries no secret (the PKCE challenge and `state` only).
pub fn open_in_browser(url: &str) -> bool {
    let candidates: Vec<Vec<String>> = match std::env::var("BROWSER") {
        Ok(command) if !command.trim().is_empty() => {
            vec![command.split_whitespace().map(str::to_string).collect()]
        }
        _ => vec![vec!["xdg-open".into()], vec!["open".into()]],
    };
    candidates.into_iter().any(|command| {
        let Some((program, args)) = command.split_first() else {
            return false;
        };
        std::process::Command::new(program)
            .args(args)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
    })
}
