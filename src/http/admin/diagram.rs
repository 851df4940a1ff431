//! The transition diagram on the admin page: every legal status change of
//! `aggregates::TRANSITIONS` (through [`transitions::edges`]) as inline SVG, with one
//! customer's path and current status highlighted.
//!
//! Only the positions of the statuses are chosen here; every edge comes from the table, so
//! this file must never hold a rule of its own (an illegal move is never drawn).

use aggregates::{Move, SubscriptionStatus};
use maud::{html, Markup};

use crate::transitions;

const NODE_W: f64 = 140.0;
const NODE_H: f64 = 34.0;

/// Where each status is drawn.
fn position(status: Option<SubscriptionStatus>) -> (f64, f64) {
    use SubscriptionStatus::*;
    match status {
        None => (50.0, 200.0),
        Some(Incomplete) => (230.0, 70.0),
        Some(Trialing) => (230.0, 200.0),
        Some(IncompleteExpired) => (230.0, 330.0),
        Some(Active) => (450.0, 200.0),
        Some(Paused) => (450.0, 330.0),
        Some(PastDue) => (670.0, 70.0),
        Some(Unpaid) => (670.0, 200.0),
        Some(Canceled) => (670.0, 330.0),
    }
}

/// Moves `to` back towards `from` until it leaves the node box drawn at `to`.
fn clip(from: (f64, f64), to: (f64, f64), start_node: bool) -> (f64, f64) {
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let (hw, hh) = if start_node {
        (8.0, 8.0)
    } else {
        (NODE_W / 2.0 + 3.0, NODE_H / 2.0 + 3.0)
    };
    let t = (hw / dx.abs().max(1e-9))
        .min(hh / dy.abs().max(1e-9))
        .min(1.0);
    (to.0 - dx * t, to.1 - dy * t)
}

/// One legal move as a curve, highlighted when it is on the customer's path.
fn edge(from: Option<SubscriptionStatus>, to: SubscriptionStatus, mv: Move, hot: bool) -> Markup {
    let (a, b) = (position(from), position(Some(to)));
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len = (dx * dx + dy * dy).sqrt();
    // Bend every edge to its own left, so a -> b and b -> a do not overlap.
    let bend = if from.is_none() { 0.0 } else { 0.12 * len };
    let ctrl = (
        (a.0 + b.0) / 2.0 - dy / len * bend,
        (a.1 + b.1) / 2.0 + dx / len * bend,
    );
    let start = clip(ctrl, a, from.is_none());
    let end = clip(ctrl, b, false);
    let dash = match mv {
        Move::Step => None,
        Move::CatchUp => Some("6 4"),
        _ => Some("2 4"),
    };
    // SVG elements are closed explicitly: inside inline SVG an unclosed element would
    // swallow its siblings.
    html! {
        path d=(format_args!(
                "M{:.1},{:.1} Q{:.1},{:.1} {:.1},{:.1}",
                start.0, start.1, ctrl.0, ctrl.1, end.0, end.1
            ))
            fill="none"
            stroke=(if hot { "#d92d20" } else { "#c4cad3" })
            stroke-width=(if hot { 3 } else { 1 })
            stroke-dasharray=[dash]
            marker-end=(if hot { "url(#arrow-hot)" } else { "url(#arrow)" })
            data-from=(from.map_or("none", |s| s.as_str()))
            data-to=(to.as_str())
            class=[hot.then_some("path")] {}
    }
}

/// The transition diagram as inline SVG: every legal status change of the table (solid:
/// step, dashed: catch-up, dotted: first fact), with the moves in `path` and the
/// `current` status highlighted.
pub fn diagram(
    path: &[(Option<SubscriptionStatus>, SubscriptionStatus)],
    current: Option<SubscriptionStatus>,
) -> Markup {
    let edges = transitions::edges();
    let is_hot = |from, to| path.contains(&(from, to));
    let (start_x, start_y) = position(None);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 760 400" width="760" height="400"
            id="transitions" role="img" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"
                    markerHeight="7" orient="auto-start-reverse" {
                    path d="M0,0 L10,5 L0,10 z" fill="#aab2bf" {}
                }
                marker id="arrow-hot" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6"
                    markerHeight="6" orient="auto-start-reverse" {
                    path d="M0,0 L10,5 L0,10 z" fill="#d92d20" {}
                }
            }
            // Highlighted edges are drawn last, above the others.
            @for (from, to, mv) in &edges {
                @if !is_hot(*from, *to) { (edge(*from, *to, *mv, false)) }
            }
            @for (from, to, mv) in &edges {
                @if is_hot(*from, *to) { (edge(*from, *to, *mv, true)) }
            }
            circle cx=(start_x) cy=(start_y) r="8" fill="#1d2330" {}
            text x=(start_x) y=(start_y + 24.0) text-anchor="middle" font-size="11" fill="#5b6475" {
                "start"
            }
            @for status in SubscriptionStatus::ALL {
                (node(status, path, current))
            }
            text x="10" y="392" font-size="11" fill="#5b6475" {
                "solid: step · dashed: catch-up (intermediate events missing) · dotted: first fact · red: this customer's path, filled: current status"
            }
        }
    }
}

/// One status as a box: filled when it is the current one, outlined in red when the path
/// visits it.
fn node(
    status: SubscriptionStatus,
    path: &[(Option<SubscriptionStatus>, SubscriptionStatus)],
    current: Option<SubscriptionStatus>,
) -> Markup {
    let (x, y) = position(Some(status));
    let visited = path.iter().any(|(f, t)| *t == status || *f == Some(status));
    let (fill, stroke, text) = if current == Some(status) {
        ("#d92d20", "#912018", "#fff")
    } else if visited {
        ("#fee4e2", "#d92d20", "#1d2330")
    } else {
        ("#fff", "#98a0ad", "#1d2330")
    };
    let name = status.as_str();
    html! {
        g data-status=(name) {
            rect x=(format_args!("{:.1}", x - NODE_W / 2.0)) y=(format_args!("{:.1}", y - NODE_H / 2.0))
                width=(NODE_W) height=(NODE_H) rx="8" fill=(fill) stroke=(stroke)
                stroke-width=(if visited || current == Some(status) { 2 } else { 1 }) {}
            text x=(x) y=(format_args!("{:.1}", y + 4.5)) text-anchor="middle" font-size="13"
                font-family="system-ui,sans-serif" fill=(text) {
                (name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diagram_draws_every_edge_of_the_table_and_highlights_the_path() {
        use SubscriptionStatus::*;
        let path = [(None, Trialing), (Some(Trialing), Active)];
        let svg = diagram(&path, Some(Active)).into_string();
        assert_eq!(
            svg.matches(" data-from=").count(),
            transitions::edges().len(),
            "one curve per legal move"
        );
        assert_eq!(svg.matches("class=\"path\"").count(), 2);
        assert!(svg.contains("data-from=\"trialing\" data-to=\"active\" class=\"path\""));
        // Illegal moves are never drawn.
        assert!(!svg.contains("data-from=\"canceled\" data-to=\"active\""));
    }
}
