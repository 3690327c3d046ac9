//! The `[[nodes]]` and `[[clients]]` entries: each validated on its own,
//! every problem named by the entry's index and field, and duplicates
//! (names, keys) found across entries. Keys are read here from their
//! variable, file or literal, straight into [`secrecy`] types.

use std::num::NonZeroU64;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use std::collections::BTreeMap;
use std::time::Duration;

use super::raw::{RawClient, RawNode, RawPrice};
use super::{Api, ClientConfig, NodeApi, NodeConfig, Warnings, models_problem};
use crate::keys::{ClientKey, NodeKey};
use crate::limits::{ClientLimits, LimitFields, Quota, Share};
use crate::money::{NodePricing, Price, PriceTable};

pub(super) fn validate_clients(
    raw: Vec<RawClient>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<ClientConfig> {
    let mut clients: Vec<ClientConfig> = Vec::with_capacity(raw.len());
    // Every entry's name and key, valid or not, so a duplicate is named
    // even when its first occurrence has problems of its own.
    let mut names: Vec<String> = Vec::new();
    let mut hashes: Vec<[u8; 32]> = Vec::new();
    for (i, client) in raw.into_iter().enumerate() {
        let before = problems.len();
        let at = |field: &str| format!("clients[{i}].{field}");
        let name = client.name.trim();
        if name.is_empty() {
            problems.push(format!("{}: must not be empty", at("name")));
        } else if names.iter().any(|n| n == name) {
            problems.push(format!("{}: duplicate client name \"{name}\"", at("name")));
        }
        names.push(name.to_owned());
        let key = match env(&client.key_env).filter(|v| !v.trim().is_empty()) {
            Some(value) => Some(ClientKey::new(SecretString::from(value.trim().to_owned()))),
            None => {
                problems.push(format!(
                    "{}: environment variable {} is not set or empty",
                    at("key_env"),
                    client.key_env
                ));
                None
            }
        };
        if let Some(key) = &key {
            let hash = key.hash();
            if hashes.contains(&hash) {
                problems.push(format!("{}: the same key as another client", at("key_env")));
            }
            hashes.push(hash);
        }
        let mut named = |found: Vec<(&str, &str)>| {
            for (field, message) in found {
                problems.push(format!("{}: {message}", at(field)));
            }
        };
        let limits = ClientLimits::from_parts(LimitFields {
            rpm: client.rpm,
            tpm: client.tpm,
            burst: client.burst,
            rate_per_second: client.rate_per_second,
            max_concurrency: client.max_concurrency,
        })
        .map_err(&mut named)
        .ok();
        let share = Share::from_parts(client.priority.as_deref(), client.weight)
            .map_err(&mut named)
            .ok();
        let budget = crate::money::budget_of(client.budget_usd, client.budget_period.as_deref())
            .map_err(|found| named(vec![found]))
            .ok();
        if let Some(message) = client.models.as_deref().and_then(models_problem) {
            problems.push(format!("{}: {message}", at("models")));
        }
        if client.max_tier.is_some_and(|tier| tier > super::MAX_TIER) {
            let problem = format!("must be from 0 to {}", super::MAX_TIER);
            problems.push(format!("{}: {problem}", at("max_tier")));
        }
        if problems.len() > before {
            continue;
        }
        if let (Some(key), Some(limits), Some(share), Some(budget)) = (key, limits, share, budget) {
            clients.push(ClientConfig {
                name: Arc::from(name),
                key,
                limits,
                share,
                models: client.models,
                enabled: client.enabled,
                budget,
                max_tier: client.max_tier,
            });
        }
    }
    clients
}

pub(super) fn validate_node(
    i: usize,
    raw: RawNode,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
    warnings: &mut Warnings,
) -> Option<NodeConfig> {
    let before = problems.len();
    let at = |field: &str| format!("nodes[{i}].{field}");

    let name = raw.name.trim();
    if name.is_empty() {
        problems.push(format!("{}: must not be empty", at("name")));
    }

    let url = raw.url.trim_end_matches('/');
    if let Some(problem) = url_problem(url) {
        problems.push(format!("{}: {problem}", at("url")));
    }

    let key = read_node_key(i, &raw, env, problems, warnings);
    let (api, upstream_names, models) = node_api(i, &raw, problems);
    let window = window_of(i, &raw, &api, problems);

    if let Some(models) = &raw.models {
        if models.is_empty() {
            problems.push(format!(
                "{}: must not be empty; leave it out to serve any model",
                at("models")
            ));
        }
        if models.iter().any(|m| m.trim().is_empty()) {
            problems.push(format!("{}: model names must not be empty", at("models")));
        }
    }

    let quota = node_quota(i, &raw, problems);

    if let Some(ca) = &raw.ca_file
        && !ca.is_file()
    {
        problems.push(format!(
            "{}: file {} not found",
            at("ca_file"),
            ca.display()
        ));
    }

    let pricing = node_pricing(i, &raw, problems);
    let utilization_high = node_capacity(&raw, &at, problems);

    if problems.len() > before {
        return None;
    }
    Some(NodeConfig {
        name: Arc::from(name),
        url: Arc::from(url),
        key: key?,
        models,
        quota,
        ca_file: raw.ca_file,
        key_file: raw.api_key_file,
        organization: raw.organization,
        project: raw.project,
        api,
        upstream_names,
        window,
        default_completion_tokens: raw.default_completion_tokens,
        pricing,
        tier: raw.tier,
        utilization_high,
    })
}

/// `nodes[i]`'s place in the capacity: its tier, and the utilisation a
/// provisioned deployment is held at (`None`: not provisioned).
fn node_capacity(
    raw: &RawNode,
    at: &dyn Fn(&str) -> String,
    problems: &mut Vec<String>,
) -> Option<f64> {
    if raw.tier > super::MAX_TIER {
        problems.push(format!(
            "{}: must be from 0 to {}",
            at("tier"),
            super::MAX_TIER
        ));
    }
    match (raw.provisioned, raw.utilization_high) {
        (false, None) => None,
        (false, Some(_)) => {
            problems.push(format!(
                "{}: only for a provisioned node (provisioned = true)",
                at("utilization_high")
            ));
            None
        }
        (true, high) => {
            let high = high.unwrap_or(super::DEFAULT_UTILIZATION_HIGH);
            if !(high > 0.0 && high <= 100.0) {
                problems.push(format!(
                    "{}: must be a percentage above 0, at most 100",
                    at("utilization_high")
                ));
            }
            Some(high)
        }
    }
}

/// `nodes[i]`'s limits: each, if set, above 0.
fn node_quota(i: usize, raw: &RawNode, problems: &mut Vec<String>) -> Quota {
    let mut limit = |field: &str, value: Option<u64>| match value {
        Some(0) => {
            problems.push(format!("nodes[{i}].{field}: must be greater than 0"));
            None
        }
        other => other.and_then(NonZeroU64::new),
    };
    Quota {
        rpm: limit("rpm", raw.rpm),
        tpm: limit("tpm", raw.tpm),
        bpm: limit("bpm", raw.bpm),
        max_concurrency: limit("max_concurrency", raw.max_concurrency),
    }
}

/// `nodes[i].price_multiplier` and `nodes[i].prices`.
fn node_pricing(i: usize, raw: &RawNode, problems: &mut Vec<String>) -> NodePricing {
    let multiplier = raw.price_multiplier.unwrap_or(1.0);
    if !multiplier.is_finite() || multiplier < 0.0 {
        problems.push(format!(
            "nodes[{i}].price_multiplier: must be a number, 0 or more"
        ));
    }
    NodePricing {
        multiplier,
        own: PriceTable::of(prices(&format!("nodes[{i}].prices"), &raw.prices, problems)),
    }
}

/// Price entries, each field checked (`{at}."model".field: ...`).
pub(super) fn prices(
    at: &str,
    raw: &BTreeMap<String, RawPrice>,
    problems: &mut Vec<String>,
) -> BTreeMap<String, Price> {
    let mut out = BTreeMap::new();
    for (model, entry) in raw {
        let price = Price {
            input: entry.input,
            cached_input: entry.cached_input.unwrap_or(entry.input),
            output: entry.output,
            image: entry.image,
            audio_second: entry.audio_second,
        };
        if model.trim().is_empty() {
            problems.push(format!("{at}: a model name must not be empty"));
        } else if let Some((field, message)) = price.problem() {
            problems.push(format!("{at}.\"{model}\".{field}: {message}"));
        } else {
            out.insert(model.clone(), price);
        }
    }
    out
}

/// The node's enforcement window: as set, else its dialect's default.
fn window_of(i: usize, raw: &RawNode, api: &NodeApi, problems: &mut Vec<String>) -> Duration {
    let window = raw.window.unwrap_or(match api {
        NodeApi::OpenAi => OPENAI_WINDOW,
        NodeApi::Azure { .. } => AZURE_WINDOW,
    });
    if window < MIN_WINDOW || window > OPENAI_WINDOW {
        problems.push(format!(
            "nodes[{i}].window: must be from 1s to 60s (the per-minute limits hold pro rata within every span this long)"
        ));
    }
    window
}

/// The span over which an OpenAI-style node's limits hold: the minute
/// (its buckets refill continuously; a shorter `window` can be set).
const OPENAI_WINDOW: Duration = Duration::from_secs(60);
/// Azure evaluates RPM and TPM over short periods, typically 10 s.
const AZURE_WINDOW: Duration = Duration::from_secs(10);
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// The node's API, the upstream's names for its models, and the models it
/// serves (an Azure node's are its deployments').
fn node_api(
    i: usize,
    raw: &RawNode,
    problems: &mut Vec<String>,
) -> (NodeApi, BTreeMap<String, String>, Option<Vec<String>>) {
    let at = |field: &str| format!("nodes[{i}].{field}");
    match raw.api {
        Api::OpenAi => {
            for (field, set) in [
                ("api_version", raw.api_version.is_some()),
                ("deployments", raw.deployments.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "{}: only for api = \"azure\" (an OpenAI-style node renames models with model_names)",
                        at(field)
                    ));
                }
            }
            let names = raw.model_names.clone().unwrap_or_default();
            check_names(&at("model_names"), &names, problems);
            (NodeApi::OpenAi, names, raw.models.clone())
        }
        Api::Azure => {
            if raw.models.is_some() || raw.model_names.is_some() {
                problems.push(format!(
                    "{}: an Azure node serves the models its deployments map; list them there",
                    at(if raw.models.is_some() {
                        "models"
                    } else {
                        "model_names"
                    })
                ));
            }
            let deployments = raw.deployments.clone().unwrap_or_default();
            if deployments.is_empty() {
                problems.push(format!(
                    "{}: an Azure node needs deployments = {{ \"<model>\" = \"<deployment>\" }}",
                    at("deployments")
                ));
            }
            check_names(&at("deployments"), &deployments, problems);
            if let Some(version) = &raw.api_version
                && !is_name(version)
            {
                problems.push(format!(
                    "{}: letters, digits, '-', '.' and '_' only (e.g. \"2024-10-21\")",
                    at("api_version")
                ));
            }
            if raw.url.trim_end_matches('/').ends_with("/openai") {
                problems.push(format!(
                    "{}: the resource endpoint (https://NAME.openai.azure.com), without /openai",
                    at("url")
                ));
            }
            let models = Some(deployments.keys().cloned().collect());
            let api = NodeApi::Azure {
                api_version: raw.api_version.clone(),
            };
            (api, deployments, models)
        }
    }
}

