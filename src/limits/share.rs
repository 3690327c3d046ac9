//! How a client shares a saturated pool: its priority class and its weight
//! ([`Share`]), and the share of every node's quota a class keeps from the
//! classes below it ([`Reserves`]).

use serde::{Deserialize, Serialize};

/// A client's priority class. Higher classes are dispatched first when
/// nodes are saturated.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(text: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// 0 for the highest class.
    pub fn rank(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

/// The largest weight: a million times another client's share is already
/// all of it.
pub const MAX_WEIGHT: f64 = 1_000_000.0;

/// A client's class and its weight within the class: waiting clients of
/// one class are served tokens in proportion to their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub priority: Priority,
    pub weight: f64,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            priority: Priority::Normal,
            weight: 1.0,
        }
    }
}

impl Share {
    /// A share from its parts as the config and the admin API give them;
    /// every problem names its field.
    pub fn from_parts(
        priority: Option<&str>,
        weight: Option<f64>,
    ) -> Result<Share, Vec<(&'static str, &'static str)>> {
        let mut problems = Vec::new();
        let priority = match priority {
            None => Priority::Normal,
            Some(text) => Priority::parse(text).unwrap_or_else(|| {
                problems.push(("priority", "must be \"high\", \"normal\" or \"low\""));
                Priority::Normal
            }),
        };
        let weight = weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0 && weight <= MAX_WEIGHT) {
            problems.push(("weight", "must be a number above 0 and at most 1000000"));
        }
        if problems.is_empty() {
            Ok(Share { priority, weight })
        } else {
            Err(problems)
        }
    }
}

/// Per million: the whole of a quota.
pub const WHOLE: u32 = 1_000_000;

/// The share of every node's quota each class keeps from the classes below
/// it (`queue.reserve`): a request of class `c` may use the quota less what
/// the classes above `c` keep. They sum to less than 1.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reserves {
    pub high: f64,
    pub normal: f64,
    pub low: f64,
}

impl Reserves {
    /// Checks each reserve and their sum; every problem names its field.
    pub fn checked(self) -> Result<Reserves, Vec<(&'static str, &'static str)>> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("high", self.high),
            ("normal", self.normal),
            ("low", self.low),
        ] {
            if !(value.is_finite() && (0.0..1.0).contains(&value)) {
                problems.push((field, "must be from 0 up to, not including, 1"));
            }
        }
        if problems.is_empty() && self.high + self.normal + self.low >= 1.0 {
            problems.push(("high", "the reserves must sum to less than 1"));
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }

    /// What a request of `priority` may use of each quota, per million.
    pub fn usable(&self, priority: Priority) -> u32 {
        let kept = match priority {
            Priority::High => 0.0,
            Priority::Normal => self.high,
            Priority::Low => self.high + self.normal,
        };
        ((1.0 - kept) * f64::from(WHOLE))
            .round()
            .clamp(1.0, f64::from(WHOLE)) as u32
    }
}

/// `quota` scaled to `usable` per million, never below 1.
pub fn part_of(quota: u64, usable: u32) -> u64 {
    if usable >= WHOLE {
        return quota;
    }
    ((u128::from(quota) * u128::from(usable) / u128::from(WHOLE)) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_reads_its_class_and_weight_and_names_bad_fields() {
        assert_eq!(Share::from_parts(None, None), Ok(Share::default()));
        assert_eq!(
            Share::from_parts(Some("high"), Some(3.0)),
            Ok(Share {
                priority: Priority::High,
                weight: 3.0
            })
        );
        for (priority, weight, field) in [
            (Some("urgent"), None, "priority"),
            (None, Some(0.0), "weight"),
            (None, Some(-1.0), "weight"),
            (None, Some(f64::NAN), "weight"),
            (None, Some(2e6), "weight"),
        ] {
            let problems = Share::from_parts(priority, weight).unwrap_err();
            assert_eq!(problems[0].0, field);
        }
    }

    #[test]
    fn a_class_uses_the_quota_less_what_the_classes_above_keep() {
        let reserves = Reserves {
            high: 0.2,
            normal: 0.1,
            low: 0.0,
        }
        .checked()
        .unwrap();
        assert_eq!(reserves.usable(Priority::High), WHOLE);
        assert_eq!(reserves.usable(Priority::Normal), 800_000);
        assert_eq!(reserves.usable(Priority::Low), 700_000);
        assert_eq!(part_of(100, reserves.usable(Priority::Low)), 70);
        assert_eq!(part_of(1, reserves.usable(Priority::Low)), 1);
        for bad in [
            Reserves {
                high: 1.0,
                ..Reserves::default()
            },
            Reserves {
                normal: -0.1,
                ..Reserves::default()
            },
            Reserves {
                high: 0.6,
                normal: 0.4,
                low: 0.0,
            },
        ] {
            assert!(bad.checked().is_err(), "{bad:?}");
        }
    }
}
