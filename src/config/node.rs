//! What a node's config says of itself: the limits it sets and how it
//! differs from an earlier version of it.

use super::{NodeApi, NodeConfig};
use crate::limits::NodeLimits;

impl NodeConfig {
    /// What this node sets of its limiter.
    pub fn limits(&self) -> NodeLimits {
        NodeLimits {
            quota: self.quota,
            window: self.window,
            charged_at_arrival: matches!(self.api, NodeApi::Azure { .. }),
            default_completion: self.default_completion_tokens,
            utilization_high: self.utilization_high,
        }
    }

    /// Every setting in which this node differs from `before` (the same
    /// node in the running config), by its name in `Balancer.toml`. A key
    /// is named, never shown.
    pub fn changes_from(&self, before: &NodeConfig) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut note = |differs: bool, name: &'static str| {
            if differs {
                changed.push(name);
            }
        };
        note(before.url != self.url, "url");
        note(!before.key.same_as(&self.key), "key");
        note(before.key_file != self.key_file, "key_file");
        note(before.models != self.models, "models");
        note(before.quota != self.quota, "limits");
        note(before.window != self.window, "window");
        note(before.ca_file != self.ca_file, "ca_file");
        note(before.organization != self.organization, "organization");
        note(before.project != self.project, "project");
        note(before.api != self.api, "api");
        let names = before.upstream_names != self.upstream_names;
        note(names, "model_names");
        let completion = before.default_completion_tokens != self.default_completion_tokens;
        note(completion, "default_completion_tokens");
        note(before.pricing != self.pricing, "prices");
        note(before.tier != self.tier, "tier");
        let provisioned = before.utilization_high.is_some() != self.utilization_high.is_some();
        note(provisioned, "provisioned");
        let high = before.utilization_high != self.utilization_high;
        note(high && !provisioned, "utilization_high");
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::env;

    fn node(url: &str) -> NodeConfig {
        let toml = format!("[[nodes]]\nname = \"a\"\nurl = \"{url}\"\napi_key_env = \"KEY_A\"\n");
        let (mut config, _) = crate::config::from_toml_str(&toml, &env).unwrap();
        config.nodes.remove(0)
    }

    #[test]
    fn every_changed_setting_of_a_node_is_named() {
        let before = node("http://127.0.0.1:9001/v1");
        assert!(
            node("http://127.0.0.1:9001/v1")
                .changes_from(&before)
                .is_empty()
        );
        let mut after = node("http://127.0.0.1:9002/v1");
        after.window = std::time::Duration::from_secs(10);
        after.api = NodeApi::Azure { api_version: None };
        after.pricing.multiplier = 0.5;
        after.ca_file = Some("/etc/ca.pem".into());
        after.default_completion_tokens = Some(64);
        assert_eq!(
            after.changes_from(&before),
            [
                "url",
                "window",
                "ca_file",
                "api",
                "default_completion_tokens",
                "prices"
            ]
        );
    }
}
