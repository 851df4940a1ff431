//! The overview's charts, drawn on the server as inline SVG (no script, no style sheet or
//! font from elsewhere, so the page works offline and behind any proxy). Each chart is a
//! plain function of the numbers it is given; every bar carries a `<title>` (what a
//! pointer shows, and what the browser test reads) and the chart a legend.
//!
//! It must never query anything nor decide what a number means: the handlers fetch, and
//! the catalogue says which statuses grant access.

use maud::{html, Markup};

/// One coloured part of each bar: a name for the legend and a value per column.
pub struct Series {
    pub name: String,
    pub values: Vec<i64>,
}

/// The colour of a series, by its name where the name is a known outcome, status or
/// source (the same word is the same colour on every chart), else from a palette.
fn colour(name: &str, index: usize) -> &'static str {
    match name {
        "applied" | "access" | "active" | "webhook" => "#12b76a",
        "trialing" => "#2e90fa",
        "duplicate" | "ignored" | "done" => "#98a2b3",
        "stale" | "past_due" | "import" => "#f79009",
        "illegal" | "failed" | "unpaid" => "#f04438",
        "dead" | "canceled" | "incomplete_expired" => "#912018",
        "pending" | "incomplete" | "paused" => "#7a5af8",
        "no access" | "none" => "#d0d5dd",
        _ => ["#0ba5ec", "#ee46bc", "#6172f3", "#15b79e"][index % 4],
    }
}

const WIDTH: i64 = 720;
const PLOT_HEIGHT: i64 = 160;
const LEFT: i64 = 40;

/// One drawn part of a bar.
struct Part {
    x: i64,
    y: i64,
    width: i64,
    height: i64,
    fill: &'static str,
    title: String,
}

fn totals(labels: &[String], series: &[Series]) -> Vec<i64> {
    (0..labels.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().unwrap_or(0))
                .sum()
        })
        .collect()
}

/// Stacked columns, one per label (hours, say), each split by `series`.
pub fn columns(id: &str, title: &str, labels: &[String], series: &[Series]) -> Markup {
    let max = totals(labels, series).into_iter().max().unwrap_or(0).max(1);
    let step = (WIDTH - LEFT) / (labels.len().max(1) as i64);
    let bar = (step * 3 / 4).max(2);
    let mut parts = Vec::new();
    let mut ticks = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let x = LEFT + i as i64 * step + (step - bar) / 2;
        let mut top = PLOT_HEIGHT;
        for (s, one) in series.iter().enumerate() {
            let value = one.values.get(i).copied().unwrap_or(0);
            if value > 0 {
                let height = (value * PLOT_HEIGHT / max).max(1);
                top -= height;
                parts.push(Part {
                    x,
                    y: top,
                    width: bar,
                    height,
                    fill: colour(&one.name, s),
                    title: format!("{label} {}: {value}", one.name),
                });
            }
        }
        // At most a dozen labels under the axis, evenly spread.
        if i % (labels.len() / 12 + 1) == 0 {
            ticks.push((x + bar / 2, label.as_str()));
        }
    }
    let legend_y = PLOT_HEIGHT + 34;
    html! {
        figure.chart {
            figcaption { (title) }
            svg data-chart=(id) xmlns="http://www.w3.org/2000/svg" role="img"
                viewBox={ "0 0 " (WIDTH) " " (legend_y + 16) } width=(WIDTH) height=(legend_y + 16) {
                title { (title) }
                line x1=(LEFT) y1=(PLOT_HEIGHT) x2=(WIDTH) y2=(PLOT_HEIGHT) stroke="#98a2b3" {}
                text x=(LEFT - 6) y="12" text-anchor="end" font-size="11" fill="#5b6475" { (max) }
                text x=(LEFT - 6) y=(PLOT_HEIGHT) text-anchor="end" font-size="11" fill="#5b6475" { "0" }
                (draw(&parts))
                @for (x, label) in ticks {
                    text x=(x) y=(PLOT_HEIGHT + 14) text-anchor="middle" font-size="10" fill="#5b6475" { (label) }
                }
                (legend(series.iter().map(|s| s.name.as_str()), legend_y))
            }
        }
    }
}

