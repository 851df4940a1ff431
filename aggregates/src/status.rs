//! Stripe's subscription statuses and the transition table the aggregate runs.
//!
//! This module is the one source of the table: the aggregate decides with
//! [`transition`], `subledger transitions` prints [`TRANSITIONS`], and the docs and the
//! admin page draw it. It must never grow a second copy of the rules anywhere else.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A Stripe subscription status, as Stripe spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Incomplete,
    IncompleteExpired,
    Trialing,
    Active,
    PastDue,
    Canceled,
    Unpaid,
    Paused,
}

impl SubscriptionStatus {
    /// Every status, in the column order of [`TRANSITIONS`].
    pub const ALL: [SubscriptionStatus; 8] = [
        Self::Incomplete,
        Self::IncompleteExpired,
        Self::Trialing,
        Self::Active,
        Self::PastDue,
        Self::Canceled,
        Self::Unpaid,
        Self::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::IncompleteExpired => "incomplete_expired",
            Self::Trialing => "trialing",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
            Self::Unpaid => "unpaid",
            Self::Paused => "paused",
        }
    }

    /// Terminal statuses end a subscription id for good: Stripe never revives one.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Canceled | Self::IncompleteExpired)
    }

    /// How far along its life a subscription is, used only to order two *different*
    /// snapshots that Stripe stamped with the same second (its `created` has one-second
    /// resolution). A same-second move is taken only towards a higher rank, so delivery
    /// order cannot change which of the two wins. The ranks follow the order in which
    /// Stripe makes same-second moves in practice: checkout (`incomplete` → `active`),
    /// trial end (`trialing` → `active`/`past_due`/`paused`), failed renewal
    /// (`active` → `past_due` → `unpaid`), cancellation (anything → `canceled`).
    pub fn same_second_rank(self) -> u8 {
        match self {
            Self::Incomplete => 0,
            Self::Trialing => 1,
            Self::Active => 2,
            Self::PastDue => 3,
            Self::Unpaid => 4,
            Self::Paused => 5,
            Self::Canceled | Self::IncompleteExpired => 6,
        }
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|s| *s == self)
            .expect("ALL lists every status")
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wire spelling was not one of Stripe's subscription statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown subscription status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for SubscriptionStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// What kind of move a (from, to) pair of the table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Move {
    /// The first fact we hold about a subscription id: any status may come first, because
    /// `customer.subscription.updated` can arrive before `created`.
    First,
    /// Stripe makes this move in one step (payment, trial end, failed renewal, cancel…).
    Step,
    /// Legal, but Stripe only gets here through moves whose events we have not seen yet
    /// (delivery is unordered and late): accepting it is what lets every customer
    /// converge to Stripe's newest facts whatever the delivery order.
    CatchUp,
    /// Same status; other fields (period, cancel flags, price) may have changed.
    Refresh,
    /// Stripe never makes this move: a snapshot asking for it is rejected.
    Illegal,
}

impl Move {
    pub fn is_legal(self) -> bool {
        !matches!(self, Move::Illegal)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Move::First => "first",
            Move::Step => "step",
            Move::CatchUp => "catch_up",
            Move::Refresh => "refresh",
            Move::Illegal => "illegal",
        }
    }
}

use Move::{CatchUp as C, First as F, Illegal as X, Refresh as R, Step as S};

/// The transition table. Rows are the status we hold (`None`: no fact about this
/// subscription id yet), columns follow [`SubscriptionStatus::ALL`]; `F` first, `S` step,
/// `C` catch-up, `R` refresh, `X` illegal. `subledger transitions` prints it with names,
/// and ARCHITECTURE.md carries that print (a test keeps the two equal).
///
/// Nothing goes back to `incomplete`; only `incomplete` expires; `canceled` and
/// `incomplete_expired` are terminal for their subscription id (a customer who comes back
/// gets a new subscription id).
pub const TRANSITIONS: [(Option<SubscriptionStatus>, [Move; 8]); 9] = {
    use SubscriptionStatus::*;
    [
        (None, [F, F, F, F, F, F, F, F]),
        (Some(Incomplete), [R, S, C, S, C, S, C, C]),
        (Some(IncompleteExpired), [X, R, X, X, X, X, X, X]),
        (Some(Trialing), [X, X, R, S, S, S, C, S]),
        (Some(Active), [X, X, S, R, S, S, C, S]),
        (Some(PastDue), [X, X, C, S, R, S, S, S]),
        (Some(Canceled), [X, X, X, X, X, R, X, X]),
        (Some(Unpaid), [X, X, C, S, C, S, R, C]),
        (Some(Paused), [X, X, C, S, C, S, C, R]),
    ]
};

/// Looks a move up in [`TRANSITIONS`].
pub fn transition(from: Option<SubscriptionStatus>, to: SubscriptionStatus) -> Move {
    let row = match from {
        None => 0,
        Some(status) => status.index() + 1,
    };
    debug_assert_eq!(TRANSITIONS[row].0, from, "TRANSITIONS rows follow ALL");
    TRANSITIONS[row].1[to.index()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_column_order() {
        for (i, status) in SubscriptionStatus::ALL.iter().enumerate() {
            assert_eq!(TRANSITIONS[i + 1].0, Some(*status));
        }
    }

    #[test]
    fn wire_names_round_trip() {
        for status in SubscriptionStatus::ALL {
            assert_eq!(status.as_str().parse::<SubscriptionStatus>(), Ok(status));
        }
        assert!("cancelled".parse::<SubscriptionStatus>().is_err());
    }

    #[test]
    fn same_status_is_always_a_refresh_and_terminals_only_refresh() {
        for status in SubscriptionStatus::ALL {
            assert_eq!(transition(Some(status), status), Move::Refresh);
            if status.is_terminal() {
                for to in SubscriptionStatus::ALL
                    .into_iter()
                    .filter(|to| *to != status)
                {
                    assert_eq!(
                        transition(Some(status), to),
                        Move::Illegal,
                        "{status} -> {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_second_rank_never_favours_an_illegal_move() {
        // If two different statuses could share a second, the higher-ranked one must be
        // reachable from the lower one; otherwise delivery order would decide the winner.
        for from in SubscriptionStatus::ALL {
            for to in SubscriptionStatus::ALL {
                if from.same_second_rank() < to.same_second_rank()
                    && !(from == SubscriptionStatus::IncompleteExpired
                        || to == SubscriptionStatus::IncompleteExpired)
                {
                    assert!(transition(Some(from), to).is_legal(), "{from} -> {to}");
                }
            }
        }
    }
}
