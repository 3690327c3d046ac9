//! The request bodies the benchmarks send: each one different, so that no
//! cache of whole requests can stand in for counting their tokens.
//!
//! - [`Workload::Unique`]: a four-message chat of about 1 KiB (a system
//!   prompt, a user question, an assistant answer, and a last user message
//!   made fresh for every request from a seeded generator).
//! - [`Workload::Conversations`]: multi-turn chats as real traffic looks:
//!   the same system prompt every time and a history that grows by one
//!   turn per request; after [`TURNS`] turns a conversation starts over
//!   with a new first message.
//!
//! The generator is seeded, so two runs send the same bodies in the same
//! order (per user and iteration).

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// Which bodies a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Workload {
    /// A ~1 KiB four-message chat whose last user message is new each time.
    Unique,
    /// Multi-turn conversations that grow by a turn per request.
    Conversations,
}

/// Turns before a conversation starts over.
pub(crate) const TURNS: usize = 12;

const SYSTEM: &str = "You are a careful assistant for an operations team. Answer in plain \
    English, cite the runbook section when one applies, keep answers under two hundred words, \
    and say so when you are not sure. Never invent command-line flags or configuration keys; \
    when the question is about a metric, say which dashboard shows it and what a healthy value \
    looks like.";

const QUESTION: &str = "Our gateway sits in front of three upstream keys, each with its own \
    requests-per-minute and tokens-per-minute quota. During the nightly batch window we see \
    latency climb on the interactive service. What should we look at first?";

const ANSWER: &str = "Start with the queue: if requests wait for headroom, the batch job is \
    taking the quota the interactive service needs. Check the per-client shares and whether the \
    interactive client has a higher priority class or a reserve; then look at each key's \
    remaining tokens to see whether one key is saturated while others idle.";

const WORDS: [&str; 64] = [
    "latency",
    "quota",
    "token",
    "request",
    "gateway",
    "upstream",
    "window",
    "minute",
    "stream",
    "answer",
    "client",
    "replica",
    "reload",
    "config",
    "priority",
    "weight",
    "budget",
    "deploy",
    "region",
    "model",
    "prompt",
    "context",
    "retry",
    "timeout",
    "health",
    "probe",
    "cooldown",
    "burst",
    "bucket",
    "limit",
    "share",
    "queue",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "for",
    "with",
    "why",
    "how",
    "does",
    "should",
    "we",
    "our",
    "is",
    "are",
    "slow",
    "fast",
    "every",
    "night",
    "morning",
    "batch",
    "interactive",
    "users",
    "2024",
    "17",
    "99.9%",
    "p99",
    "GPT-4o",
    "eu-west",
    "429",
    "x-ratelimit",
];

/// Bodies for one user: its own seeded generator, and its conversation.
pub(crate) struct Bodies {
    workload: Workload,
    rng: SmallRng,
    history: Vec<Value>,
}

impl Bodies {
    /// Bodies for user `user` (each user its own seed).
    pub(crate) fn new(workload: Workload, user: u64) -> Self {
        Self {
            workload,
            rng: SmallRng::seed_from_u64(0x5eed_0000 + user),
            history: Vec::new(),
        }
    }

    /// The next body to send.
    pub(crate) fn next(&mut self, stream: bool) -> Bytes {
        let messages = match self.workload {
            Workload::Unique => json!([
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": self.sentence(28)},
            ]),
            Workload::Conversations => {
                if self.history.len() >= 2 * TURNS {
                    self.history.clear();
                }
                if !self.history.is_empty() {
                    let answer = self.sentence(40);
                    self.history
                        .push(json!({"role": "assistant", "content": answer}));
                }
                let question = self.sentence(24);
                self.history
                    .push(json!({"role": "user", "content": question}));
                let mut all = vec![json!({"role": "system", "content": SYSTEM})];
                all.extend(self.history.iter().cloned());
                Value::Array(all)
            }
        };
        let mut body = json!({"model": "gpt-4o-mini", "messages": messages, "max_tokens": 64});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }

    /// `words` words from the list, with a unique number in the middle.
    fn sentence(&mut self, words: usize) -> String {
        let mut out = String::with_capacity(words * 8);
        for i in 0..words {
            if i > 0 {
                out.push(' ');
            }
            if i == words / 2 {
                out.push_str(&self.rng.random::<u32>().to_string());
            } else {
                out.push_str(WORDS[self.rng.random_range(0..WORDS.len())]);
            }
        }
        out.push('?');
        out
    }
}

/// Users of one run that get their own generator; more share by index
/// (the bodies a run sends are then the same set, in another order).
const GENERATORS: usize = 4096;

/// A generator for each goose user of a run, by user index.
pub(crate) struct PerUser {
    workload: Workload,
    slots: Vec<std::sync::Mutex<Option<Bodies>>>,
}

impl PerUser {
    pub(crate) fn new(workload: Workload) -> Self {
        Self {
            workload,
            slots: (0..GENERATORS)
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// User `user`'s next body.
    pub(crate) fn next(&self, user: usize, stream: bool) -> Bytes {
        let index = user % GENERATORS;
        let mut slot = self.slots[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.get_or_insert_with(|| Bodies::new(self.workload, index as u64))
            .next(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_differs_and_a_conversation_grows_a_turn_at_a_time() {
        let mut unique = Bodies::new(Workload::Unique, 1);
        let (a, b) = (unique.next(false), unique.next(false));
        assert_ne!(a, b);
        assert!((900..1400).contains(&a.len()), "{}", a.len());

        let mut talk = Bodies::new(Workload::Conversations, 1);
        let lengths: Vec<usize> = (0..3)
            .map(|_| {
                let body: Value = serde_json::from_slice(&talk.next(false)).unwrap();
                body["messages"].as_array().unwrap().len()
            })
            .collect();
        assert_eq!(lengths, [2, 4, 6]);
        // The same seed sends the same bodies.
        assert_eq!(Bodies::new(Workload::Unique, 1).next(false), a);
    }
}
