//! Prices: what a model's tokens (and images, and seconds of audio)
//! cost, per node.
//!
//! A [`Price`] is written in US dollars per million tokens (`input`,
//! `cached_input`, `output`), per image and per second of audio, as the
//! providers publish them. The [`PriceTable`] is the shipped list ([`DEFAULT_PRICES`]) with
//! the config's `[prices."model"]` entries over it; a node may carry a
//! `price_multiplier` and its own `[nodes.prices."model"]` entries, which
//! take precedence over the table for that node.
//!
//! A model is found by its exact name, then without a dated snapshot
//! suffix (`gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`); nothing
//! else is guessed, so `gpt-4o-mini-realtime` is not priced as
//! `gpt-4o-mini`.

use std::collections::BTreeMap;

use super::{Cost, Usage};

/// One model's prices, in US dollars: per million tokens, per image, per
/// second of audio.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub input: f64,
    /// Prompt tokens the provider served from its cache.
    pub cached_input: f64,
    /// Completion tokens, reasoning tokens among them.
    pub output: f64,
    /// Each image an images endpoint returns.
    pub image: f64,
    /// Each second of audio a transcription or translation reads.
    pub audio_second: f64,
}

impl Price {
    /// What `usage` costs at these prices, times `multiplier`: cached
    /// prompt tokens at the cached price, the rest of the prompt at the
    /// input price, every completion token (reasoning included: it is part
    /// of the completion count, never added again) at the output price.
    pub fn cost(&self, usage: &Usage, multiplier: f64) -> Cost {
        Cost::from_nanos_f64(self.nanos(usage) * multiplier)
    }

    /// The most a request can cost: its whole prompt uncached, every
    /// completion token it reserved, every image it asked for; rounded up.
    pub fn worst_case(&self, prompt: u64, completion: u64, images: u64, multiplier: f64) -> Cost {
        let usage = Usage {
            prompt,
            completion,
            images,
            ..Usage::default()
        };
        Cost::from_nanos_f64_up(self.nanos(&usage) * multiplier)
    }

    /// `usage` at these prices, in nano-dollars, unrounded.
    fn nanos(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_prompt.min(usage.prompt);
        per_token(self.input) * (usage.prompt - cached) as f64
            + per_token(self.cached_input) * cached as f64
            + per_token(self.output) * usage.completion as f64
            + self.image * 1e9 * usage.images as f64
            + self.audio_second * 1e6 * usage.audio_ms as f64
    }

    /// The first field that is not a price (negative, not finite).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("output", self.output),
            ("image", self.image),
            ("audio_second", self.audio_second),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_finite() || *v < 0.0)
        .map(|(field, _)| (field, "must be a number of dollars, 0 or more"))
    }
}

/// Nano-dollars per token of a price per million tokens.
fn per_token(usd_per_million: f64) -> f64 {
    usd_per_million * 1_000.0
}

/// Prices by model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    by_model: BTreeMap<String, Price>,
}

impl PriceTable {
    /// The shipped list prices ([`DEFAULT_PRICES`]).
    pub fn defaults() -> Self {
        Self {
            by_model: DEFAULT_PRICES
                .iter()
                .map(
                    |&(model, input, cached_input, output, image, audio_second)| {
                        (
                            model.to_owned(),
                            Price {
                                input,
                                cached_input,
                                output,
                                image,
                                audio_second,
                            },
                        )
                    },
                )
                .collect(),
        }
    }

    /// A table of exactly these entries.
    pub fn of(by_model: BTreeMap<String, Price>) -> Self {
        Self { by_model }
    }

    /// `entries` over this table, model by model.
    pub fn overridden(mut self, entries: BTreeMap<String, Price>) -> Self {
        self.by_model.extend(entries);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    /// Every model and its price, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.by_model.iter().map(|(m, p)| (m.as_str(), p))
    }

    /// The price of `model`: by its name, else by its name without a
    /// dated snapshot suffix (`-YYYY-MM-DD`).
    pub fn find(&self, model: &str) -> Option<&Price> {
        self.by_model
            .get(model)
            .or_else(|| self.by_model.get(without_snapshot(model)?))
    }
}

/// `gpt-4o-2024-08-06` -> `gpt-4o`; `None` without such a suffix.
fn without_snapshot(model: &str) -> Option<&str> {
    let (base, date) = model.split_at_checked(model.len().checked_sub(11)?)?;
    let date = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| date[r].iter().all(u8::is_ascii_digit);
    (date[0] == b'-'
        && digits(1..5)
        && date[5] == b'-'
        && digits(6..8)
        && date[8] == b'-'
        && digits(9..11)
        && !base.is_empty())
    .then_some(base)
}

/// How one node prices its models: its own entries over the table, then
/// a multiplier (a discounted key, a provider's markup).
#[derive(Debug, Clone, PartialEq)]
pub struct NodePricing {
    pub multiplier: f64,
    pub own: PriceTable,
}

