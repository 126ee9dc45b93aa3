//! The Dataverse Global Discovery Service: which Dynamics 365 environments the signed-in user can
//! reach (<https://learn.microsoft.com/power-apps/developer/data-platform/discovery-service>):
//! `GET {gds}/api/discovery/v2.0/Instances` with a token for `{gds}/user_impersonation`.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::api::Cloud;

/// The Global Discovery Service of a cloud (same page, "Global Discovery Service endpoints").
pub fn service_url(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Public => "https://globaldisco.crm.dynamics.com",
        Cloud::Gcc => "https://globaldisco.crm9.dynamics.com",
        Cloud::GccHigh => "https://globaldisco.crm.microsoftdynamics.us",
        Cloud::Dod => "https://globaldisco.crm.appsplatform.us",
        Cloud::China => "https://globaldisco.crm.dynamics.cn",
    }
}

/// One environment (an `Instance`; only what we show and use).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Environment {
    /// The OrganizationId.
    pub id: String,
    pub friendly_name: String,
    pub unique_name: String,
    /// The environment URL (what `spec.dynamics.environmentUrl` takes).
    pub url: String,
    /// 0 enabled, 1 disabled.
    #[serde(default)]
    pub state: i32,
}

#[derive(Deserialize)]
struct Instances {
    value: Vec<Environment>,
}

/// The environments the token's user can reach, enabled ones only, in the service's order.
pub async fn list(
    http: &reqwest::Client,
    service: &Url,
    token: &SecretString,
) -> Result<Vec<Environment>, String> {
    let mut url = service.clone();
    url.set_path("/api/discovery/v2.0/Instances");
    let response = http
        .get(url)
        .bearer_auth(token.expose_secret())
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("cannot reach the Global Discovery Service: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the Global Discovery Service answered HTTP {status}"));
    }
    let instances: Instances = response
        .json()
        .await
        .map_err(|_| "the Global Discovery Service's answer is not the expected JSON".to_string())?;
    Ok(instances.value.into_iter().filter(|e| e.state == 0).collect())
}

/// The environment `wanted` names (its URL, with or without a trailing slash, or unique name).
pub fn find<'a>(environments: &'a [Environment], wanted: &str) -> Option<&'a Environment> {
    let wanted = wanted.trim_end_matches('/');
    environments.iter().find(|e| {
        e.url.trim_end_matches('/').eq_ignore_ascii_case(wanted) || e.unique_name.eq_ignore_ascii_case(wanted)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(url: &str, name: &str) -> Environment {
        Environment {
            id: "id".into(),
            friendly_name: name.into(),
            unique_name: name.into(),
            url: url.into(),
            state: 0,
        }
    }

    #[test]
    fn an_environment_is_found_by_url_or_unique_name() {
        let list = [
            env("https://a.crm.dynamics.com/", "orga"),
            env("https://b.crm.dynamics.com", "orgb"),
        ];
        assert_eq!(
            find(&list, "https://a.crm.dynamics.com").unwrap().unique_name,
            "orga"
        );
        assert_eq!(
            find(&list, "https://B.crm.dynamics.com/").unwrap().unique_name,
            "orgb"
        );
        assert_eq!(find(&list, "orgb").unwrap().url, "https://b.crm.dynamics.com");
        assert!(find(&list, "https://c.crm.dynamics.com").is_none());
    }

    #[test]
    fn the_answer_parses_and_disabled_ones_are_kept_apart() {
        let body = r#"{"value":[{"Id":"1","FriendlyName":"Prod","UniqueName":"p","Url":"https://p.crm.dynamics.com","ApiUrl":"x","State":0},
                                 {"Id":"2","FriendlyName":"Old","UniqueName":"o","Url":"https://o.crm.dynamics.com","State":1}]}"#;
        let parsed: Instances = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.value.len(), 2);
        assert_eq!(parsed.value[1].state, 1);
    }
}
