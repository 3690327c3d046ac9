//! Money: what each request costs, and what each client may spend.
//!
//! - [`prices`]: the price of a model's tokens (and images) on a node.
//! - [`budget`]: a client's budget per period, and the [`Account`] that
//!   keeps its spend: settled, and held by requests in flight.
//!
//! Amounts are integers of nano-dollars ([`Cost`]): sums are exact, a
//! request's cost is rounded once (to the nearest nano-dollar; a
//! worst case is rounded up), and a budget of up to 9 million dollars
//! stays exact in Redis's Lua numbers (2^53 nano-dollars).
//!
//! Invariant (what "a budget is never exceeded" rests on): a request is
//! admitted only if the client's settled spend, plus the worst case of
//! every request of its still in flight, plus its own worst case, fits the
//! budget; that check and the hold it makes are one step (a lock here, a
//! script in Redis). The worst case is the whole prompt as counted at the
//! input price plus every reserved completion token at the output price,
//! on the dearest node that may serve it; the answer's own usage settles
//! the hold. An answer that reports more tokens than were reserved (an
//! upstream that counts the prompt otherwise) is charged what it reports:
//! the spend stays true, and the README says so.

pub mod budget;
pub mod prices;

pub use budget::{Account, Budget, Period, Short};
pub use prices::{NodePricing, Price, PriceTable};

/// An amount of US dollars, in nano-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cost(pub u64);

/// Nano-dollars in a dollar.
const NANOS_PER_USD: f64 = 1e9;

impl Cost {
    pub const ZERO: Cost = Cost(0);

    /// `nanos`, rounded to the nearest nano-dollar (negative or not a
    /// number: 0).
    pub fn from_nanos_f64(nanos: f64) -> Self {
        Self(if nanos.is_finite() && nanos > 0.0 {
            nanos.round() as u64
        } else {
            0
        })
    }

    /// `nanos`, rounded up: for a worst case.
    pub fn from_nanos_f64_up(nanos: f64) -> Self {
        Self(if nanos.is_finite() && nanos > 0.0 {
            nanos.ceil() as u64
        } else {
            0
        })
    }

    /// A dollar amount as written in the config or the admin API.
    pub fn from_usd(usd: f64) -> Self {
        Self::from_nanos_f64(usd * NANOS_PER_USD)
    }

    pub fn usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD
    }

    pub fn nanos(self) -> u64 {
        self.0
    }
}

/// The largest budget, in dollars: budgets stay exact as Redis numbers.
pub const MAX_BUDGET_USD: f64 = 9_000_000.0;

/// A budget from its written parts (config or admin API): dollars, 0 or
/// more and at most [`MAX_BUDGET_USD`], and a period (`"month"` when left
/// out). A period without an amount is an error; neither is no budget.
pub fn budget_of(
    usd: Option<f64>,
    period: Option<&str>,
) -> Result<Option<Budget>, (&'static str, &'static str)> {
    let period = match period {
        None => None,
        Some(text) => Some(
            Period::parse(text)
                .ok_or(("budget_period", "must be \"day\", \"month\" or \"total\""))?,
        ),
    };
    match usd {
        None if period.is_some() => Err(("budget_usd", "is required with budget_period")),
        None => Ok(None),
        Some(usd) if !usd.is_finite() || usd < 0.0 => {
            Err(("budget_usd", "must be a number of dollars, 0 or more"))
        }
        Some(usd) if usd > MAX_BUDGET_USD => Err((
            "budget_usd",
            "must be at most 9000000 (budgets are kept exact to the nano-dollar)",
        )),
        Some(usd) => Ok(Some(Budget {
            limit: Cost::from_usd(usd),
            period: period.unwrap_or_default(),
        })),
    }
}

/// What an answer used that is priced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub prompt: u64,
    /// Of those, served from the provider's cache.
    pub cached_prompt: u64,
    /// Completion tokens, reasoning tokens included.
    pub completion: u64,
    /// Images returned (images endpoints).
    pub images: u64,
    /// Milliseconds of audio read (transcriptions billed by duration).
    pub audio_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini() -> Price {
        *PriceTable::defaults().find("gpt-4o-mini").expect("priced")
    }

    #[test]
    fn a_request_costs_its_prompt_and_completion_at_their_prices() {
        // 1,000 prompt tokens at $0.15/M and 500 completion at $0.60/M:
        // $0.00015 + $0.0003 = $0.00045.
        let usage = Usage {
            prompt: 1_000,
            completion: 500,
            ..Usage::default()
        };
        assert_eq!(mini().cost(&usage, 1.0), Cost(450_000));
    }

    #[test]
    fn cached_prompt_tokens_are_priced_as_cached_and_not_again_as_input() {
        // 1,000 prompt tokens of which 800 cached: 200 x $0.15/M + 800 x
        // $0.075/M = $0.00003 + $0.00006.
        let usage = Usage {
            prompt: 1_000,
            cached_prompt: 800,
            ..Usage::default()
        };
        assert_eq!(mini().cost(&usage, 1.0), Cost(90_000));
        // A report of more cached tokens than prompt ones caps at the prompt.
        let odd = Usage {
            cached_prompt: 5_000,
            ..usage
        };
        assert_eq!(mini().cost(&odd, 1.0), Cost(75_000));
    }

    #[test]
    fn a_multiplier_scales_and_the_worst_case_rounds_up() {
        let usage = Usage {
            prompt: 1,
            ..Usage::default()
        };
        // One token at $0.15/M is 150 nano-dollars; a third of it is 50.
        assert_eq!(mini().cost(&usage, 1.0 / 3.0), Cost(50));
        let price = Price {
            input: 0.0001,
            ..Price::default()
        };
        // 0.1 nano-dollars: nothing when settled, 1 as a worst case.
        assert_eq!(price.cost(&usage, 1.0), Cost(0));
        assert_eq!(price.worst_case(1, 0, 0, 1.0), Cost(1));
    }

    #[test]
    fn a_budget_is_dollars_and_a_known_period() {
        assert_eq!(budget_of(None, None), Ok(None));
        assert_eq!(
            budget_of(Some(5.0), None),
            Ok(Some(Budget {
                limit: Cost(5_000_000_000),
                period: Period::Month
            }))
        );
        assert_eq!(
            budget_of(Some(-1.0), Some("day")).unwrap_err().0,
            "budget_usd"
        );
        assert_eq!(budget_of(Some(f64::NAN), None).unwrap_err().0, "budget_usd");
        assert_eq!(budget_of(Some(1e12), None).unwrap_err().0, "budget_usd");
        assert_eq!(
            budget_of(Some(1.0), Some("week")).unwrap_err().0,
            "budget_period"
        );
        assert_eq!(budget_of(None, Some("day")).unwrap_err().0, "budget_usd");
    }

    #[test]
    fn audio_is_priced_by_the_second() {
        let whisper = *PriceTable::defaults().find("whisper-1").expect("priced");
        let usage = Usage {
            audio_ms: 90_500,
            ..Usage::default()
        };
        // 90.5 s at $0.006 a minute.
        assert_eq!(whisper.cost(&usage, 1.0), Cost::from_usd(0.00905));
    }

    #[test]
    fn images_are_priced_per_image() {
        let dalle = *PriceTable::defaults().find("dall-e-3").expect("priced");
        let usage = Usage {
            images: 3,
            ..Usage::default()
        };
        assert_eq!(dalle.cost(&usage, 1.0), Cost::from_usd(0.12));
        assert_eq!(dalle.worst_case(0, 0, 2, 1.0), Cost::from_usd(0.08));
    }
}
