//! Line charts as SVG, small enough to read in a diff: throughput over time and latency
//! distributions for BENCHMARKS.md.

use std::fmt::Write;

/// One named line of points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// A chart of one or more series sharing axes.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// A base-10 logarithmic x axis (for latencies).
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// About five round tick values covering `[low, high]`.
fn linear_ticks(low: f64, high: f64) -> Vec<f64> {
    let span = (high - low).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * magnitude);
    let mut ticks = Vec::new();
    let mut t = (low / step).ceil() * step;
    while t <= high + step * 1e-9 {
        ticks.push(t);
        t += step;
    }
    ticks
}

fn label(value: f64) -> String {
    let a = value.abs();
    if a >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if a >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if a >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

impl Chart {
    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let xs: Vec<f64> = points
            .clone()
            .map(|p| p.0)
            .filter(|x| !self.log_x || *x > 0.0)
            .collect();
        let ys: Vec<f64> = points.map(|p| p.1).collect();
        let fold = |v: &[f64], f: fn(f64, f64) -> f64, start: f64| v.iter().copied().fold(start, f);
        let (mut x_low, mut x_high) = (
            fold(&xs, f64::min, f64::INFINITY),
            fold(&xs, f64::max, f64::NEG_INFINITY),
        );
        if !x_low.is_finite() {
            (x_low, x_high) = (if self.log_x { 0.1 } else { 0.0 }, 1.0);
        }
        let y_high = fold(&ys, f64::max, 0.0).max(f64::MIN_POSITIVE) * 1.05;
        let y_low = fold(&ys, f64::min, 0.0).min(0.0);
        let (x_ticks, x_map): (Vec<f64>, Box<dyn Fn(f64) -> f64>) = if self.log_x {
            let (low, high) = (
                x_low.log10().floor(),
                x_high.log10().ceil().max(x_low.log10().floor() + 1.0),
            );
            let ticks = (low as i32..=high as i32).map(|e| 10f64.powi(e)).collect();
            (
                ticks,
                Box::new(move |x: f64| (x.max(10f64.powf(low)).log10() - low) / (high - low)),
            )
        } else {
            if x_high <= x_low {
                x_high = x_low + 1.0;
            }
            (
                linear_ticks(x_low, x_high),
                Box::new(move |x: f64| (x - x_low) / (x_high - x_low)),
            )
        };
        let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let px = |x: f64| LEFT + x_map(x).clamp(0.0, 1.0) * plot_w;
        let py = |y: f64| TOP + plot_h - (y - y_low) / (y_high - y_low) * plot_h;

        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"##,
            LEFT + plot_w / 2.0,
            escape(&self.title)
        );
        for t in &x_ticks {
            let x = px(*t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 16.0,
                label(*t)
            );
        }
        for t in linear_ticks(y_low, y_high) {
            let y = py(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
            LEFT + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(&self.x_label),
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .filter(|(x, _)| !self.log_x || *x > 0.0)
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                svg,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"##,
                path.join(" ")
            );
            let ly = TOP + 10.0 + i as f64 * 18.0;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"##,
                lx + 18.0,
                lx + 24.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The cumulative distribution of sorted latencies: `(milliseconds, % at or below)`,
/// thinned to at most about 400 points.
pub fn cdf(sorted: &[std::time::Duration]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let step = n.div_ceil(400).max(1);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| {
            (
                sorted[i].as_secs_f64() * 1000.0,
                100.0 * (i + 1) as f64 / n as f64,
            )
        })
        .collect();
    if let Some(last) = sorted.last()
        && points.last().is_some_and(|p| p.1 < 100.0)
    {
        points.push((last.as_secs_f64() * 1000.0, 100.0));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(linear_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let ticks = linear_ticks(0.0, 23_400.0);
        assert_eq!(ticks.first(), Some(&0.0));
        assert!(ticks.len() >= 3 && ticks.len() <= 7, "{ticks:?}");
        assert!(
            ticks
                .last()
                .is_some_and(|t| *t <= 23_400.0 && *t >= 15_000.0)
        );
    }

    #[test]
    fn a_chart_draws_every_series_inside_the_plot() {
        let chart = Chart {
            title: "a <b>".into(),
            x_label: "s".into(),
            y_label: "n".into(),
            log_x: true,
            series: vec![
                Series::new("one", vec![(0.5, 1.0), (5.0, 50.0), (80.0, 100.0)]),
                Series::new("two", vec![(1.0, 10.0), (0.0, 20.0)]),
            ],
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;b&gt;"));
        for point in svg
            .split("points=\"")
            .skip(1)
            .flat_map(|s| s.split('"').next().unwrap_or_default().split(' '))
        {
            let (x, y) = point.split_once(',').expect("x,y");
            let (x, y): (f64, f64) = (x.parse().expect("x"), y.parse().expect("y"));
            assert!((LEFT..=WIDTH - RIGHT).contains(&x), "x {x}");
            assert!((TOP..=HEIGHT - BOTTOM).contains(&y), "y {y}");
        }
    }

    #[test]
    fn cdf_ends_at_the_maximum() {
        let sorted: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let points = cdf(&sorted);
        assert!(points.len() <= 402);
        assert_eq!(points.last(), Some(&(1.0, 100.0)));
        assert!(
            points
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }
}