impl Default for NodePricing {
    fn default() -> Self {
        Self {
            multiplier: 1.0,
            own: PriceTable::default(),
        }
    }
}

impl NodePricing {
    /// `model`'s price on this node, and the multiplier to apply.
    pub fn price<'a>(&'a self, table: &'a PriceTable, model: &str) -> Option<(&'a Price, f64)> {
        self.own
            .find(model)
            .or_else(|| table.find(model))
            .map(|p| (p, self.multiplier))
    }
}

/// OpenAI's public list prices (standard tier), US dollars per million
/// tokens (input, cached input, output) and per image, as published at
/// <https://openai.com/api/pricing> and transcribed for this release
/// (prices as of 2025-08; re-check them there: they change). A `0.0`
/// cached price means the model has no cached-input discount listed and
/// is then charged at 0 for cached tokens only if the provider reports
/// any; images are priced per standard 1024x1024 image; whisper-1 at
/// $0.006 a minute of audio.
pub const DEFAULT_PRICES: &[(&str, f64, f64, f64, f64, f64)] = &[
    // model, input, cached_input, output, image, audio_second
    ("gpt-5", 1.25, 0.125, 10.0, 0.0, 0.0),
    ("gpt-5-mini", 0.25, 0.025, 2.0, 0.0, 0.0),
    ("gpt-5-nano", 0.05, 0.005, 0.40, 0.0, 0.0),
    ("gpt-4.1", 2.0, 0.50, 8.0, 0.0, 0.0),
    ("gpt-4.1-mini", 0.40, 0.10, 1.60, 0.0, 0.0),
    ("gpt-4.1-nano", 0.10, 0.025, 0.40, 0.0, 0.0),
    ("gpt-4o", 2.50, 1.25, 10.0, 0.0, 0.0),
    ("gpt-4o-mini", 0.15, 0.075, 0.60, 0.0, 0.0),
    ("gpt-4-turbo", 10.0, 10.0, 30.0, 0.0, 0.0),
    ("gpt-4", 30.0, 30.0, 60.0, 0.0, 0.0),
    ("gpt-3.5-turbo", 0.50, 0.50, 1.50, 0.0, 0.0),
    ("o1", 15.0, 7.50, 60.0, 0.0, 0.0),
    ("o1-mini", 1.10, 0.55, 4.40, 0.0, 0.0),
    ("o3", 2.0, 0.50, 8.0, 0.0, 0.0),
    ("o3-mini", 1.10, 0.55, 4.40, 0.0, 0.0),
    ("o4-mini", 1.10, 0.275, 4.40, 0.0, 0.0),
    ("gpt-4o-transcribe", 2.50, 2.50, 10.0, 0.0, 0.0),
    ("gpt-4o-mini-transcribe", 1.25, 1.25, 5.0, 0.0, 0.0),
    ("text-embedding-3-small", 0.02, 0.02, 0.0, 0.0, 0.0),
    ("text-embedding-3-large", 0.13, 0.13, 0.0, 0.0, 0.0),
    ("text-embedding-ada-002", 0.10, 0.10, 0.0, 0.0, 0.0),
    ("dall-e-3", 0.0, 0.0, 0.0, 0.04, 0.0),
    ("dall-e-2", 0.0, 0.0, 0.0, 0.02, 0.0),
    ("whisper-1", 0.0, 0.0, 0.0, 0.0, 0.0001),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dated_snapshot_is_priced_as_its_model_and_nothing_else_is_guessed() {
        let table = PriceTable::defaults();
        let mini = table.find("gpt-4o-mini").copied();
        assert!(mini.is_some());
        assert_eq!(table.find("gpt-4o-mini-2024-07-18").copied(), mini);
        assert_eq!(table.find("gpt-4o-mini-realtime"), None);
        assert_eq!(table.find("gpt-4o-mini-2024-7-18"), None);
        assert_eq!(table.find("-2024-07-18"), None);
        assert_eq!(table.find("x"), None);
    }

    #[test]
    fn a_node_s_own_entry_wins_and_its_multiplier_applies() {
        let table = PriceTable::defaults();
        let mut own = BTreeMap::new();
        own.insert(
            "gpt-4o".to_owned(),
            Price {
                input: 1.0,
                ..Price::default()
            },
        );
        let node = NodePricing {
            multiplier: 0.5,
            own: PriceTable::of(own),
        };
        let (price, m) = node.price(&table, "gpt-4o").expect("priced");
        assert_eq!((price.input, m), (1.0, 0.5));
        let (price, _) = node.price(&table, "gpt-4o-mini").expect("from the table");
        assert_eq!(price.input, 0.15);
        assert!(node.price(&table, "unknown").is_none());
    }

    #[test]
    fn the_shipped_prices_are_all_prices() {
        for (model, price) in PriceTable::defaults().iter() {
            assert_eq!(price.problem(), None, "{model}");
        }
    }
}
