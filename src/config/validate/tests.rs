//! The validation's rules, one test each.
use std::time::Duration;

use super::super::raw::{DEFAULT_QUEUE_MAX_WAIT, DEFAULT_REDIS_TIMEOUT, DEFAULT_RETRY_ATTEMPTS};
use super::super::testing::{NODE, env, problems};
use super::super::{DEFAULT_LISTEN, OnRedisError, from_toml_str};
use crate::limits::Quota;

#[test]
fn a_cluster_section_is_validated_and_its_password_never_shown() {
    let toml = format!(
        "[cluster]\nredis_url = \"redis://:hunter2@10.0.0.5:6379/0\"\non_redis_error = \"reject\"\n{NODE}"
    );
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.on_redis_error, OnRedisError::Reject);
    assert_eq!(cluster.timeout, DEFAULT_REDIS_TIMEOUT);
    let rendered = config.render();
    assert!(
        rendered.contains("redis_url = \"redis://10.0.0.5:6379/0\""),
        "{rendered}"
    );
    assert!(!rendered.contains("hunter2"));
    assert!(!format!("{config:?}").contains("hunter2"));

    let bad = format!("[cluster]\nredis_url = \"http://x\"\ntimeout = \"0s\"\n{NODE}");
    assert_eq!(
        problems(&bad),
        [
            "cluster.redis_url: must start with redis:// (or rediss:// for TLS)",
            "cluster.timeout: must be greater than 0"
        ]
    );
    let ca = tempfile::NamedTempFile::new().unwrap();
    let tls = format!(
        "[cluster]\nredis_url = \"rediss://:hunter2@redis.internal:6380\"\nca_file = \"{}\"\n{NODE}",
        ca.path().display()
    );
    let (config, _) = from_toml_str(&tls, &env).unwrap();
    let rendered = config.render();
    assert!(
        rendered.contains("redis_url = \"rediss://redis.internal:6380\""),
        "{rendered}"
    );
    assert!(rendered.contains("ca_file = "), "{rendered}");
    assert!(!rendered.contains("hunter2"));
    let plain_with_ca = format!(
        "[cluster]\nredis_url = \"redis://x\"\nca_file = \"{}\"\n{NODE}",
        ca.path().display()
    );
    assert_eq!(
        problems(&plain_with_ca),
        ["cluster.ca_file: only a rediss:// cluster.redis_url uses it"]
    );
    let half = format!(
        "[cluster]\nredis_url = \"rediss://x\"\nclient_cert_file = \"{}\"\n{NODE}",
        ca.path().display()
    );
    assert_eq!(
        problems(&half),
        ["cluster.client_cert_file: needs cluster.client_key_file, and the other way round"]
    );
    let missing =
        format!("[cluster]\nredis_url = \"rediss://x\"\nca_file = \"/nonexistent/ca.pem\"\n{NODE}");
    assert_eq!(
        problems(&missing),
        ["cluster.ca_file: file /nonexistent/ca.pem not found"]
    );
    let typo = format!("[cluster]\nredis_url = \"redis://x\"\non_redis_error = \"ignore\"\n{NODE}");
    assert!(
        problems(&typo)[0].contains("on_redis_error"),
        "{:?}",
        problems(&typo)
    );
}

#[test]
fn budgets_on_a_shared_store_without_a_cluster_are_warned_per_replica() {
    let budgeted = "[[clients]]\nname = \"team\"\nkey_env = \"APP_KEY\"\nbudget_usd = 5\nbudget_period = \"day\"\n";
    let store = "[store]\nurl = \"postgres://balancer:pw@db/balancer\"\n";
    let cluster = "[cluster]\nredis_url = \"redis://redis:6379\"\n";
    let warned = |toml: String| {
        let (_, warnings) = from_toml_str(&toml, &env).unwrap();
        warnings
            .0
            .iter()
            .any(|w| w.contains("each replica holds budgets"))
    };
    assert!(warned(format!("{store}{budgeted}{NODE}")));
    assert!(!warned(format!("{store}{cluster}{budgeted}{NODE}")));
    assert!(!warned(format!("{budgeted}{NODE}")), "SQLite: one replica");
    assert!(!warned(format!("{store}{NODE}")), "no budget");
}