/// A deployment or upstream model name, or an API version: it goes into a
/// URL path or query as it is.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
}

fn check_names(field: &str, names: &BTreeMap<String, String>, problems: &mut Vec<String>) {
    for (model, upstream) in names {
        if model.trim().is_empty() {
            problems.push(format!("{field}: a model name must not be empty"));
        }
        if !is_name(upstream) {
            problems.push(format!(
                "{field}.\"{model}\": \"{upstream}\" is not a usable name (letters, digits, '-', '.', '_', ':'; no '/')"
            ));
        }
    }
}

/// What is wrong with a node's base URL, if anything. A URL that does not
/// parse is not quoted back whole: it may carry credentials.
fn url_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if !matches!(parsed.scheme(), "http" | "https") => Some(format!(
            "scheme must be http or https, found \"{}\"",
            parsed.scheme()
        )),
        Ok(parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            Some("must not carry credentials; use api_key_env or api_key_file".to_owned())
        }
        Ok(parsed) if parsed.query().is_some() || parsed.fragment().is_some() => {
            Some("must not have a query or fragment".to_owned())
        }
        Ok(_) => None,
        Err(err) => Some(format!("not a valid URL ({err})")),
    }
}

fn read_node_key(
    i: usize,
    raw: &RawNode,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
    warnings: &mut Warnings,
) -> Option<NodeKey> {
    let sources = [
        raw.api_key_env.is_some(),
        raw.api_key_file.is_some(),
        raw.api_key.is_some(),
    ];
    match sources.iter().filter(|s| **s).count() {
        1 => {}
        0 => {
            problems.push(format!(
                "nodes[{i}]: needs one of api_key_env, api_key_file or api_key"
            ));
            return None;
        }
        _ => {
            problems.push(format!(
                "nodes[{i}]: give only one of api_key_env, api_key_file or api_key"
            ));
            return None;
        }
    }
    let (field, secret): (&str, Result<SecretString, String>) = if let Some(var) = &raw.api_key_env
    {
        let value = env(var).map(SecretString::from);
        let missing = format!("environment variable {var} is not set or empty");
        ("api_key_env", value.ok_or(missing))
    } else if let Some(path) = &raw.api_key_file {
        let value = std::fs::read_to_string(path)
            .map(|text| SecretString::from(text.trim().to_owned()))
            .map_err(|err| format!("cannot read {}: {}", path.display(), err.kind()));
        ("api_key_file", value)
    } else {
        warnings.0.push(format!(
            "nodes[{i}].api_key: a literal key in the config file; prefer api_key_env or api_key_file"
        ));
        let value = raw.api_key.clone().map(SecretString::from);
        ("api_key", value.ok_or_else(String::new))
    };
    let secret = match secret {
        Ok(secret) if secret.expose_secret().trim().is_empty() => {
            problems.push(format!("nodes[{i}].{field}: the key is empty"));
            return None;
        }
        Ok(secret) => secret,
        Err(why) => {
            problems.push(format!("nodes[{i}].{field}: {why}"));
            return None;
        }
    };
    match NodeKey::new(secret) {
        Ok(key) => Some(key),
        Err(why) => {
            problems.push(format!("nodes[{i}].{field}: {why}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{NODE, env, problems};
    use super::super::{NodeApi, from_toml_str};
    use crate::keys::hash_key;

    #[test]
    fn a_zero_limit_names_node_and_field() {
        let toml = format!(
            "{NODE}\n[[nodes]]\nname = \"b\"\nurl = \"http://h/v1\"\napi_key = \"k\"\nrpm = 0\n"
        );
        assert_eq!(problems(&toml), ["nodes[1].rpm: must be greater than 0"]);
    }

    #[test]
    fn duplicate_names_bad_urls_and_missing_keys_are_each_reported() {
        let toml = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key_env = \"KEY_A\"\n\
                    [[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key_env = \"KEY_A\"\n\
                    [[nodes]]\nname = \"c\"\nurl = \"not a url\"\napi_key_env = \"NOPE\"\n";
        let p = problems(toml);
        assert!(
            p.contains(&"nodes[1].name: duplicate node name \"a\"".to_owned()),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("nodes[2].url: not a valid URL")),
            "{p:?}"
        );
        assert!(
            p.contains(
                &"nodes[2].api_key_env: environment variable NOPE is not set or empty".to_owned()
            ),
            "{p:?}"
        );
    }

    #[test]
    fn a_node_needs_exactly_one_key_source() {
        let none = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\n";
        assert_eq!(
            problems(none),
            ["nodes[0]: needs one of api_key_env, api_key_file or api_key"]
        );
        let two = "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"x\"\napi_key_env = \"KEY_A\"\n";
        assert_eq!(
            problems(two),
            ["nodes[0]: give only one of api_key_env, api_key_file or api_key"]
        );
    }

    #[test]
    fn a_key_file_is_trimmed_and_a_literal_key_is_warned() {
        let dir = std::env::temp_dir().join(format!("balancer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "  sk-from-file\n").unwrap();
        let toml = format!(
            "[[nodes]]\nname = \"f\"\nurl = \"http://h/v1\"\napi_key_file = \"{}\"\n\
             [[nodes]]\nname = \"l\"\nurl = \"http://h/v1\"\napi_key = \"sk-literal\"\n",
            file.display()
        );
        let (config, warnings) = from_toml_str(&toml, &env).unwrap();
        assert_eq!(config.nodes[0].key.expose(), "sk-from-file");
        assert_eq!(warnings.0.len(), 1);
        assert!(warnings.0[0].starts_with("nodes[1].api_key:"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn clients_are_validated_field_by_field() {
        let toml = format!(
            "{NODE}[[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nrpm = 0\nburst = 5\n\
             [[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nmodels = []\n\
             [[clients]]\nname = \"c\"\nkey_env = \"NOPE\"\n"
        );
        assert_eq!(
            problems(&toml),
            [
                "clients[0].rpm: must be greater than 0; leave it out for no limit",
                "clients[0].rate_per_second: burst needs rate_per_second too",
                "clients[1].name: duplicate client name \"a\"",
                "clients[1].key_env: the same key as another client",
                "clients[1].models: must list model names; leave it out to allow every model",
                "clients[2].key_env: environment variable NOPE is not set or empty",
            ]
        );
    }

    #[test]
    fn a_client_reads_its_key_and_limits() {
        let toml = format!(
            "{NODE}[[clients]]\nname = \"team\"\nkey_env = \"APP_KEY\"\nrpm = 60\nburst = 5\nrate_per_second = 0.5\nmodels = [\"gpt-4o-mini\"]\n"
        );
        let (config, _) = from_toml_str(&toml, &env).unwrap();
        let client = &config.clients[0];
        assert_eq!(client.key.hash(), hash_key(b"app-secret"));
        assert_eq!(client.limits.rpm.map(u64::from), Some(60));
        assert_eq!(
            client
                .limits
                .bucket
                .map(|b| (u64::from(b.burst), b.rate_per_second)),
            Some((5, 0.5))
        );
        assert!(client.enabled);
        assert!(!config.render().contains("app-secret"));
    }

    const AZURE: &str = "[[nodes]]\nname = \"az\"\nurl = \"https://res.openai.azure.com\"\napi_key = \"k\"\napi = \"azure\"\n";

    #[test]
    fn an_azure_node_reads_its_deployments_version_and_ten_second_window() {
        let toml = format!(
            "{AZURE}api_version = \"2024-10-21\"\ndeployments = {{ \"gpt-4o-mini\" = \"mini-east\" }}\n"
        );
        let (config, _) = from_toml_str(&toml, &env).map_err(|e| e.problems).unwrap();
        let node = &config.nodes[0];
        assert_eq!(
            node.api,
            NodeApi::Azure {
                api_version: Some("2024-10-21".to_owned())
            }
        );
        assert_eq!(node.models, Some(vec!["gpt-4o-mini".to_owned()]));
        assert_eq!(node.upstream_names["gpt-4o-mini"], "mini-east");
        assert_eq!(node.window, Duration::from_secs(10));
    }

    #[test]
    fn bad_azure_settings_are_refused_naming_the_field() {
        let cases = [
            (AZURE.to_owned(), "nodes[0].deployments"),
            (
                format!("{AZURE}deployments = {{ \"gpt-4o\" = \"a/b\" }}\n"),
                "nodes[0].deployments.\"gpt-4o\"",
            ),
            (
                format!("{AZURE}deployments = {{ \"gpt-4o\" = \"d\" }}\nwindow = \"0s\"\n"),
                "nodes[0].window",
            ),
            (
                format!("{AZURE}deployments = {{ \"gpt-4o\" = \"d\" }}\nwindow = \"61s\"\n"),
                "nodes[0].window",
            ),
            (
                "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"k\"\napi_version = \"1\"\n"
                    .to_owned(),
                "nodes[0].api_version",
            ),
        ];
        for (toml, field) in cases {
            let problems = problems(&toml);
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{toml}: {problems:?}"
            );
        }
        // An unknown dialect is a parse error naming the field.
        let unknown = problems(
            "[[nodes]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"k\"\napi = \"bedrock\"\n",
        );
        assert!(
            unknown
                .iter()
                .any(|p| p.contains("api") && p.contains("bedrock")),
            "{unknown:?}"
        );
    }
}
