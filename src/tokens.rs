//! Token counting with the model family's real tokenizer.
//!
//! `o200k_base` serves gpt-4o, gpt-4.1, gpt-5, chatgpt-4o and the o-series;
//! `cl100k_base` everything else (gpt-4, gpt-3.5, text-embedding-3 and
//! unknown models). The crate is `tiktoken` (a pure-Rust tiktoken, not
//! `tiktoken-rs`): its vocabularies are compiled in (no download at run
//! time), counting allocates nothing (a hand-written pre-tokenizer, a merge
//! into a thread-local buffer, and a thread-local cache of whole pieces, so
//! no shared pool is touched), and both tables together take about 31 MB
//! where `bpe-openai`'s took 96 MB. `cargo bench --bench hot_path --
//! tokens` measures it against `bpe-openai` (the previous choice) and
//! `tiktoken-rs`; `tokens::tests` checks it counts as `bpe-openai` does.
//!
//! A table is built on its first use; [`Encoding::load_for`] builds the
//! ones a config's models need ahead of the first request.
//!
//! Chat prompts are counted as OpenAI's cookbook counts them: 3 tokens per
//! message, plus role, content and name (and 1 for a name), plus 3 to prime
//! the reply. It is an estimate before the call; the upstream's `usage`
//! corrects it afterwards.

use tiktoken::CoreBpe;

/// Tokens every chat message costs beyond its text.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens a `name` field costs beyond its text.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the assistant's reply.
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// The tokenizer families the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Cl100kBase,
    O200kBase,
}

impl Encoding {
    /// The family a model name belongs to.
    pub fn for_model(model: &str) -> Self {
        let model = model.rsplit('/').next().unwrap_or(model);
        let o_series =
            model.len() >= 2 && model.starts_with('o') && model.as_bytes()[1].is_ascii_digit();
        if o_series
            || model.starts_with("gpt-4o")
            || model.starts_with("gpt-4.1")
            || model.starts_with("gpt-4.5")
            || model.starts_with("gpt-5")
            || model.starts_with("chatgpt-4o")
            || model.starts_with("gpt-oss")
        {
            Encoding::O200kBase
        } else {
            Encoding::Cl100kBase
        }
    }

    /// The encoding's name in OpenAI's tiktoken.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }

    /// The tokenizer, built on first use and shared by every thread.
    pub fn tokenizer(self) -> &'static CoreBpe {
        self.cell().get_or_init(|| {
            // Both vocabularies are compiled in (the crate's `vocab-*`
            // features), so the lookup cannot miss.
            tiktoken::get_encoding(self.name()).unwrap_or_else(|| unreachable_encoding(self))
        })
    }

    /// Tokens in `text`.
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        self.tokenizer().count(text) as u64
    }

    /// Builds the tables `models` need (each family once), so the first
    /// request does not wait for them; none when `models` is empty.
    /// Whether any was built now (not before).
    pub fn load_for<'m>(models: impl IntoIterator<Item = &'m str>) -> bool {
        let mut seen = [false; 2];
        let mut built = false;
        for model in models {
            let encoding = Encoding::for_model(model);
            let at = encoding as usize;
            if !seen[at] {
                seen[at] = true;
                built |= !encoding.is_built();
                encoding.tokenizer();
            }
        }
        built
    }

    fn cell(self) -> &'static std::sync::OnceLock<&'static CoreBpe> {
        static CL100K: std::sync::OnceLock<&'static CoreBpe> = std::sync::OnceLock::new();
        static O200K: std::sync::OnceLock<&'static CoreBpe> = std::sync::OnceLock::new();
        match self {
            Encoding::Cl100kBase => &CL100K,
            Encoding::O200kBase => &O200K,
        }
    }

    fn is_built(self) -> bool {
        self.cell().get().is_some()
    }
}

/// Never reached: the crate is built with both vocabularies.
#[cold]
fn unreachable_encoding(encoding: Encoding) -> &'static CoreBpe {
    #[expect(
        clippy::panic,
        reason = "a build without a vocabulary is a packaging error, caught by every test"
    )]
    {
        panic!("tiktoken was built without {}", encoding.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_families_pick_their_tokenizer() {
        for m in [
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-5",
            "o1-preview",
            "o3-mini",
            "o4-mini",
            "openai/gpt-4o",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::O200kBase, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
            "llama-3",
            "omni",
        ] {
            assert_eq!(Encoding::for_model(m), Encoding::Cl100kBase, "{m}");
        }
    }

    /// Text of every kind the pre-tokenizer splits differently: letters
    /// of several scripts and cases, contractions, digits, punctuation,
    /// runs of spaces and newlines, emoji and combining marks.
    fn seeded_texts(count: usize) -> Vec<String> {
        let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ 0123456789 \n\t\r.,;:'\"!?-_/\\()[]{}<>@#$%^&*+=~`|éüßçñ日本語中文한국어Ωπ😀🚀\u{300}\u{301}   'll 's 're"
            .chars()
            .collect();
        // A linear congruential sequence: the same texts on every run.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |below: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % below
        };
        (0..count)
            .map(|i| {
                let len = next(if i % 50 == 0 { 2_000 } else { 80 });
                (0..len).map(|_| alphabet[next(alphabet.len())]).collect()
            })
            .collect()
    }

    #[test]
    fn counts_exactly_as_the_previous_tokenizer_did() {
        for (encoding, reference) in [
            (Encoding::Cl100kBase, bpe_openai::cl100k_base()),
            (Encoding::O200kBase, bpe_openai::o200k_base()),
        ] {
            for text in seeded_texts(20_000) {
                assert_eq!(
                    encoding.count(&text),
                    reference.count(text.as_str()) as u64,
                    "{encoding:?}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn counts_match_the_reference_vocabularies() {
        // Reference counts from OpenAI's tokenizers.
        assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
        assert_eq!(Encoding::O200kBase.count("hello world"), 2);
        assert_eq!(Encoding::Cl100kBase.count(""), 0);
        // The families differ on longer text.
        let text = "Die Straßenbahn fährt um 12:45 über die Brücke. 東京は晴れです。";
        assert_ne!(
            Encoding::Cl100kBase.count(text),
            Encoding::O200kBase.count(text)
        );
    }
}