#[test]
fn a_minimal_config_takes_every_default() {
    let (config, warnings) = from_toml_str(NODE, &env).unwrap();
    assert!(warnings.0.is_empty());
    assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.queue.max_wait, DEFAULT_QUEUE_MAX_WAIT);
    assert_eq!(config.retry.attempts, DEFAULT_RETRY_ATTEMPTS);
    assert_eq!(&*config.nodes[0].url, "http://127.0.0.1:9001/v1");
    assert_eq!(config.nodes[0].key.expose(), "sk-a-secret");
    assert_eq!(config.nodes[0].quota, Quota::default());
}

#[test]
fn durations_read_as_human_text() {
    let toml = format!("[queue]\nmax_wait = \"250ms\"\n[server]\nrequest_timeout = \"2m\"\n{NODE}");
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    assert_eq!(config.queue.max_wait, Duration::from_millis(250));
    assert_eq!(config.server.request_timeout, Duration::from_secs(120));
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let toml = format!("{NODE}colour = \"red\"\n");
    let p = problems(&toml);
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("nodes[0].colour: unknown field"), "{p:?}");

    let p = problems(&format!("[server]\nlisten_on = 1\n{NODE}"));
    assert!(p[0].starts_with("server.listen_on: unknown field"), "{p:?}");
}

#[test]
fn prices_and_budgets_are_checked_naming_the_field() {
    let toml = format!(
        "[prices.\"m\"]\ninput = -1.0\n[prices.\"n\"]\noutput = 1.0\n\
         {NODE}price_multiplier = -2.0\n[nodes.prices.\"m\"]\nimage = -0.5\n\
         [[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nbudget_usd = 5.0\nbudget_period = \"week\"\n"
    );
    assert_eq!(
        problems(&toml),
        [
            "clients[0].budget_period: must be \"day\", \"month\" or \"total\"",
            "nodes[0].price_multiplier: must be a number, 0 or more",
            "nodes[0].prices.\"m\".image: must be a number of dollars, 0 or more",
            "prices.\"m\".input: must be a number of dollars, 0 or more",
        ]
    );
    // Not a number: the parser names the field.
    let p = problems(&format!("[prices.\"m\"]\ninput = \"cheap\"\n{NODE}"));
    assert!(p[0].starts_with("prices.m.input: invalid type"), "{p:?}");
    // A budget that could never price a model the client may use.
    let toml = format!(
        "{NODE}[[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\nbudget_usd = 5.0\n\
         models = [\"gpt-4o-mini\", \"my-finetune\"]\n"
    );
    assert_eq!(
        problems(&toml),
        [
            "clients[0].models: \"my-finetune\" has no price and the client has a budget; add [prices.\"my-finetune\"]"
        ]
    );
    // Priced, with the table over the shipped list.
    let toml = format!(
        "[prices.\"my-finetune\"]\ninput = 3.0\noutput = 12.0\n{NODE}[[clients]]\nname = \"a\"\n\
         key_env = \"APP_KEY\"\nbudget_usd = 5.0\nbudget_period = \"day\"\nmodels = [\"gpt-4o-mini\", \"my-finetune\"]\n"
    );
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    let own = config.prices.find("my-finetune").unwrap();
    assert_eq!((own.input, own.cached_input, own.output), (3.0, 3.0, 12.0));
    assert_eq!(config.prices.find("gpt-4o-mini").unwrap().output, 0.60);
    let budget = config.clients[0].budget.unwrap();
    assert_eq!((budget.limit.usd(), budget.period.as_str()), (5.0, "day"));
    // `balancer check` shows the budget and every price in force.
    let text = config.render();
    assert!(
        text.contains("budget_usd = 5\nbudget_period = \"day\""),
        "{text}"
    );
    assert!(
        text.contains("[prices.\"my-finetune\"]\ninput = 3\ncached_input = 3\noutput = 12"),
        "{text}"
    );
    assert!(
        text.contains("[prices.\"gpt-4o-mini\"]\ninput = 0.15"),
        "{text}"
    );
}