/// Horizontal stacked bars, one per row label, each split by `series`, with its total.
pub fn bars(id: &str, title: &str, labels: &[String], series: &[Series]) -> Markup {
    let totals = totals(labels, series);
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let (left, row) = (150, 22);
    let mut parts = Vec::new();
    let mut ends = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let y = i as i64 * row;
        let mut x = left;
        for (s, one) in series.iter().enumerate() {
            let value = one.values.get(i).copied().unwrap_or(0);
            if value > 0 {
                let width = (value * (WIDTH - left - 60) / max).max(1);
                parts.push(Part {
                    x,
                    y: y + 3,
                    width,
                    height: row - 6,
                    fill: colour(&one.name, s),
                    title: format!("{label} {}: {value}", one.name),
                });
                x += width;
            }
        }
        ends.push((y, x, label.as_str(), totals[i]));
    }
    let legend_y = labels.len() as i64 * row + 20;
    html! {
        figure.chart {
            figcaption { (title) }
            svg data-chart=(id) xmlns="http://www.w3.org/2000/svg" role="img"
                viewBox={ "0 0 " (WIDTH) " " (legend_y + 16) } width=(WIDTH) height=(legend_y + 16) {
                title { (title) }
                (draw(&parts))
                @for (y, x, label, total) in ends {
                    text x=(left - 8) y=(y + 15) text-anchor="end" font-size="12" fill="#1d2330" { (label) }
                    text x=(x + 6) y=(y + 15) font-size="12" fill="#5b6475" { (total) }
                }
                (legend(series.iter().map(|s| s.name.as_str()), legend_y))
            }
        }
    }
}

fn draw(parts: &[Part]) -> Markup {
    html! {
        @for part in parts {
            rect x=(part.x) y=(part.y) width=(part.width) height=(part.height) fill=(part.fill) {
                title { (part.title) }
            }
        }
    }
}

fn legend<'a>(names: impl Iterator<Item = &'a str>, y: i64) -> Markup {
    html! {
        @for (i, name) in names.enumerate() {
            @let x = LEFT + i as i64 * 110;
            rect x=(x) y=(y - 9) width="10" height="10" fill=(colour(name, i)) {}
            text x=(x + 14) y=(y) font-size="11" fill="#1d2330" { (name) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: &[i64]) -> Series {
        Series {
            name: name.to_owned(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn columns_stack_each_series_with_a_title_per_part() {
        let labels = vec!["13:00".to_owned(), "14:00".to_owned()];
        let svg = columns(
            "outcomes",
            "Webhook outcomes",
            &labels,
            &[series("applied", &[2, 0]), series("stale", &[1, 3])],
        )
        .into_string();
        assert!(svg.contains("data-chart=\"outcomes\""), "{svg}");
        assert!(svg.contains("<title>13:00 applied: 2</title>"), "{svg}");
        assert!(svg.contains("<title>14:00 stale: 3</title>"), "{svg}");
        assert!(
            !svg.contains("14:00 applied"),
            "a zero draws nothing: {svg}"
        );
        assert!(!svg.contains("<script") && !svg.contains("href"), "{svg}");
    }

    #[test]
    fn bars_show_each_row_total() {
        let labels = vec!["active".to_owned(), "canceled".to_owned()];
        let svg = bars(
            "customers",
            "Customers",
            &labels,
            &[series("access", &[4, 0]), series("no access", &[1, 2])],
        )
        .into_string();
        assert!(svg.contains("<title>active access: 4</title>"), "{svg}");
        assert!(
            svg.contains("<title>canceled no access: 2</title>"),
            "{svg}"
        );
        assert!(
            svg.contains(">5</text>") && svg.contains(">2</text>"),
            "{svg}"
        );
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let svg = columns("x", "Nothing", &[], &[]).into_string();
        assert!(svg.contains("<svg"), "{svg}");
    }
}