#[test]
fn sharing_settings_are_checked_naming_the_field() {
    let toml = format!(
        "[queue.reserve]\nhigh = 0.6\nnormal = 0.5\n{NODE}[[clients]]\nname = \"a\"\n\
         key_env = \"APP_KEY\"\npriority = \"urgent\"\nweight = 0\n"
    );
    assert_eq!(
        problems(&toml),
        [
            "clients[0].priority: must be \"high\", \"normal\" or \"low\"",
            "clients[0].weight: must be a number above 0 and at most 1000000",
            "queue.reserve.high: the reserves must sum to less than 1",
        ]
    );
    let toml = format!("[queue.reserve]\nhigh = 1.0\nlow = -0.1\n{NODE}");
    assert_eq!(
        problems(&toml),
        [
            "queue.reserve.high: must be from 0 up to, not including, 1",
            "queue.reserve.low: must be from 0 up to, not including, 1",
        ]
    );
    let toml = format!(
        "[queue]\nmax_depth_per_client = 4\n[queue.reserve]\nhigh = 0.25\n{NODE}\
         [[clients]]\nname = \"a\"\nkey_env = \"APP_KEY\"\npriority = \"high\"\nweight = 2.5\n"
    );
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    assert_eq!(config.queue.max_depth_per_client, 4);
    assert_eq!(config.queue.reserves.high, 0.25);
    assert_eq!(config.clients[0].share.weight, 2.5);
}

#[test]
fn client_keys_must_be_set() {
    let toml = format!("[auth]\nclient_keys_env = [\"APP_KEY\", \"MISSING\"]\n{NODE}");
    assert_eq!(
        problems(&toml),
        ["auth.client_keys_env[1]: environment variable MISSING is not set or empty"]
    );
}

#[test]
fn render_never_shows_a_key() {
    let toml = format!("[auth]\nclient_keys_env = [\"APP_KEY\"]\n{NODE}rpm = 10\n");
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    let text = config.render();
    assert!(
        !text.contains("sk-a-secret") && !text.contains("app-secret"),
        "{text}"
    );
    assert!(text.contains("api_key = \"[redacted]\""));
    assert!(text.contains("rpm = 10"));
    assert!(!format!("{config:?}").contains("secret"));
}

#[test]
fn tiers_are_from_0_to_7_and_render_back() {
    let toml = format!(
        "[[clients]]\nname = \"batch\"\nkey_env = \"APP_KEY\"\nmax_tier = 8\n{NODE}tier = 9\n"
    );
    assert_eq!(
        problems(&toml),
        [
            "clients[0].max_tier: must be from 0 to 7",
            "nodes[0].tier: must be from 0 to 7"
        ]
    );
    let toml = format!(
        "[[clients]]\nname = \"batch\"\nkey_env = \"APP_KEY\"\nmax_tier = 0\n{NODE}tier = 1\n"
    );
    let (config, _) = from_toml_str(&toml, &env).unwrap();
    assert_eq!(
        (config.nodes[0].tier, config.clients[0].max_tier),
        (1, Some(0))
    );
    let text = config.render();
    assert!(
        text.contains("tier = 1") && text.contains("max_tier = 0"),
        "{text}"
    );
}

#[test]
fn utilization_high_is_a_percentage_of_a_provisioned_node() {
    assert_eq!(
        problems(&format!("{NODE}utilization_high = 90\n")),
        ["nodes[0].utilization_high: only for a provisioned node (provisioned = true)"]
    );
    assert_eq!(
        problems(&format!(
            "{NODE}provisioned = true\nutilization_high = 120\n"
        )),
        ["nodes[0].utilization_high: must be a percentage above 0, at most 100"]
    );
    let (config, _) = from_toml_str(&format!("{NODE}provisioned = true\n"), &env).unwrap();
    assert_eq!(config.nodes[0].utilization_high, Some(95.0));
}
